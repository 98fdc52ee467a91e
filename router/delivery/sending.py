"""One batch's way out: ``Sending``. A sender's batch (``_deliver``) is built into a request,
waits for the rate limiter, is checked to be still this worker's (``_lease_lapsed``), and
goes (``_send``); the answer is judged, an outcome per job (``_judge``), and a batch refused
whole is split to find the events at fault (``_attempt``, ``_split``). What each job got is
recorded by ``Outcomes``, and what the answers say of the destination's health is noted by
``Health``: this class's bases."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from router.delivery import retry
from router.delivery.batching import all_from_spool, built_by
from router.delivery.clock import DeliveryClock
from router.delivery.health import Health
from router.delivery.outcomes import DELIVERED, Outcomes
from router.delivery.ratelimit import RateLimiter
from router.delivery.telemetry import DeliveryMetrics
from router.delivery.transport import EgressRefused, Transport
from router.destination import (DeliveryDefaults, HttpRequest, HttpResponse, Outcome, Payload,
                                checked_outcomes, checked_request)
from router.destinations import ConfiguredDestination
from router.errors import PLUGIN_FAILURES, DestinationError, PermanentError, RetryableError
from router.redaction import Masker
from router.storage.base import Failure, Job, Storage

log = logging.getLogger("router.delivery")
MAX_RESPONSE_IN_DEAD_LETTER = 2048
SPLIT_STATUSES = frozenset({400, 413, 422})
"""Answers that refuse a batch whole; splitting finds the event at fault (413: the size)."""


class Sending(Health, Outcomes):
    """A batch sent, and its answer judged, an outcome for each of its jobs."""

    # The worker's state they use, which ``DestinationWorker.__init__`` sets and describes:
    destination: ConfiguredDestination
    name: str
    delivery: DeliveryDefaults
    storage: Storage
    transport: Transport
    metrics: DeliveryMetrics
    clock: DeliveryClock
    count_resend: partial[None]
    limiter: RateLimiter
    pacing: int
    trusted_until: dict[int, float]

    async def _deliver(self, batch: list[Job]) -> None:
        now = self.clock.now()
        for job in batch:
            job.attempts += 1
            job.first_attempt_at = job.first_attempt_at or now
        try:
            # A single job cannot be split: its request goes without ``_attempt``'s layer, a
            # coroutine fewer on every request of a one-event-a-request destination.
            outcomes = ((await self._send(batch, leased_as=None)).results if len(batch) == 1
                        else await self._attempt(batch))
        except _LeaseLapsed:
            return
        self._note_health(batch, outcomes)
        await self._record(batch, outcomes)

    def _lease_lapsed(self, batch: list[Job]) -> bool:
        """Whether this process stalled (stopped, its VM paused, swapping) past the lease of
        a batch it held, on a storage where another router then takes the job over: sent
        now, the batch would follow that router's copy and the same users' later events,
        out of order for an ordered destination (scale-out audit). Not sent, it is left to
        whoever leases it, this worker included, and its outcome to theirs."""
        if not self.storage.leases_lapse or \
                time.monotonic() <= self.trusted_until.get(id(batch), math.inf):
            return False
        log.warning("destination %s: %d job(s) held past their lease (this process stalled): "
                    "not sent, left to the router that leases them again", self.name,
                    len(batch))
        return True

    async def _attempt(self, batch: list[Job], *, leased_as: list[Job] | None = None
                       ) -> list[tuple[Outcome, Failure | None]]:
        """Send a batch (or a part of ``leased_as``, the batch being split); one outcome per
        job.

        One bad event must not cost its neighbours: a batch refused whole (413, or a 400/422
        the plugin could not pin on particular events) is split in two and each half sent.
        If both halves are refused whole too, the fault is not in an event (a bad key, say)
        and splitting stops; otherwise the refused half is split again, down to the event.
        Events the plugin's judgement names are never sent again: the API said which they
        are, and would only refuse them once more."""
        sent = await self._send(batch, leased_as=leased_as)
        if len(batch) > 1 and sent.refused is not None:
            return await self._split(batch, sent.refused, always=sent.always,
                                     leased_as=leased_as)
        return sent.results

    async def _send(self, batch: list[Job], *, leased_as: list[Job] | None) -> _Sent:
        """One request for ``batch``, never split: what each job got, and whether splitting
        the batch could find the events at fault (see ``_Sent``)."""
        adapter = self.destination.adapter
        # A batch is of one queued group (``batches``), so its plugin's group is read once.
        group, opaque = built_by(batch[0].group)[1], adapter.opaque_bodies
        try:
            payloads = all_from_spool([job.body for job in batch], group, opaque=opaque)
            request = checked_request(adapter.build_request(payloads))
        except DestinationError as exc:
            # One outcome for every event, so none is at fault beside the others: a
            # ``caused_by_others`` is an ordinary retry (it went round for ever, uncounted).
            outcome = _caused_by_others_beside_a_culprit(
                [exc if isinstance(exc, RetryableError) else PermanentError(exc.reason)])[0]
            return _Sent([(outcome, Failure(self.destination.masker.mask(exc.reason)))]
                         * len(batch))
        except PLUGIN_FAILURES as exc:  # a broken plugin fails its own jobs only
            failed = f"{self.destination.plugin.name} failed to build a request"
            if len(batch) == 1:  # else perhaps one event's fault: split to find it
                self._log_plugin_failure(failed, exc)
            reason = f"{failed}: {type(exc).__name__}"
            return _Sent([(PermanentError(reason), Failure(reason))] * len(batch),
                         refused="", always=True)

        if not self.limiter.free():  # else nothing to wait for, and no coroutine made for it
            await self._wait_for_the_limiter(counted=leased_as is None)
        if self._lease_lapsed(leased_as or batch):  # just before it goes, after any wait
            raise _LeaseLapsed
        started, status = time.monotonic(), "error"
        try:
            response = await self.transport.send(request, timeout=self.delivery.timeout,
                                                 on_resend=self.count_resend)
            status = str(response.status)
        except DestinationError as exc:
            if isinstance(exc, EgressRefused):
                status = "egress_refused"
            return _Sent([(exc, self._failure(exc.reason, request, None))] * len(batch))
        finally:
            self._count_request(status, started)

        outcomes, named = self._judge(payloads, request, response)
        if outcomes.count(None) == len(outcomes):  # all delivered
            return _Sent([DELIVERED] * len(outcomes))
        refused = None
        if all(isinstance(outcome, PermanentError) for outcome in outcomes) and (
                response.status == 413 or response.status in SPLIT_STATUSES and not named):
            refused = self._shown_body(request, response)
        failure = self._failure(f"HTTP {response.status}", request, response)
        # Each failed job's reason is its own (a plugin names why each event failed).
        masker = self._masker_of(request)
        return _Sent([(outcome, None if outcome is None else
                       dataclasses.replace(failure, reason=masker.mask(outcome.reason)))
                      for outcome in outcomes],
                     refused=refused, always=response.status == 413)

    def _count_request(self, status: str, started: float) -> None:
        """Count a request and its time whatever became of it: one that timed out or went
        unanswered (``error``), or the p99 would look healthy exactly while the destination
        hangs; and one a stop abandoned (``error`` too, as it got no answer), which the
        destination may have received like any other."""
        self.metrics.request_seconds.observe(time.monotonic() - started, self.name)
        self.metrics.requests.inc(self.name, status)

    async def _wait_for_the_limiter(self, *, counted: bool) -> None:
        """Wait until the destination's rate limit and rest let a request go. A stop does not
        wait for the senders ``counted`` here (``pacing``). A part of a batch being split is
        not counted: the batch is under way, and the stop lets it finish within its grace,
        then gives back only the parts not answered yet (``finish``)."""
        if counted:
            self.pacing += 1
        try:
            await self.limiter.acquire()
        finally:
            if counted:
                self.pacing -= 1

    async def _split(self, batch: list[Job], refused: str | None, *, always: bool,
                     leased_as: list[Job] | None) -> list[tuple[Outcome, Failure | None]]:
        """Send each half of a batch refused whole. When both halves are refused whole with
        the very answer the batch got (``refused``, as a dead letter shows it), the fault is
        not in any one event (a bad key, say), so splitting stops rather than send a request
        per event; ``always`` (a 413, a request the plugin could not build) splits on.

        Each half's outcome is recorded as soon as it is known, not once the whole batch is
        done: a stop while the rest waits (for a ``Retry-After`` the destination got, say)
        then gives back only what was not answered, and a ``Retry-After`` counts from its
        own answer."""
        whole = leased_as or batch
        middle = len(batch) // 2
        halves = [batch[:middle], batch[middle:]]
        if always:
            results = []
            for half in halves:
                results.append(await self._attempt(half, leased_as=whole))
                await self._record(half, results[-1], of=whole)
            return [item for result in results for item in result]
        sent = []
        for half in halves:
            sent.append(answer := await self._send(half, leased_as=whole))
            if answer.refused is None or len(half) == 1:  # never split again
                await self._record(half, answer.results, of=whole)
        alike = all(answer.refused is not None and answer.refused == refused
                    and not answer.always for answer in sent)
        outcomes: list[tuple[Outcome, Failure | None]] = []
        for half, answer in zip(halves, sent):
            if answer.refused is not None and len(half) > 1 and not alike:
                # The other half got through, or was refused otherwise: the fault is in
                # events, so no answer stops this half's split (``refused`` None).
                outcomes += await self._split(half, None, always=False, leased_as=whole)
            else:
                await self._record(half, answer.results, of=whole)
                outcomes += answer.results
        return outcomes

    def _judge(self, payloads: list[Payload], request: HttpRequest, response: HttpResponse
               ) -> tuple[list[Outcome], bool]:
        """One outcome per payload: the plugin's judgement when it gives one, else the
        status's; and whether the plugin named events, judging them one by one (see
        ``_names_events``). A throttle of the whole destination pauses it (Vector #4724's lesson:
        backing off one request while sending others only prolongs the throttling): a 429
        or 503 with ``Retry-After``, or what the plugin read as one (Meta answers 400 with an
        error code, and the wait in a usage header); an answer saying the API's rate-limit
        window has no request left (``X-RateLimit-Remaining: 0``); a 429 that states no wait
        (``_rest_after_throttle``)."""
        now = self.clock.now()
        try:
            judged = self.destination.adapter.read_response(payloads, response)
            if judged is not None:
                judged = checked_outcomes(judged, len(payloads))
        except PLUGIN_FAILURES as exc:  # fall back to the status when the plugin breaks
            self._log_plugin_failure(f"read_response failed; judging HTTP {response.status} "
                                     "by its status instead", exc)
            judged = None
        if judged is None and 200 <= response.status < 300:
            # Delivered, by its status: the usual answer, with nothing to weigh but a spent
            # rate-limit window (no wait, throttle or rest comes of a success).
            if (spent := retry.budget_spent(response.headers, now=now)) is not None:
                self.limiter.pause(spent)
            return [None] * len(payloads), False
        if judged is not None:
            outcomes = _caused_by_others_beside_a_culprit(
                _with_the_stated_wait(judged, response.headers, now=now))
        else:
            outcomes = [retry.classify_status(response.status, response.headers,
                                              self.delivery.retry_on, now=now,
                                              body=response.body,
                                              mask=lambda text: self._masker_of(request).mask(text))
                        ] * len(payloads)
        throttled = response.status in (429, 503)
        waits = [] if None in outcomes else [  # none when an event got through
            o.retry_after for o in outcomes if isinstance(o, RetryableError) and o.retry_after
            and (throttled if o.pause_destination is None else o.pause_destination)]
        if waits and len(waits) == len(outcomes):
            self.limiter.pause(min(max(waits), retry.MAX_RETRY_AFTER))
        elif (spent := retry.budget_spent(response.headers, now=now)) is not None:
            self.limiter.pause(spent)  # the window's last request: rest until it resets
        elif response.status == 429 and all(
                isinstance(o, RetryableError) and o.retry_after is None
                and o.pause_destination is not False for o in outcomes):
            self._rest_after_throttle()
        return outcomes, judged is not None and _names_events(outcomes)

    def _log_plugin_failure(self, what: str, exc: BaseException) -> None:
        """One line, the plugin's message masked and no traceback: it may quote settings."""
        log.error("destination %s: %s: %s", self.name, what,
                  self.destination.masker.mask(f"{type(exc).__name__}: {exc}"))

    def _failure(self, reason: str, request: HttpRequest, response: HttpResponse | None
                 ) -> Failure:
        masker = self.destination.masker
        shown_request = {"method": request.method, "url": masker.mask_url(request.url),
                         "headers": masker.mask_headers(request.headers)}
        if response is None:
            return Failure(masker.mask(reason), None, shown_request, None)
        return Failure(masker.mask(reason), response.status, shown_request,
                       self._shown_body(request, response))

    def _shown_body(self, request: HttpRequest, response: HttpResponse) -> str:
        """The start of a response body, secrets masked: what a dead letter keeps."""
        return self._masker_of(request).mask(
            response.body[:MAX_RESPONSE_IN_DEAD_LETTER].decode("utf-8", errors="replace"))

    def _masker_of(self, request: HttpRequest) -> Masker:
        """The destination's masker, also hiding the credentials ``request`` carried (its
        credential headers and query values): an API may quote them back in its error.
        Only for a failure: a delivered request needs none."""
        return self.destination.masker.with_credentials_of(request.headers, request.url)


def _caused_by_others_beside_a_culprit(judged: list[Outcome]) -> list[Outcome]:
    """``RetryableError.caused_by_others`` holds only beside an event of the same answer that
    failed for its own sake. Were every failed event so marked (a request refused whole, its
    culprit unnamed), they would go again at once, attempt after attempt, none counted: then
    they are ordinary retries."""
    if not any(_for_others(outcome) for outcome in judged) or any(
            outcome is not None and not _for_others(outcome) for outcome in judged):
        return judged  # the usual case, none so marked, in one pass
    return _reissued(judged, _for_others, caused_by_others=False)


def _with_the_stated_wait(judged: list[Outcome], headers: Mapping[str, str], *, now: float
                          ) -> list[Outcome]:
    """A plugin's ``RetryableError`` that gives no wait takes the answer's ``Retry-After``
    (seconds or an HTTP-date), as the core's own judgement would: a plugin need not read the
    header itself (two built-ins did, each reading only the seconds form)."""
    if not any(isinstance(o, RetryableError) and o.retry_after is None for o in judged):
        return judged
    wait = retry.retry_after(headers, now=now)
    if wait is None:
        return judged
    return _reissued(judged, lambda outcome: outcome.retry_after is None, retry_after=wait)


def _for_others(outcome: Outcome) -> bool:
    return isinstance(outcome, RetryableError) and outcome.caused_by_others


def _reissued(judged: list[Outcome], which: Callable[[RetryableError], bool],
              **changes: Any) -> list[Outcome]:
    """``judged`` with each ``RetryableError`` that ``which`` picks made again with
    ``changes``. An outcome given to several events stays one object, which
    ``_names_events`` relies on."""
    again: dict[int, Outcome] = {}
    for outcome in judged:
        if isinstance(outcome, RetryableError) and id(outcome) not in again \
                and which(outcome):
            again[id(outcome)] = RetryableError(outcome.reason, **{
                "retry_after": outcome.retry_after,
                "pause_destination": outcome.pause_destination,
                "caused_by_others": outcome.caused_by_others, **changes})
    return [again.get(id(outcome), outcome) for outcome in judged] if again else judged


def _names_events(judged: list[Outcome]) -> bool:
    """Whether a plugin's judgement names events: outcomes made one by one (Mixpanel's
    refused records, Braze's refused objects), final even when every event is refused, as
    splitting the batch would only have each refused again by name. One outcome given to
    every event (``[PermanentError(reason)] * len(payloads)``, Meta's error for a request it
    refuses whole) judges the request, as the status does, and a 400 or 422 so judged is
    split to find the event at fault."""
    return any(outcome is not judged[0] for outcome in judged)


# Not frozen: one is made every request, and a frozen dataclass's __init__ sets each of its
# fields through a call to object.__setattr__.
@dataclasses.dataclass(slots=True)
class _Sent:
    """What one request made of a batch (``DestinationWorker._send``)."""

    results: list[tuple[Outcome, Failure | None]]
    """An outcome per job, each failure with its ``Failure``."""
    refused: str | None = None
    """How the batch was refused whole, when splitting it could find the events at fault:
    the answer as a dead letter shows it ("" for a request the plugin could not build). Set
    for a 413, and for a 400 or 422 judged by its status or by one outcome for every event;
    None when any event got through, or the plugin named the events it refused."""
    always: bool = False
    """Split whatever the halves get: the batch was too large (413), or the plugin could not
    build its request (perhaps for one event)."""


class _LeaseLapsed(Exception):
    """A batch's lease lapsed while it waited for the rate limiter: nothing is recorded."""
