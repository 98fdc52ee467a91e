"""The Router: events in, per-destination work out.

For each event: parse and normalize it, decide per destination (integrations map, filter),
translate, then accept it durably (dedup record and jobs in one step) so that delivery can
take over. ``plan`` is the same path without storage, for dry runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, UTC
from enum import StrEnum
from pathlib import Path
from typing import Any, TYPE_CHECKING

import orjson

from router.config import LoadedConfig, load_config
from router.destination import HttpRequest, Payload, checked_request
from router.delivery.batching import from_spool, oversized, queued_group
from router.delivery.telemetry import DeliveryMetrics
from router.destinations import ConfiguredDestination, build_destinations, egress_policy
from router.errors import PLUGIN_FAILURES, EventRejected, InvalidEvent, SkipEvent
from router.events import Event, parse_event, user_key_of
from router.integrations import IntegrationsMap
from router.registry import Registry, create_registry
from router.runtime import LoopWatchdog
from router.storage import Storage, storage_for_url
from router.storage.base import Acceptance, NewJob

if TYPE_CHECKING:
    from router.delivery.process import DeliveryProcess

log = logging.getLogger("router")
DEFAULT_SOURCE = "default"
PLAN_TURN_AFTER = 0.01
"""Seconds ``route_many`` plans before it lets the event loop turn."""


class Status(StrEnum):
    SEND = "send"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"
    INVALID = "invalid"


_SEND, _SKIPPED = Status.SEND, Status.SKIPPED
"""Read once, for the paths that run for every event and destination: on Python 3.11 a
member read from its enum class goes through ``EnumType.__getattr__``'s slot, about 700
instructions against a few for a global, and routing read ``Status.SEND`` twice an event
and destination (callgrind, ``bench.callgrind_route``)."""


@dataclass(slots=True)
class DestinationResult:
    """What happened to one event for one destination (``destination`` is None when the
    event itself is invalid)."""

    destination: str | None
    status: Status
    reason: str = ""
    payloads: Sequence[Payload] = ()
    bodies: Sequence[bytes] = ()
    """The payloads' bodies serialized, as they are queued."""


@dataclass(slots=True)
class RouteResult:
    """What happened to one event, per destination."""

    message_id: str | None
    event: Event | None
    results: list[DestinationResult] = field(default_factory=list)

    @property
    def invalid(self) -> bool:
        return self.event is None

    @property
    def duplicate(self) -> bool:
        return bool(self.results) and all(r.status is Status.DUPLICATE for r in self.results)

    def status_of(self, destination: str) -> DestinationResult | None:
        """The whole result for ``destination`` (``.status``, ``.reason``), not the status
        alone, despite its name, which stays for the embedders who call it; None for a
        destination the event was never routed to (an invalid event). Names match without
        regard to case, as the integrations map's do."""
        return next((r for r in self.results if r.destination and
                     r.destination.lower() == destination.lower()), None)


class Router:
    """Routes events to the configured destinations. Use it as an async context manager::

        async with Router.from_file("config/router.yaml") as router:
            result = await router.route({"type": "track", "event": "Signed Up", "userId": "42"})

    ``route`` returns once the event's work is durable in the storage (a group commit shared
    with concurrent calls: with SQLite, about one WAL append per batch of events, without an
    fsync unless the URL says ``?synchronous=full``);
    delivery then happens in the background, with retries, until ``close``.
    """

    def __init__(self, loaded: LoadedConfig, *, registry: Registry | None = None,
                 storage: Storage | None = None, deliver: bool = True) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.registry = registry or create_registry()
        self.egress = egress_policy(self.config)
        self.destinations: list[ConfiguredDestination] = build_destinations(
            loaded, self.registry, self.egress)
        if storage is not None and deliver and self.config.delivery.own_process:
            raise ValueError("delivery.own_process: the delivery process opens the config's "
                             "storage, so a storage passed to Router would not be the one "
                             "it delivers from; pass none, or deliver=False")
        self._storage_from_config = storage is None
        self._base_dir = Path.cwd()
        """Where a relative ``sqlite:///`` path is found, fixed at construction: the delivery
        process, started later, must open the very same file."""
        self.storage = storage or storage_for_url(self.config.storage, base_dir=self._base_dir)
        self._queued_as = {d.name: (queued_group(d.plugin.name, ""), d.delivery.ordered)
                           for d in self.destinations}
        """Each destination's queued group before the payload's own (its plugin's name, see
        ``queued_group``) and whether it keeps per-user order: what its jobs are queued with
        (``_acceptances``)."""
        self.window = self.config.dedup.window
        self._deliver = deliver
        self._delivery: Any = None
        self.delivery_metrics = DeliveryMetrics(d.name for d in self.destinations)
        self._watchdog = LoopWatchdog(
            holds_up="intake, delivery and /health"
            if deliver and not self.config.delivery.own_process else "intake and /health")
        """Logs where the event loop is stuck when a plugin (or anything) blocks it."""
        self._open = False
        self._closing: asyncio.Future[None] | None = None
        self._routing = 0
        """``route_many`` calls under way: ``close`` lets them finish before the storage goes
        (a Redis client closed under them failed events it had accepted)."""
        self._routing_done = asyncio.Event()

    @classmethod
    def from_file(cls, path: str | Path, *, registry: Registry | None = None,
                  deliver: bool = True, storage: Storage | None = None) -> Router:
        """A router for a YAML config file (``ConfigError`` naming file and line if bad)."""
        return cls(load_config(path), registry=registry, deliver=deliver, storage=storage)

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the storage (taking back work a crashed process left), build what intake
        needs there (SQLite's dedup index: about 2.5 s a million ids) and start delivery:
        here, or in a process of its own with ``delivery.own_process``, which then opens
        the config's storage itself and loads plugins from their entry points. If delivery
        cannot start, the storage is closed again and the error raised."""
        if self._closing is not None:
            await _finished(self._closing)
        if self._open:
            raise RuntimeError("the router is already started")
        if self._storage_from_config:
            await self.loaded.open_storage(self.storage)
        else:
            await self.storage.open()
        try:
            await self.storage.prepare_intake()
        except BaseException:
            await self.storage.close()
            raise
        self._open = True
        self._watchdog.start()
        if not self._deliver:
            return
        if self.config.delivery.own_process:
            from router.delivery.process import DeliveryProcess
            self._delivery = DeliveryProcess(self.loaded, self.delivery_metrics,
                                             base_dir=self._base_dir)
        else:
            from router.delivery.service import DeliveryService
            self._delivery = DeliveryService(
                self.destinations, self.storage, egress=self.egress,
                metrics=self.delivery_metrics,
                dead_letter_retention=self.config.delivery.dead_letter_retention)
        try:
            await self._delivery.start()
        except BaseException:
            delivery, self._delivery = self._delivery, None
            await delivery.stop(grace=0)
            self._watchdog.stop()
            await self.storage.close()
            self._open = False
            raise

    @property
    def delivery_process(self) -> DeliveryProcess | None:
        """The handle on the delivery process while delivery runs in one
        (``delivery.own_process``): what ``/metrics`` reads its health and costs from."""
        from router.delivery.process import DeliveryProcess
        return self._delivery if isinstance(self._delivery, DeliveryProcess) else None

    @property
    def delivers(self) -> bool:
        """Whether this router delivers (here or in its delivery process), not only queues."""
        return self._deliver

    async def drain(self, *, timeout: float) -> bool:
        """Wait until nothing is queued for this router's destinations (delivered or
        dead-lettered), up to ``timeout`` seconds; True when their queues emptied. Work still
        queued stays in the storage. Jobs of a destination the config no longer has are
        left out: nothing here would ever deliver them, and every drain waited them out.
        ``delivery_metrics`` then count every job settled, a delivery process's
        (``own_process``) too."""
        deadline = time.monotonic() + timeout
        names = {destination.name for destination in self.destinations}
        while True:
            stats = await self.storage.stats(now=time.time())
            if not any(queue.pending for name, queue in stats.queues.items() if name in names) \
                    and (self._delivery is None or await self._delivery.counts_settled(
                        timeout=max(deadline - time.monotonic(), 0.01))):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def close(self, *, grace: float | None = None) -> None:
        """Stop delivery (in-flight requests finish within ``grace`` seconds or go back to
        the queue) and close the storage. Nothing accepted is lost. ``route()`` raises from
        the moment this is called, and a second ``close`` waits for the first. A ``close``
        that is cancelled (a second Ctrl-C, a timeout around it) is cut short, not left
        half done: delivery stops at once, the requests in flight going back to the queue,
        and the storage is still closed."""
        if self._closing is None:
            was_open, self._open = self._open, False  # from now on, route() raises
            self._closing = asyncio.ensure_future(self._close(
                was_open, self.config.server.shutdown_grace if grace is None else grace))
            self._closing.add_done_callback(self._closed)
        closing = self._closing
        try:
            await _finished(closing)
        except asyncio.CancelledError:
            closing.cancel()
            raise

    async def _close(self, was_open: bool, grace: float) -> None:
        try:
            if self._delivery is not None:
                delivery, self._delivery = self._delivery, None
                await delivery.stop(grace=grace)
        finally:
            if was_open:
                self._watchdog.stop()
                while self._routing:  # their events are in the storage's hands: answers due
                    self._routing_done.clear()
                    await self._routing_done.wait()
                await self.storage.close()

    def _closed(self, closing: asyncio.Future[None]) -> None:
        self._closing = None
        if not closing.cancelled():
            closing.exception()  # retrieved: the callers awaiting it have it

    # -- routing ----------------------------------------------------------------------------

    async def route(self, event: Mapping[str, Any] | Event, *, source: str = DEFAULT_SOURCE
                    ) -> RouteResult:
        """Route one event; returns once its work is durable."""
        (result,) = await self.route_many([event], source=source)
        return result

    async def route_many(self, events: Iterable[Mapping[str, Any] | Event], *,
                         source: str = DEFAULT_SOURCE, received_at: datetime | None = None,
                         sizes: Sequence[int] | None = None) -> list[RouteResult]:
        """Route several events with one durable write. Each is judged on its own: an invalid
        or duplicate event never costs its neighbours. ``sizes``, the sizes the 32 KB limit
        applies to when the caller has measured them (the HTTP server does), saves measuring
        them again."""
        if not self._open:
            raise RuntimeError("the router is not started: use `async with router:` or "
                               "`await router.start()` first (`plan()` needs neither)")
        received = received_at or datetime.now(UTC)
        events = list(events)
        measured: Iterable[int | None] = sizes if sizes is not None else [None] * len(events)
        sized = list(zip(events, measured, strict=True))
        self._routing += 1  # from here on, a close waits for this call's answers
        try:
            results = await self._plan_in_slices(sized, received)
            valid = [result for result in results if result.event is not None]
            if valid:
                acceptances = _acceptances(valid, source, self._queued_as)
                accepted = await self.storage.accept(acceptances, window=self.window,
                                                     now=time.time())
        finally:
            self._routing -= 1
            if not self._routing:
                self._routing_done.set()
        if valid:
            for result, is_new in zip(valid, accepted):
                if not is_new:
                    _mark_duplicate(result)
            if self._delivery is not None:  # without it, there is no one to wake
                woken = {job.destination for acceptance, is_new in zip(acceptances, accepted)
                         if is_new for job in acceptance.jobs}
                if woken:
                    self._delivery.wake(woken)
        return results

    async def _plan_in_slices(self, sized: list[tuple[Mapping[str, Any] | Event, int | None]],
                              received: datetime) -> list[RouteResult]:
        """``plan`` of every event, letting the event loop turn once ``PLAN_TURN_AFTER`` has
        passed: a batch of 2,500 events is about 250 ms of translation, which held up every
        other request, ``/health`` and delivery's wake-ups (stall audit). Counted in time,
        not events: 50 events whose body template takes its whole second each held the
        loop for 50 s."""
        results: list[RouteResult] = []
        turned = time.monotonic()
        for event, size in sized:
            results.append(self.plan(event, received_at=received, size=size))
            if time.monotonic() - turned >= PLAN_TURN_AFTER:
                await asyncio.sleep(0)
                turned = time.monotonic()
        return results

    def plan(self, event: Mapping[str, Any] | Event, *, received_at: datetime | None = None,
             size: int | None = None) -> RouteResult:
        """Decide and translate one event for every destination, touching no storage."""
        if isinstance(event, Event):
            parsed = event
            # What the last plan of this object built from it (its JSON form, its bodies)
            # must not stand for it if the caller has changed it since.
            object.__setattr__(parsed, "_shared", None)
        else:
            try:
                parsed = parse_event(event, received_at=received_at, size=size)
            except InvalidEvent as exc:
                return _invalid(event, str(exc))
            except Exception:  # noqa: BLE001 - a bug in reading one event costs only that one
                log.exception("reading an event failed (a bug: please report it)")
                return _invalid(event, "the router could not read this event (an internal "
                                       "error; the router's log has the details)")
        fields = parsed.__dict__  # read so: see parse_event
        integrations = IntegrationsMap.of(fields["integrations"])
        serialized: dict[int, tuple[Any, bytes]] = parsed.shared(_SERIALIZED, dict)
        decide = self._decide
        # A loop, not a comprehension: on Python 3.11 each makes a function an event.
        results = []
        for destination in self.destinations:
            results.append(decide(destination, parsed, integrations, serialized))
        return RouteResult(fields["messageId"], parsed, results)

    def _decide(self, destination: ConfiguredDestination, event: Event,
                integrations: IntegrationsMap,
                serialized: dict[int, tuple[Any, bytes]] | None = None) -> DestinationResult:
        """``serialized``, the event's bodies serialized so far (``_serialize``), is read
        once by ``plan`` for all the destinations; else here."""
        name = destination.name
        decision = integrations.if_on_by_default if destination.default_on else None
        if decision is None:
            decision = integrations.decide(name, default_on=destination.default_on)
        if not decision.enabled:
            return DestinationResult(name, _SKIPPED, decision.reason)
        if destination.event_filter is not None:
            reason = destination.event_filter.reason(event)
            if reason is not None:
                return DestinationResult(name, _SKIPPED, reason)
        try:
            payloads = destination.translate(event, decision.options)
            if serialized is None:
                serialized = event.shared(_SERIALIZED, dict)
            limit = destination.payload_limit
            bodies = []
            for payload in payloads:
                body = _serialize(payload.body, serialized)
                if len(body) > limit:
                    raise EventRejected(oversized(len(body), limit, destination.plugin.name))
                bodies.append(body)
        except SkipEvent as exc:
            return DestinationResult(name, Status.SKIPPED, exc.reason)
        except EventRejected as exc:  # a template's error may quote what it holds: a secret
            return DestinationResult(name, Status.INVALID, destination.masker.mask(exc.reason))
        except PLUGIN_FAILURES as exc:  # a broken plugin costs only its own events
            # The message may quote settings: masked, and no traceback (it shows values too).
            log.error("destination %s failed to translate event %s: %s", name, event.messageId,
                      destination.masker.mask(f"{type(exc).__name__}: {exc}"))
            return DestinationResult(name, Status.INVALID,
                                     f"{destination.plugin.name} failed: {type(exc).__name__}")
        if not payloads:
            return DestinationResult(name, Status.SKIPPED, "the destination sends nothing for it")
        # Positionally: keywords make a dict on their way to the dataclass's __init__.
        return DestinationResult(name, _SEND, "", payloads, bodies)

    def destination(self, name: str) -> ConfiguredDestination:
        for destination in self.destinations:
            if destination.name.lower() == name.lower():
                return destination
        raise KeyError(name)

    def requests_for(self, result: DestinationResult) -> list[HttpRequest]:
        """The requests a ``send`` result makes, one per payload (as a batch of one), built
        as delivery builds them: from each payload as it comes back from the spool (JSON
        read back, or an ``orjson.Fragment`` for ``opaque_bodies``), and checked as delivery
        checks them, so a preview never shows a request that delivery could not build."""
        if result.destination is None:
            return []
        adapter = self.destination(result.destination).adapter
        return [checked_request(adapter.build_request([from_spool(
                    body, payload.group, opaque=adapter.opaque_bodies)]))
                for payload, body in zip(result.payloads, result.bodies)]


async def _finished(closing: asyncio.Future[None]) -> None:
    """Wait for a close under way, whoever started it. A close that another caller cut
    short has finished all the same; only this task's own cancellation is raised."""
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


_SERIALIZED = "router:serialized"
"""The key of an event's bodies serialized so far (``Event.shared``), for ``_serialize``."""


def _serialize(body: Any, serialized: dict[int, tuple[Any, bytes]]) -> bytes:
    """``body`` as JSON. The event keeps its bodies serialized so far, by object
    (``serialized``, under ``_SERIALIZED``), so that a body several destinations share
    (``Event.shared``) is serialized once.

    The JSON is copied into a ``bytes`` of its own size: ``orjson.dumps`` returns its
    writing buffer, at least 4 KB however short the JSON (orjson 3.13), and a body is kept
    until its event's accept is durable, and for as long as it is queued in ``memory://``:
    a body of 500 bytes held 4,096 (tracemalloc). The buffer, freed at once, is reused by
    the next ``dumps``. ``b"%b" %`` makes the copy in a third of the time a
    ``memoryview(...).tobytes()`` takes (``bytes()`` of a ``bytes`` returns it as it is)."""
    known = serialized.get(id(body))
    if known is not None and known[0] is body:
        return known[1]
    data = b"%b" % orjson.dumps(body)
    serialized[id(body)] = (body, data)  # the body is kept, so its id is not reused
    return data


_new = object.__new__
"""``object.__new__``, which makes a ``NewJob`` or an ``Acceptance`` with its slots unset, for
``_acceptances`` to fill in."""


def _acceptances(results: Sequence[RouteResult], source: str,
                 queued_as: Mapping[str, tuple[str, bool]]) -> list[Acceptance]:
    """What the storage is to accept for each valid event: its dedup key and its jobs, one a
    payload of each destination that sends it. One plain loop for the whole batch, each
    event's fields read once, and the queued group made by adding the payload's own to the
    destination's (``_queued_as``): this runs for every job routed, and a call an event,
    and another a job to ``queued_group``, cost about 1,500 instructions an event.

    The usual job, a destination's one payload, and every ``Acceptance`` are made with
    ``object.__new__`` and their fields set here, not by calling the class: on Python 3.11
    a call of a dataclass goes through ``type_call``, a tuple of its arguments and a frame
    for ``__init__``, about 800 instructions more a job than setting its six slots here.
    With the one payload taken without a loop (the ``for`` over its one index cost about
    400 instructions a job), 16,300 -> 12,200 instructions an event for 3 destinations
    (callgrind, the batch of ``bench.callgrind_route``). Both classes are plain slotted
    dataclasses whose ``__init__`` only sets their fields; a field added to either must be
    set here too, which ``test_routing``'s test of the jobs handed to the storage checks
    (an unset slot fails its comparison)."""
    acceptances = []
    for result in results:
        event = result.event
        assert event is not None
        # the message id as the result holds it (the event's), the user key from the
        # event's __dict__: read through the event, each goes through pydantic's hook
        message_id, user_key = result.message_id or "", user_key_of(event.__dict__)
        jobs: list[NewJob] = []
        for r in result.results:
            if r.status is _SEND and r.destination:
                destination, payloads, bodies = r.destination, r.payloads, r.bodies
                group_prefix, in_order = queued_as[destination]
                if len(bodies) == 1:
                    job = _new(NewJob)  # NewJob(destination, message_id, ...), see above
                    job.destination = destination
                    job.message_id = message_id
                    job.user_key = user_key
                    job.group = group_prefix + payloads[0].group
                    job.body = bodies[0]
                    job.ordered = in_order
                    jobs.append(job)
                else:
                    for payload, body in zip(payloads, bodies):
                        jobs.append(NewJob(destination, message_id, user_key,
                                           group_prefix + payload.group, body, in_order))
        acceptance = _new(Acceptance)  # Acceptance(source, message_id, jobs), see above
        acceptance.source = source
        acceptance.message_id = message_id
        acceptance.jobs = jobs
        acceptances.append(acceptance)
    return acceptances


def _invalid(event: Any, reason: str) -> RouteResult:
    message_id = event.get("messageId") if isinstance(event, Mapping) else None
    return RouteResult(message_id if isinstance(message_id, str) else None, None,
                       [DestinationResult(None, Status.INVALID, reason)])


def duplicate_reason(message_id: str | None) -> str:
    """Why an event is a duplicate of one the storage took (a dry run says it too)."""
    return f"messageId {message_id!r} was already accepted within the dedup window"


def _mark_duplicate(result: RouteResult) -> None:
    reason = duplicate_reason(result.message_id)
    duplicates = [DestinationResult(r.destination, Status.DUPLICATE, reason)
                  for r in result.results]
    result.results = duplicates or [DestinationResult(None, Status.DUPLICATE, reason)]
