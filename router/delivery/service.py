"""The delivery service: one worker per destination, sharing one transport.

Each worker leases due jobs of its destination from the storage, groups them into batches
within the plugin's limits, sends them (bounded concurrency, rate limit, pause on throttling),
and records each job's fate: delivered, retried later, or dead-lettered. Destinations share
nothing but the storage and the connection pool, so one that hangs or fails cannot hold back
the others; its backlog waits on disk, and only a bounded number of its jobs are in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence

from router.delivery import retry
from router.delivery.batching import batches, built_by, from_spool
from router.delivery.clock import DeliveryClock
from router.delivery.egress import EgressPolicy
from router.delivery.failure_log import FailureLog
from router.delivery.ratelimit import RateLimiter
from router.delivery.telemetry import DeliveryMetrics
from router.delivery.transport import EgressRefused, Transport
from router.destination import (HttpRequest, HttpResponse, Outcome, Payload, checked_outcomes,
                                checked_request)
from router.destinations import ConfiguredDestination
from router.errors import (PLUGIN_FAILURES, DestinationError, PermanentError, RetryableError,
                           StorageFull, StorageUnavailable)
from router.redaction import Masker
from router.storage.base import DeadLetterFilter, Failure, Job, Storage

log = logging.getLogger("router.delivery")
POLL_INTERVAL = 0.5
"""How often an idle worker looks for retries that have come due (new work wakes it at once)."""
LEASE_AHEAD = 0.25
"""Seconds of delivery, at the rate just seen, that a worker leases at once: a storage call
costs far more than a small request, so a fast destination leases many jobs a call, while a
slow one holds few (so few are sent twice after a crash, and no lease outlives its worker)."""
MAX_LEASE = 2000
MAX_RESPONSE_IN_DEAD_LETTER = 2048
FAILURES_BEFORE_PAUSE = 3
"""Batches whose first attempts all failed, in a row, before the whole destination rests."""
RETENTION_INTERVAL = 600.0
"""Seconds between two deletions of dead letters past their retention."""
UNRECORDED_PAUSE = 5.0
"""Seconds a destination rests after the storage could not record what became of a batch
(a full disk, an unreachable Redis): its jobs go back to the queue."""
MIN_LEASE = 300.0
"""Seconds a worker leases jobs for, at least (``4 × timeout`` when that is longer)."""
HELD_BACK = ("not sent: the destination throttles this event's user, whose other events "
             "wait until the throttle ends")
LEASE_TRUSTED = 0.9
"""The part of a lease within which a worker still counts a batch its own, leaving room for
the clocks of the routers that share a storage."""
COMPLETE_EVERY = 1.0
"""Seconds between two completions of delivered jobs while a round is handed out."""
STOP_POLL = 0.05
"""Seconds between two looks, while stopping, at whether requests are still under way."""
SPLIT_STATUSES = frozenset({400, 413, 422})
"""Answers that refuse a batch whole; splitting finds the event at fault (413: the size)."""
CANCEL_AGAIN_AFTER = 1.0
"""How long a cancelled task has to end (its own clean-up included) before it is cancelled
again, in case the first cancellation was lost."""
CUT_SHORT_WAIT = 5.0
"""How long a stop that is cancelled still takes to give back what its workers hold."""


class DeliveryService:
    def __init__(self, destinations: Sequence[ConfiguredDestination], storage: Storage, *,
                 egress: EgressPolicy, metrics: DeliveryMetrics | None = None,
                 rng: random.Random | None = None, clock: DeliveryClock | None = None,
                 dead_letter_retention: float | None = None) -> None:
        self.storage = storage
        self.metrics = metrics or DeliveryMetrics(d.name for d in destinations)
        self.transport = Transport(egress, connections=sum(
            destination.delivery.concurrency for destination in destinations))
        rng = rng or random.Random()
        clock = clock or DeliveryClock()
        self.workers = {d.name: DestinationWorker(d, storage, self.transport, self.metrics, rng,
                                                  clock)
                        for d in destinations}
        self.dead_letter_retention = dead_letter_retention
        self._tasks: list[asyncio.Task[None]] = []
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.storage.claim_delivery()
        await self.transport.start()
        self._tasks = [asyncio.create_task(worker.run(), name=f"lease:{name}")
                       for name, worker in self.workers.items()]
        for worker in self.workers.values():
            worker.start_senders()
        if self.dead_letter_retention is not None:
            self._housekeeping = asyncio.create_task(
                self._forget_old_dead_letters(self.dead_letter_retention),
                name="dead-letter retention")

    async def _forget_old_dead_letters(self, retention: float) -> None:
        """Delete dead letters older than ``retention`` now and then: a destination that stays
        down dead-letters everything routed to it, and those rows count against the disk
        budget, which, once spent, makes intake refuse events for every destination."""
        while True:
            try:
                purged = await self.storage.purge(
                    DeadLetterFilter(until=time.time() - retention))
                if purged:
                    log.info("deleted %d dead letter(s) older than %g s "
                             "(delivery.dead_letter_retention)", purged, retention)
            except Exception:  # noqa: BLE001 - retried at the next round, never fatal
                log.warning("deleting old dead letters failed", exc_info=True)
            await asyncio.sleep(RETENTION_INTERVAL)

    def wake(self, destinations: Iterable[str]) -> None:
        """New work was queued for these destinations: look now rather than at the next poll."""
        for name in destinations:
            worker = self.workers.get(name)
            if worker is not None:
                worker.wakeup.set()

    async def _cut_short(self) -> None:
        """What a cancelled ``stop`` still does, in a few seconds at most: stop leasing and
        sending, record what was delivered, and give every job held back to the queue at
        once (on Redis they would otherwise wait out their leases, five minutes or more)."""
        self.cut_stop_short()
        try:
            async with asyncio.timeout(CUT_SHORT_WAIT):
                await ended(self._tasks)
                await asyncio.gather(*(worker.finish(0.0) for worker in self.workers.values()),
                                     return_exceptions=True)
        except TimeoutError:
            log.warning("delivery stopped at once; the jobs it held go back to the queue when "
                        "their leases end")

    async def stop(self, *, grace: float) -> None:
        """Stop leasing, let in-flight requests finish for up to ``grace`` seconds in all,
        then hand what is still unfinished back to the queue untouched.

        A worker waiting for a free sender (its destination slow, paused or down) is
        cancelled rather than waited for: its leased, unsent jobs go back to the queue."""
        deadline = time.monotonic() + grace
        try:
            if self._housekeeping is not None:
                await ended([self._housekeeping])
            for worker in self.workers.values():
                worker.stopping = True
                worker.wakeup.set()
            if self._tasks:
                _, waiting = await asyncio.wait(self._tasks, timeout=min(grace, 1.0))
                await ended(list(waiting))
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(worker.finish(remaining) for worker in self.workers.values()))
        except BaseException:
            # Cancelled (a second Ctrl-C, a timeout around close()): cut short, not left half
            # done, whatever cancels it next.
            await asyncio.shield(self._cut_short())
            raise
        finally:
            await self.transport.close()

    def cut_stop_short(self) -> None:
        """End the waits of a ``stop`` under way (for the workers still leasing, and for
        requests in flight): ``stop`` then puts every job they hold back in the queue and
        cancels the senders, whose requests are abandoned. For when waiting out the grace
        would do harm (the router this process delivers for is gone). Call it again until
        ``stop`` returns: a sender that just finished a request may take another batch."""
        for task in self._tasks:
            task.cancel()
        for worker in self.workers.values():
            worker.all_sent.set()


class DestinationWorker:
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
        self.ready: asyncio.Queue[list[Job]] = asyncio.Queue(self.delivery.concurrency)
        """Batches leased and cut, waiting for a sender: a round of them, so the senders have
        work while the next lease is taken."""
        self.senders: list[asyncio.Task[None]] = []
        self.wakeup = asyncio.Event()
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
        self.pacing = 0
        """Senders waiting for the rate limiter: holding a batch, not yet sending it."""
        self.delivered: list[Job] = []
        """Delivered jobs the storage has not been told of yet (see _complete_delivered)."""
        self.delivered_per_second = 0.0
        self.last_completed_at = time.monotonic()
        self.undispatched: list[list[Job]] = []
        self.unreleased: list[Job] = []
        """Jobs out of attempts whose outcome the storage could neither record nor take back
        (see ``_send_again``): ``_upkeep`` gives them back to the queue once it answers."""
        self.round_leased_at = time.monotonic()
        """When the round being handed out was leased (``_upkeep`` gives it back in time)."""
        self.held_users: dict[str, float] = {}
        """Users the API throttles one by one (Amplitude), until when (``clock.now()``):
        their jobs leased meanwhile wait, unsent (see ``_hold_back_throttled_users``)."""
        self.handed_out: dict[int, list[Job]] = {}
        """Batches handed to the senders whose fate is not recorded yet, by ``id``: with the
        round not yet handed out and the delivered jobs not yet completed, every job this
        worker holds (``_upkeep`` renews their leases)."""
        # Long enough that a lease never lapses under a live worker; after a crash, the
        # storage takes leases back at start (SQLite) or when they lapse (Redis).
        self.lease_for = max(MIN_LEASE, self.delivery.timeout * 4)
        self.trusted_until: dict[int, float] = {}
        """Until when (monotonic) this worker knows each batch it holds is still its own, by
        ``id``: from its lease, or the last renewal that found its lease alive. Where leases
        lapse under a live process (Redis), a batch past that is not sent (see ``_deliver``)."""

    def start_senders(self) -> None:
        """``concurrency`` long-lived senders take batches from ``ready``: cheaper than a
        task per request, and the number of requests in flight is bounded by construction."""
        self.senders = [asyncio.create_task(self._send_forever(number),
                                            name=f"send:{self.name}:{number}")
                        for number in range(self.delivery.concurrency)]

    async def run(self) -> None:
        """Lease due jobs, cut them into batches and hand them to the senders, a round at a
        time; waits while every sender is busy and ``ready`` is full."""
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
            if not jobs and not self.undispatched:
                await self._sleep(POLL_INTERVAL)
                continue
            if jobs:
                jobs = await self._set_aside_built_by_others(jobs)
                jobs = await self._give_up_on_the_too_old(jobs)
                jobs = await self._hold_back_throttled_users(jobs)
            # Added to what ``_upkeep`` could not give back, if anything.
            leased = batches(jobs, self.delivery, group=_group_of, size=_size_of)
            for batch in leased:
                self.trusted_until[id(batch)] = leased_at + LEASE_TRUSTED * self.lease_for
            self.undispatched += leased
            self.round_leased_at = time.monotonic()
            while self.undispatched and not self.stopping:
                batch = self.undispatched[0]
                await self.ready.put(batch)
                self.handed_out[id(batch)] = batch
                self.undispatched.pop(0)

    async def _set_aside_built_by_others(self, jobs: list[Job]) -> list[Job]:
        """Jobs whose payloads another plugin built (the config changed while they were
        queued: a destination's plugin swapped, two destinations' names swapped) are never
        sent: the plugin would put them in a request its API does not take (config audit:
        Amplitude's events posted to Mixpanel, a webhook's bodies, with a token its template
        had put in, to Segment's batch API). They go to the dead letters, noted as built by
        no plugin, so that ``router dlq replay`` sends them as they are, if the operator
        means to."""
        mine = self.destination.plugin.name
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

    async def _hold_back_throttled_users(self, jobs: list[Job]) -> list[Job]:
        """Jobs of users the API throttles, put back unsent until the throttle's end, with
        no attempt counted. Sent, a throttled user's newer events made the API refuse every
        request they were in, the other users' events with them (Amplitude refuses a request
        whole): with one user over its limit, the others' p99 was 50 s (rate-limit audit)."""
        if not self.held_users:  # the usual case: nothing to look at, job by job
            return jobs
        now = self.clock.now()
        self.held_users = {user: until for user, until in self.held_users.items() if until > now}
        held = [job for job in jobs if job.user_key in self.held_users]
        if not held:
            return jobs
        until = [self.held_users[job.user_key] for job in held]
        try:
            await self.storage.retry(held, not_before=until, now=now, failure=Failure(HELD_BACK))
        except Exception as exc:  # noqa: BLE001 - full, locked: sent now rather than lost
            log.warning("destination %s: cannot hold back %d job(s) of throttled users, "
                        "sending them: %s", self.name, len(held), exc)
            return jobs
        return [job for job in jobs if job.user_key not in self.held_users]

    async def _upkeep(self) -> None:
        """Beside ``run``, every ``COMPLETE_EVERY`` seconds: complete what the senders
        delivered, and once half the lease of the round being handed out has passed, give
        back to the queue the batches no sender has taken yet (all but the one ``run`` is
        handing over). A destination that slowed down after a large lease, taken while it
        was fast, would otherwise hold them, and its deliveries uncompleted, past the lease:
        Redis then hands them to another router, which sends them again. A task of its own,
        not a timeout on each hand-over, which would cost every request its price."""
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
            if len(self.undispatched) > 1 and \
                    time.monotonic() - self.round_leased_at > self.lease_for / 2:
                given_back = self.undispatched[1:]
                del self.undispatched[1:]
                ids = [job.id for batch in given_back for job in batch]
                try:  # shielded: a stop must not leave them neither queued nor held
                    await asyncio.shield(self.storage.release(ids))
                except Exception as exc:  # noqa: BLE001 - kept, and sent by this worker
                    log.warning("destination %s: cannot put %d job(s) back in the queue, "
                                "sending them here: %s", self.name, len(ids), exc)
                    self.undispatched += given_back
                    self.round_leased_at = time.monotonic()
                else:
                    for batch in given_back:
                        self.trusted_until.pop(id(batch), None)

    async def _renew_leases(self) -> None:
        """Extend the leases of every job this worker holds: a destination that keeps its
        senders waiting (a long ``Retry-After``, a rest after failures) would otherwise hold
        them past the lease, and another router would send them again."""
        batches_held = [*self.undispatched, *self.handed_out.values()]
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
        """One sender: a batch at a time, from ``ready``, until cancelled by ``finish``."""
        while True:
            batch = await self.ready.get()
            self.in_flight[number] = batch
            self.all_sent.clear()
            try:
                await self._deliver(batch)
            except Exception:  # noqa: BLE001 - a bug here must not stop the sender
                log.exception("destination %s: delivery failed", self.name)
                await self._retry_after_a_bug(batch)
            finally:
                del self.in_flight[number]
                self.handed_out.pop(id(batch), None)
                self.trusted_until.pop(id(batch), None)
                if not self.in_flight:
                    self.all_sent.set()
            self.recorded.pop(id(batch), None)  # kept when cancelled: ``finish`` reads it

    async def _release_unrecorded(self, jobs: list[Job], exc: Exception) -> None:
        """The storage could not record what became of these jobs (a full disk, a locked
        spool): they go back to the queue, to be sent again once the destination has
        rested, rather than stay leased until the next start."""
        log.warning("destination %s: cannot record the outcome of %d job(s), sent again "
                    "in %g s: %s", self.name, len(jobs), UNRECORDED_PAUSE, exc)
        # Not at once: while the storage stays full, each send would fail to be recorded
        # again, and the destination would get the same events over and over.
        self.limiter.pause(UNRECORDED_PAUSE)
        try:
            await self.storage.release([job.id for job in jobs])
        except Exception:  # noqa: BLE001 - this worker sends them again itself
            self._send_again(jobs)

    def _send_again(self, jobs: list[Job]) -> None:
        """Jobs whose outcome could not be recorded, nor the jobs put back in the queue:
        they are still leased to this worker (a SQLite lease lasts until the next start,
        a Redis one is renewed), so it sends them again itself, after the rest above.

        Not those delivered (they wait in ``delivered`` to be completed), and not past
        ``max_attempts``: with the storage broken for good, nothing could be dead-lettered,
        and the destination would get them again every rest for ever. Those wait in
        ``unreleased`` until the storage takes them back (then they are tried once more and
        dead-lettered), or for the next start, as every leased job then goes back."""
        delivered = {id(job) for job in self.delivered}
        pending = [job for job in jobs if id(job) not in delivered]
        again = [job for job in pending if job.attempts < self.delivery.max_attempts]
        out_of_attempts = [job for job in pending if job.attempts >= self.delivery.max_attempts]
        held = len(out_of_attempts)
        log.warning("destination %s: the storage took back none of %d job(s) it could not "
                    "record; this worker sends %d of them again%s", self.name, len(jobs),
                    len(again),
                    f", and {held} out of attempts go back to the queue once the storage "
                    "answers" if held else "")
        if again:
            self.undispatched.append(again)
            self.wakeup.set()
        self.unreleased += out_of_attempts

    async def _give_back_unreleased(self) -> None:
        jobs, self.unreleased = self.unreleased, []
        try:  # shielded: a stop must not leave them neither queued nor held
            await asyncio.shield(self.storage.release([job.id for job in jobs]))
        except Exception:  # noqa: BLE001 - the storage still fails: tried again in a second
            self.unreleased[:0] = jobs

    async def _retry_after_a_bug(self, batch: list[Job]) -> None:
        """Count an attempt that failed on a bug as a failed attempt, to be retried with
        backoff and dead-lettered after ``max_attempts``: left alone, the jobs would stay
        leased with nothing recorded (on SQLite, until the next start)."""
        reason = "the router failed to deliver it (a bug: the router's log has the details)"
        try:
            await self._record(batch, [(RetryableError(reason), Failure(reason))] * len(batch))
        except Exception:  # noqa: BLE001 - the storage too
            log.exception("destination %s: cannot record the failed delivery", self.name)
            self.limiter.pause(UNRECORDED_PAUSE)
            recorded = self.recorded.get(id(batch), set())
            self._send_again([job for job in batch if job.id not in recorded])

    async def finish(self, grace: float) -> None:
        """After ``run`` has ended: wait up to ``grace`` for requests in flight, record what
        they delivered, then put every job this worker still holds, whose outcome is not
        recorded, back in the queue."""
        leftover = [job for batch in self.undispatched for job in batch]
        while not self.ready.empty():
            leftover += self.ready.get_nowait()
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
        self.recorded.clear()
        self.undispatched = []
        self.trusted_until.clear()
        self.failure_log.flush(all_windows=True)
        await self._complete_delivered()
        if leftover:
            await self.storage.release([job.id for job in leftover])

    async def _complete_delivered(self) -> None:
        """Tell the storage which jobs were delivered, all at once: each worker round and
        the upkeep every second do this, rather than once a request, since a storage call
        costs more than a small request. Until then a delivered job stays queued, so a crash
        in between sends it again (at least once, with the same ``messageId``), never loses
        it."""
        if not self.delivered:
            return
        delivered, self.delivered = self.delivered, []
        try:
            await self.storage.complete(delivered)
        except BaseException:
            self.delivered[:0] = delivered
            raise
        self.metrics.delivered.inc(self.name, amount=len(delivered))
        now = time.monotonic()
        self.delivered_per_second = len(delivered) / max(now - self.last_completed_at, 1e-3)
        self.last_completed_at = now

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        except TimeoutError:
            pass
        self.wakeup.clear()

    async def _lease(self) -> list[Job]:
        """Due jobs, as many as ``_lease_size`` says (the next lease is taken while the
        senders work through ``ready``); a partial batch waits up to ``batch_wait`` for
        company so a quiet stream still goes out promptly."""
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

    async def _deliver(self, batch: list[Job]) -> None:
        now = self.clock.now()
        for job in batch:
            job.attempts += 1
            job.first_attempt_at = job.first_attempt_at or now
        try:
            outcomes = await self._attempt(batch)
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

    def _note_health(self, batch: list[Job], outcomes: list[tuple[Outcome, Failure | None]]
                     ) -> None:
        """Back off the whole destination while it keeps failing (down, refusing
        connections, answering 5xx): without this, a dead destination would cycle through
        its entire backlog, one doomed connection after another.

        Only a first attempt counts: retries go out first once a pause ends, and a few
        events the API always fails (a "poison" event answered 500) would otherwise extend
        the pause for ever, holding back every healthy event behind them. And a round of
        senders failing together counts once: a failure while paused adds nothing.

        The rest begins at the ``FAILURES_BEFORE_PAUSE``-th failure in a row: a destination
        that is down fails every time, while one that fails now and then (a third of its
        requests, say) would otherwise rest after each failure and fall ever further behind."""
        if outcomes and all(isinstance(outcome, RetryableError) for outcome, _ in outcomes):
            if self.limiter.paused or all(job.attempts > 1 for job in batch):
                return
            self.failures_in_a_row += 1
            rests = self.failures_in_a_row - FAILURES_BEFORE_PAUSE + 1
            if rests > 0:
                self.limiter.pause(retry.destination_pause(rests, self.delivery, self.rng))
        elif any(outcome is None for outcome, _ in outcomes):
            self.failures_in_a_row = self.throttled_in_a_row = 0

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
        try:
            payloads = [from_spool(job.body, built_by(job.group)[1],
                                   opaque=adapter.opaque_bodies)
                        for job in batch]
            request = checked_request(adapter.build_request(payloads))
        except DestinationError as exc:
            outcome = exc if isinstance(exc, RetryableError) else PermanentError(exc.reason)
            return _Sent([(outcome, Failure(self.destination.masker.mask(exc.reason)))]
                         * len(batch))
        except PLUGIN_FAILURES as exc:  # a broken plugin fails its own jobs only
            failed = f"{self.destination.plugin.name} failed to build a request"
            if len(batch) == 1:  # else perhaps one event's fault: split to find it
                self._log_plugin_failure(failed, exc)
            reason = f"{failed}: {type(exc).__name__}"
            return _Sent([(PermanentError(reason), Failure(reason))] * len(batch),
                         refused="", always=True)

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
        refused = None
        if all(isinstance(outcome, PermanentError) for outcome in outcomes) and (
                response.status == 413 or response.status in SPLIT_STATUSES and not named):
            refused = self._shown_body(request, response)
        if all(outcome is None for outcome in outcomes):
            return _Sent([(None, None)] * len(outcomes))
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
        if judged is not None:
            outcomes = _with_the_stated_wait(judged, response.headers, now=now)
        else:
            outcomes = [retry.classify_status(response.status, response.headers,
                                              self.delivery.retry_on, now=now,
                                              body=response.body,
                                              mask=lambda text: self._masker_of(request).mask(text))
                        ] * len(payloads)
        throttled = response.status in (429, 503)
        waits = [o.retry_after for o in outcomes
                 if isinstance(o, RetryableError) and o.retry_after and (
                     throttled if o.pause_destination is None else o.pause_destination)]
        if waits and len(waits) == len(outcomes):
            self.limiter.pause(min(max(waits), retry.MAX_RETRY_AFTER))
        elif (spent := retry.budget_spent(response.headers, now=now)) is not None:
            self.limiter.pause(spent)  # the window's last request: rest until it resets
        elif response.status == 429 and all(
                isinstance(o, RetryableError) and o.retry_after is None
                and o.pause_destination is not False for o in outcomes):
            self._rest_after_throttle()
        return outcomes, judged is not None and _names_events(outcomes)

    def _rest_after_throttle(self) -> None:
        """A 429 that does not say how long to wait (Mixpanel's, Customer.io's) rests the
        whole destination too, for ``retry.destination_pause`` of the throttles in a row: half
        of ``backoff_initial`` and up to it, doubling each time, until the first success.
        Without a rest, each refused event came back on its own backoff while the others kept
        going: at three times an API's limit, about two 429s came back for each event
        delivered (vendor rate-limit audit). Senders throttled together count once."""
        if self.limiter.paused:
            return
        self.throttled_in_a_row += 1
        self.limiter.pause(retry.destination_pause(self.throttled_in_a_row, self.delivery,
                                                   self.rng))

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

    async def _record(self, jobs: list[Job], outcomes: list[tuple[Outcome, Failure | None]],
                      *, of: list[Job] | None = None) -> None:
        """Record what became of each of ``jobs`` (a part of the batch ``of``, when it is
        being split) that is not recorded yet, and note it in ``recorded``."""
        now = self.clock.now()
        key = id(of or jobs)
        if of is None and key not in self.recorded and all(
                outcome is None for outcome, _ in outcomes):
            # The usual case, a whole batch delivered: nothing below waits, so no stop can
            # look at the batch before its sender is done with it, and nothing is noted.
            self._take_delivered(jobs, now)
            return
        recorded = self.recorded.setdefault(key, set())
        pending = [(job, result) for job, result in zip(jobs, outcomes)
                   if job.id not in recorded]
        # The delivered first: should a storage call for a failed job raise below, they are
        # still completed, not sent again once their lease lapses.
        delivered = [job for job, (outcome, _) in pending if outcome is None]
        if delivered:
            self._take_delivered(delivered, now)
            recorded.update(job.id for job in delivered)
            if len(delivered) == len(pending):
                return
        failed = [(job, outcome, failure) for job, (outcome, failure) in pending
                  if outcome is not None]
        for index, (job, outcome, failure) in enumerate(failed):
            try:
                await self._record_failure(job, outcome, failure, now=now)
            except Exception as exc:  # noqa: BLE001 - full, locked, broken (a corrupt file)
                # Exactly the jobs not recorded yet go back: not those delivered (to be
                # completed), nor those whose retry is written (they keep their backoff).
                unrecorded = [job for job, _, _ in failed[index:]]
                await self._release_unrecorded(unrecorded, exc)
                recorded.update(job.id for job in unrecorded)  # given back, or sent again
                return
            recorded.add(job.id)

    def _take_delivered(self, delivered: list[Job], now: float) -> None:
        """Delivered jobs, for ``_complete_delivered`` to complete, and their latency."""
        if not self.delivered:
            self.wakeup.set()  # an idle worker records them now, not at its next poll
        self.delivered += delivered
        # The jobs of one accept share its time, so a batch has few distinct ones.
        accepted_at: dict[float, int] = {}
        for job in delivered:
            accepted_at[job.created_at] = accepted_at.get(job.created_at, 0) + 1
        for created_at, count in accepted_at.items():
            self.metrics.latency.observe(self.clock.age(created_at, now), self.name,
                                         count=count)

    async def _record_failure(self, job: Job, outcome: DestinationError,
                              failure: Failure | None, *, now: float) -> None:
        # Each job its own Failure (a batch's may be shared): its reason changes below.
        assert failure is not None, "_attempt gives every failed job its Failure"
        failure = dataclasses.replace(failure)
        if isinstance(outcome, RetryableError):
            due = retry.next_attempt_at(job.attempts, outcome, self.delivery, now=now,
                                        rng=self.rng)
            gave_up = retry.exhausted(job.attempts, self.clock.age(job.created_at, due),
                                      self.delivery)
            if gave_up is None:
                if outcome.pause_destination is False and outcome.retry_after and job.user_key:
                    # The user's throttle: its other events wait as long (see above).
                    self.held_users[job.user_key] = max(due, self.held_users.get(job.user_key, due))
                await self.storage.retry([job], not_before=[due], now=now, failure=failure)
                self.metrics.retried.inc(self.name)
                self._log_failure(job, failure, "retry")
                return
            failure.reason = f"{gave_up}; last: {failure.reason}"
        await self.storage.dead_letter([job], now=now, failure=failure)
        self.metrics.dead_lettered.inc(self.name)
        self._log_failure(job, failure, "dead_letter")

    def _log_failure(self, job: Job, failure: Failure, action: str) -> None:
        self.failure_log.write({"destination": self.name, "action": action,
                                "message_id": job.message_id, "attempt": job.attempts,
                                "status": failure.status, "reason": failure.reason})


def _with_the_stated_wait(judged: list[Outcome], headers: Mapping[str, str], *, now: float
                          ) -> list[Outcome]:
    """A plugin's ``RetryableError`` that gives no wait takes the answer's ``Retry-After``
    (seconds or an HTTP-date), as the core's own judgement would: a plugin need not read the
    header itself (two built-ins did, each reading only the seconds form). Outcomes given to
    several events stay one object, which ``_names_events`` relies on."""
    if not any(isinstance(o, RetryableError) and o.retry_after is None for o in judged):
        return judged
    wait = retry.retry_after(headers, now=now)
    if wait is None:
        return judged
    filled: dict[int, Outcome] = {}
    for outcome in judged:
        if isinstance(outcome, RetryableError) and outcome.retry_after is None \
                and id(outcome) not in filled:
            filled[id(outcome)] = RetryableError(outcome.reason, retry_after=wait,
                                                 pause_destination=outcome.pause_destination)
    return [filled.get(id(outcome), outcome) for outcome in judged]


def _names_events(judged: list[Outcome]) -> bool:
    """Whether a plugin's judgement names events: outcomes made one by one (Mixpanel's
    refused records, Braze's refused objects), final even when every event is refused, as
    splitting the batch would only have each refused again by name. One outcome given to
    every event (``[PermanentError(reason)] * len(payloads)``, Meta's error for a request it
    refuses whole) judges the request, as the status does, and a 400 or 422 so judged is
    split to find the event at fault."""
    return any(outcome is not judged[0] for outcome in judged)


@dataclasses.dataclass(frozen=True, slots=True)
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


def _group_of(job: Job) -> str:
    return job.group


def _size_of(job: Job) -> int:
    return len(job.body)


async def ended(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again while one has not:
    a library may swallow a cancellation (redis-py's connection pool was seen handing back a
    connection to a task cancelled while it waited), and a loop that went on would then hold
    the stop for good."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_AFTER)


class _LeaseLapsed(Exception):
    """A batch's lease lapsed while it waited for the rate limiter: nothing is recorded."""
