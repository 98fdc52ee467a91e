"""``DestinationWorker``: one destination's delivery, its state (all set in its
``__init__``) and its tasks. The lease loop (``run``) leases due jobs, cuts them into
batches and queues them in ``undispatched``, a round at a time, for the senders
(``_send_forever``) to take; the upkeep beside it (``_upkeep``) completes what was
delivered, renews the leases of every job the worker holds, and gives back a round held
too long; ``finish`` ends it all at a stop. What a sender does with a batch is in the
worker's bases, one concern each: ``router.delivery.service`` lists them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import operator
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence

from router.delivery import retry
from router.delivery.batching import batches, built_by
from router.delivery.clock import DeliveryClock
from router.delivery.failure_log import FailureLog
from router.delivery.health import Health
from router.delivery.outcomes import Outcomes
from router.delivery.ratelimit import RateLimiter
from router.delivery.sending import Sending
from router.delivery.telemetry import DeliveryMetrics
from router.delivery.transport import Transport
from router.destinations import ConfiguredDestination
from router.errors import StorageFull, StorageUnavailable
from router.storage.base import Failure, Job, Storage

log = logging.getLogger("router.delivery")
POLL_INTERVAL = 0.5
"""How often an idle worker looks for retries that have come due (new work wakes it at once)."""
LEASE_AHEAD = 0.25
"""Seconds of delivery, at the rate just seen, that a worker leases at once: a storage call
costs far more than a small request, so a fast destination leases many jobs a call, while a
slow one holds few (so few are sent twice after a crash, and no lease outlives its worker)."""
MAX_LEASE = 2000
MIN_LEASE = 300.0
"""Seconds a worker leases jobs for, at least (``4 × timeout`` when that is longer)."""
LEASE_TRUSTED = 0.9
"""The part of a lease within which a worker still counts a batch its own, leaving room for
the clocks of the routers that share a storage."""
COMPLETE_EVERY = 1.0
"""Seconds between two completions of delivered jobs while a round is handed out."""
STOP_POLL = 0.05
"""Seconds between two looks, while stopping, at whether requests are still under way."""
CANCEL_AGAIN_AFTER = 1.0
"""How long a cancelled task has to end (its own clean-up included) before it is cancelled
again, in case the first cancellation was lost."""


class DestinationWorker(Sending, Health, Outcomes):
    """One destination's delivery. Its state is all set here, in ``__init__``; the lease
    loop, the senders, the upkeep and ``finish`` are here too, and what a sender does with a
    batch is in its bases, by concern, each in a module of its own: ``Sending``
    (``sending``), ``Outcomes`` (``outcomes``) and ``Health`` (``health``)."""

    def __init__(self, destination: ConfiguredDestination, storage: Storage,
                 transport: Transport, metrics: DeliveryMetrics, rng: random.Random,
                 clock: DeliveryClock) -> None:
        self.destination = destination
        self.name = destination.name
        self.delivery = destination.delivery
        self.storage = storage
        self.transport = transport
        self.metrics = metrics
        self.rng = rng
        self.clock = clock
        self.failure_log = FailureLog(log)
        self.count_resend = functools.partial(metrics.resent.inc, self.name)
        """What the transport calls when it sends a request once more (made once, not for
        every request)."""
        self.limiter = RateLimiter(self.delivery.rate_limit)
        self.senders: list[asyncio.Task[None]] = []
        self.wakeup = asyncio.Event()
        """Wakes the lease loop: work was queued, jobs were delivered, the worker is stopping,
        or the senders are running out of batches (``low_water``)."""
        self.batches_queued = asyncio.Event()
        """Wakes the idle senders: batches were added to ``undispatched``."""
        self.low_water = self.delivery.concurrency
        """How few batches left in ``undispatched`` make the lease loop lease the next round:
        a batch for each sender, so they have work while the lease is taken."""
        self.stopping = False
        self.failures_in_a_row = 0
        self.throttled_in_a_row = 0
        """429s without a stated wait in a row, each resting the destination longer."""
        self.storage_trouble = False
        """Whether the last lease failed for want of storage (logged once, not each time)."""
        self.in_flight: dict[int, list[Job]] = {}
        """The batch each busy sender is sending, by sender number."""
        self.recorded: dict[int, set[int | str]] = {}
        """The ids of the jobs whose outcome is recorded, of each batch in flight (by ``id``),
        while it is: the parts of a batch being split are recorded as they are answered, so
        a stop gives back only the jobs whose fate is unknown (``finish``), and nothing is
        recorded twice (``_record``)."""
        self.all_sent = asyncio.Event()
        self.all_sent.set()
        self.settling = 0
        """Steps settling jobs outside a sender, under way (see ``_settling``)."""
        self.pacing = 0
        """Senders waiting for the rate limiter: holding a batch, not yet sending it."""
        self.delivered: list[Job] = []
        """Delivered jobs the storage has not been told of yet (see _complete_delivered)."""
        self.delivered_per_second = 0.0
        self.last_completed_at = time.monotonic()
        self.undispatched: deque[list[Job]] = deque()
        """The batches leased and cut, not yet taken by a sender, oldest first: the senders
        take them from the front, one at a time, a round of up to ``MAX_LEASE`` batches."""
        self.unreleased: list[Job] = []
        """Jobs out of attempts whose outcome the storage could neither record nor take back
        (see ``_send_again``): ``_upkeep`` gives them back to the queue once it answers."""
        self.round_leased_at = time.monotonic()
        """When the last round was leased (``_upkeep`` gives back what is left of it in
        time)."""
        self.held_users: dict[str, float] = {}
        """Users the API throttles one by one (Amplitude), until when (``clock.now()``):
        their jobs leased meanwhile wait, unsent (see ``_hold_back_throttled_users``)."""
        # Long enough that a lease never lapses under a live worker; after a crash, the
        # storage takes leases back at start (SQLite) or when they lapse (Redis).
        self.lease_for = max(MIN_LEASE, self.delivery.timeout * 4)
        self.trusted_until: dict[int, float] = {}
        """Until when (monotonic) this worker knows each batch it holds is still its own, by
        ``id``: from its lease, or the last renewal that found its lease alive. Where leases
        lapse under a live process (Redis), a batch past that is not sent (see ``_deliver``)."""

    @property
    def settled(self) -> bool:
        """Every job the storage shows settled is counted: no sender holds a batch (its
        outcomes are counted when it lets go) and no other settling step is under way."""
        return not self.in_flight and not self.settling

    def start_senders(self) -> None:
        """``concurrency`` long-lived senders take batches from ``undispatched``: cheaper
        than a task per request, and the number of requests in flight is bounded by
        construction."""
        self.senders = [asyncio.create_task(self._send_forever(number),
                                            name=f"send:{self.name}:{number}")
                        for number in range(self.delivery.concurrency)]

    async def run(self) -> None:
        """Lease due jobs, cut them into batches and queue them for the senders, a round at
        a time; waits while more than ``low_water`` batches are left."""
        upkeep = asyncio.create_task(self._upkeep(), name=f"upkeep:{self.name}")
        try:
            await self._lease_and_hand_out()
        finally:
            await ended([upkeep])

    async def _lease_and_hand_out(self) -> None:
        while not self.stopping:
            self.failure_log.flush()
            try:
                await self._complete_delivered()
                leased_at = time.monotonic()
                jobs = await self._lease()
            except (StorageFull, StorageUnavailable) as exc:
                # Said once, not every two seconds for as long as the storage is down.
                if not self.storage_trouble:
                    log.warning("destination %s: cannot lease work or record deliveries, "
                                "trying again every %g s until the storage answers: %s",
                                self.name, POLL_INTERVAL * 4, exc)
                self.storage_trouble = True
                await self._sleep(POLL_INTERVAL * 4)
                continue
            except Exception:  # noqa: BLE001 - storage trouble: wait and try again
                log.exception("destination %s: cannot lease work", self.name)
                await self._sleep(POLL_INTERVAL * 4)
                continue
            if self.storage_trouble:
                log.warning("destination %s: leasing work again", self.name)
                self.storage_trouble = False
            if not jobs:
                await self._sleep(POLL_INTERVAL)
                continue
            with self._settling():
                jobs = await self._set_aside_built_by_others(jobs)
                jobs = await self._give_up_on_the_too_old(jobs)
            jobs = await self._hold_back_throttled_users(jobs)
            leased = batches(jobs, self.delivery, group=_group_of, size=_size_of,
                             sizes=_sizes_of)
            if self.storage.leases_lapse:  # else never read (``_lease_lapsed``): not kept
                for batch in leased:
                    self.trusted_until[id(batch)] = leased_at + LEASE_TRUSTED * self.lease_for
            self.undispatched += leased
            self.batches_queued.set()
            self.round_leased_at = time.monotonic()
            # The senders wake this loop once they leave ``low_water`` batches or fewer.
            while len(self.undispatched) > self.low_water and not self.stopping:
                await self._sleep(None)

    async def _set_aside_built_by_others(self, jobs: list[Job]) -> list[Job]:
        """Jobs whose payloads another plugin built (the config changed while they were
        queued: a destination's plugin swapped, two destinations' names swapped) are never
        sent: the plugin would put them in a request its API does not take (config audit:
        Amplitude's events posted to Mixpanel, a webhook's bodies, with a token its template
        had put in, to Segment's batch API). They go to the dead letters, noted as built by
        no plugin, so that ``router dlq replay`` sends them as they are, if the operator
        means to."""
        mine = self.destination.plugin.name
        # Judged by group, not job by job: a lease holds few groups, and nearly always only
        # this plugin's.
        if all(built_by(group)[0] in (None, mine) for group in {job.group for job in jobs}):
            return jobs
        kept: list[Job] = []
        by_plugin: dict[str, list[Job]] = {}
        for job in jobs:
            plugin, own_group = built_by(job.group)
            if plugin is None or plugin == mine:
                kept.append(job)
            else:
                by_plugin.setdefault(plugin, []).append(dataclasses.replace(job, group=own_group))
        for plugin, built in by_plugin.items():
            reason = (f"built by the {plugin} plugin, which this destination no longer uses "
                      f"(it is {mine} now); not sent: `router dlq replay` sends it as it is")
            try:
                await self.storage.dead_letter(built, now=self.clock.now(),
                                               failure=Failure(reason))
            except Exception as exc:  # noqa: BLE001 - full, locked: leased again later
                log.warning("destination %s: cannot move %d job(s) built by the %s plugin to "
                            "the dead letters, trying again later: %s", self.name, len(built),
                            plugin, exc)
                with contextlib.suppress(Exception):  # else they wait for the next start
                    await self.storage.release([job.id for job in built])
                continue
            self.metrics.dead_lettered.inc(self.name, amount=len(built))
            log.warning("destination %s: %d queued job(s) were built by the %s plugin, not "
                        "by %s: moved to the dead letters unsent", self.name, len(built),
                        plugin, mine)
        return kept

    async def _give_up_on_the_too_old(self, jobs: list[Job]) -> list[Job]:
        """Jobs already older than ``max_age`` go to the dead letters unsent. It was checked
        only after a failed attempt: behind a destination down for hours, jobs never tried
        waited their turn, and when it came back they were sent hours past ``max_age``,
        past the windows it keeps events within (GA4's 72 h, Meta's 7 days; time audit)."""
        now = self.clock.now()
        max_age = self.delivery.max_age
        # An age is never more than the wall time since acceptance: only jobs accepted
        # before ``now - max_age`` can be too old, and only they are aged (every lease).
        maybe = now - max_age
        too_old = [job for job in jobs if job.created_at < maybe
                   and self.clock.age(job.created_at, now) > max_age]
        if not too_old:
            return jobs
        failure = Failure(retry.too_old(self.delivery, "it could be sent") + "; not sent")
        try:
            await self.storage.dead_letter(too_old, now=now, failure=failure)
        except Exception as exc:  # noqa: BLE001 - full, locked: sent now rather than stuck
            log.warning("destination %s: cannot move %d job(s) older than max_age to the "
                        "dead letters; sending them: %s", self.name, len(too_old), exc)
            return jobs
        self.metrics.dead_lettered.inc(self.name, amount=len(too_old))
        for job in too_old:
            self._log_failure(job, failure, "dead_letter")
        gone = {job.id for job in too_old}
        return [job for job in jobs if job.id not in gone]

    async def _upkeep(self) -> None:
        """Beside ``run``, every ``COMPLETE_EVERY`` seconds: complete what the senders
        delivered, and once half the lease of the last round has passed, give back to the
        queue the batches no sender has taken yet. A destination that slowed down after a
        large lease, taken while it was fast, would otherwise hold them, and its deliveries
        uncompleted, past the lease: Redis then hands them to another router, which sends
        them again. A task of its own, not a timeout on each batch taken, which would cost
        every request its price."""
        failing = False
        renewed_at = time.monotonic()
        while True:
            await asyncio.sleep(COMPLETE_EVERY)
            if time.monotonic() - renewed_at >= self.lease_for / 4:
                renewed_at = time.monotonic()
                await self._renew_leases()
            if time.monotonic() - self.last_completed_at >= COMPLETE_EVERY:
                try:
                    await self._complete_delivered()
                except Exception as exc:  # noqa: BLE001 - kept, and completed next time
                    if not failing:  # once, not every second of an outage
                        log.warning("destination %s: cannot record deliveries yet, trying "
                                    "again every %g s: %s", self.name, COMPLETE_EVERY, exc)
                    failing = True
                else:
                    failing = False
            if self.unreleased:
                await self._give_back_unreleased()
            if self.undispatched and \
                    time.monotonic() - self.round_leased_at > self.lease_for / 2:
                await self._give_back_undispatched()

    async def _give_back_undispatched(self) -> None:
        """Put the batches no sender has taken back in the queue, then have the lease loop
        lease again, as much as the rate now seen calls for."""
        given_back = list(self.undispatched)
        self.undispatched.clear()  # taken from the senders before the wait below
        ids = [job.id for batch in given_back for job in batch]
        try:  # shielded: a stop must not leave them neither queued nor held
            await asyncio.shield(self.storage.release(ids))
        except Exception as exc:  # noqa: BLE001 - kept, and sent by this worker
            log.warning("destination %s: cannot put %d job(s) back in the queue, "
                        "sending them here: %s", self.name, len(ids), exc)
            self.undispatched.extendleft(reversed(given_back))
            self.batches_queued.set()
            self.round_leased_at = time.monotonic()
        else:
            for batch in given_back:
                self.trusted_until.pop(id(batch), None)
        self.wakeup.set()

    async def _renew_leases(self) -> None:
        """Extend the leases of every job this worker holds: a destination that keeps its
        senders waiting (a long ``Retry-After``, a rest after failures) would otherwise hold
        them past the lease, and another router would send them again."""
        batches_held = [*self.undispatched, *self.in_flight.values()]
        held = [job.id for batch in batches_held for job in batch]
        held += [job.id for job in self.delivered]
        asked_at = time.monotonic()
        try:
            await self.storage.renew(held, now=self.clock.now(), lease_for=self.lease_for)
        except Exception as exc:  # noqa: BLE001 - tried again at the next renewal
            log.warning("destination %s: cannot renew the leases of %d job(s): %s",
                        self.name, len(held), exc)
            return
        # A renewal extends only the leases still alive when it was asked for: one that had
        # lapsed may be another router's job now, whatever this one renews.
        for batch in batches_held:
            if self.trusted_until.get(id(batch), 0.0) >= asked_at:
                self.trusted_until[id(batch)] = asked_at + LEASE_TRUSTED * self.lease_for

    async def _send_forever(self, number: int) -> None:
        """One sender: a batch at a time, from the front of ``undispatched``, until
        cancelled by ``finish``; none once the worker is stopping (``finish`` gives them
        back)."""
        while True:
            while not self.undispatched or self.stopping:
                self.batches_queued.clear()
                await self.batches_queued.wait()
            batch = self.undispatched.popleft()
            if len(self.undispatched) == self.low_water:
                # The lease loop waits for this (see ``run``): it leases the next round
                # while the senders work through these. Once, as the batches left fall past
                # the mark, one at a time (``_upkeep``, which takes them all, wakes it too).
                self.wakeup.set()
            self.in_flight[number] = batch
            self.all_sent.clear()
            try:
                await self._deliver(batch)
            except Exception:  # noqa: BLE001 - a bug here must not stop the sender
                log.exception("destination %s: delivery failed", self.name)
                await self._retry_after_a_bug(batch)
            finally:
                del self.in_flight[number]
                if self.trusted_until:  # kept only where leases lapse
                    self.trusted_until.pop(id(batch), None)
                if not self.in_flight:
                    self.all_sent.set()
            self.recorded.pop(id(batch), None)  # kept when cancelled: ``finish`` reads it

    async def finish(self, grace: float) -> None:
        """After ``run`` has ended: wait up to ``grace`` for requests in flight, record what
        they delivered, then put every job this worker still holds, whose outcome is not
        recorded, back in the queue."""
        leftover = [job for batch in self.undispatched for job in batch]
        self.undispatched.clear()  # and ``stopping`` keeps the senders from taking more
        # Wait for the requests under way, not for senders held by the rate limiter: a
        # destination resting after failures, or throttled, would otherwise hold every
        # stop for its whole grace (past Kubernetes' 30 s, at the default).
        deadline = time.monotonic() + grace
        while (not self.all_sent.is_set() and len(self.in_flight) > self.pacing
               and time.monotonic() < deadline):
            try:
                await asyncio.wait_for(self.all_sent.wait(),
                                       min(STOP_POLL, deadline - time.monotonic()))
            except TimeoutError:
                pass
        in_flight = list(self.in_flight.values())
        await ended(self.senders)
        # Of a batch being split, the parts already answered are recorded (those delivered
        # are completed below): only the jobs whose fate is unknown go back, or a half
        # answered 200 would be sent again after the restart.
        leftover += [job for batch in in_flight for job in batch
                     if job.id not in self.recorded.get(id(batch), ())]
        # And what a sender queued to send again meanwhile (``_send_again``: the storage
        # could neither record nor take it back then), which no sender takes now.
        leftover += [job for batch in self.undispatched for job in batch]
        self.recorded.clear()
        self.undispatched.clear()
        self.trusted_until.clear()
        self.failure_log.flush(all_windows=True)
        await self._complete_delivered()
        if leftover:
            await self.storage.release([job.id for job in leftover])

    async def _sleep(self, seconds: float | None) -> None:
        """Until ``wakeup`` is set, or ``seconds`` have passed (None: no limit)."""
        try:
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        except TimeoutError:
            pass
        self.wakeup.clear()

    async def _lease(self) -> list[Job]:
        """Due jobs, as many as ``_lease_size`` says (the next lease is taken while the
        senders work through the last ``low_water`` batches); a partial batch waits up to
        ``batch_wait`` for company so a quiet stream still goes out promptly."""
        delivery = self.delivery
        limit = self._lease_size()
        jobs = await self._lease_more(limit)
        if jobs and delivery.batch_size > 1 and len(jobs) < delivery.batch_size:
            # What is left of the oldest job's wait, counted from here on the monotonic
            # clock: a wall-clock deadline stepped back an hour held the batch an hour.
            oldest = min(job.created_at for job in jobs)
            waited = self.clock.age(oldest, self.clock.now())
            deadline = time.monotonic() + min(delivery.batch_wait, delivery.batch_wait - waited)
            # What was delivered meanwhile is completed by ``_upkeep``, every second: here,
            # a completion that failed would drop the jobs already leased.
            while len(jobs) < delivery.batch_size and not self.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._sleep(remaining)
                try:
                    jobs += await self._lease_more(limit - len(jobs))
                except Exception as exc:  # noqa: BLE001 - storage trouble: keep what we hold
                    # Dropped here, the jobs already leased would wait out their lease
                    # (minutes) under this live worker; sent now, they are not held back.
                    log.warning("destination %s: cannot lease more work (%s); sending the "
                                "%d job(s) already leased", self.name, exc, len(jobs))
                    break
        return jobs

    def _lease_size(self) -> int:
        """A round (a batch for each sender), or more when the destination takes them fast."""
        round_size = self.delivery.batch_size * self.delivery.concurrency
        return max(round_size, min(MAX_LEASE, int(self.delivered_per_second * LEASE_AHEAD)))

    async def _lease_more(self, limit: int) -> list[Job]:
        # Every storage hides a job while it is leased (tests/test_storage.py checks it), so
        # what comes back is never a job this worker already holds.
        return await self.storage.lease(self.name, limit, now=self.clock.now(),
                                        lease_for=self.lease_for, ordered=self.delivery.ordered,
                                        hold_attempts=self.delivery.order_hold_attempts)


_group_of = operator.attrgetter("group")
"""A job's group, read in C by ``batches`` (a lease's jobs are grouped in one ``map``)."""


def _size_of(job: Job) -> int:
    return len(job.body)


_body_of = operator.attrgetter("body")


def _sizes_of(jobs: Sequence[Job]) -> Iterable[int]:
    """``_size_of`` of each of ``jobs``, read in C (see ``batches``' ``sizes``)."""
    return map(len, map(_body_of, jobs))


async def ended(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again while one has not:
    a library may swallow a cancellation (redis-py's connection pool was seen handing back a
    connection to a task cancelled while it waited), and a loop that went on would then hold
    the stop for good."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_AFTER)
