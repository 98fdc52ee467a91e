"""What became of each job, told to the storage: ``Outcomes``. A batch's answer is recorded
(``_record``): the delivered are gathered and completed a round at a time
(``_take_delivered``, ``_complete_delivered``), a failed job is retried later or
dead-lettered (``_record_failure``). What the storage could not record goes back to the
queue (``_release_unrecorded``), or, when the storage takes nothing back, is sent again by
the worker itself (``_send_again``) or held until it answers (``_give_back_unreleased``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Iterator

from router.delivery import retry
from router.delivery.clock import DeliveryClock
from router.delivery.failure_log import FailureLog
from router.delivery.ratelimit import RateLimiter
from router.delivery.telemetry import DeliveryMetrics
from router.destination import DeliveryDefaults, Outcome
from router.errors import DestinationError, RetryableError
from router.storage.base import Failure, Job, Storage

log = logging.getLogger("router.delivery")
UNRECORDED_PAUSE = 5.0
"""Seconds a destination rests after the storage could not record what became of a batch
(a full disk, an unreachable Redis): its jobs go back to the queue."""
DELIVERED: tuple[Outcome, Failure | None] = (None, None)
"""A job's result when it was delivered: no outcome to record, no failure."""


class Outcomes:
    """The recording of each job's fate, and what is done with the jobs it fails for."""

    # The worker's state they use, which ``DestinationWorker.__init__`` sets and describes:
    name: str
    delivery: DeliveryDefaults
    storage: Storage
    metrics: DeliveryMetrics
    rng: random.Random
    clock: DeliveryClock
    failure_log: FailureLog
    limiter: RateLimiter
    wakeup: asyncio.Event
    batches_queued: asyncio.Event
    recorded: dict[int, set[int | str]]
    delivered: list[Job]
    delivered_per_second: float
    last_completed_at: float
    undispatched: deque[list[Job]]
    unreleased: list[Job]
    held_users: dict[str, float]
    settling: int

    @contextlib.contextmanager
    def _settling(self) -> Iterator[None]:
        """Around a storage call that settles jobs and the counting of what it did: the
        storage commits first, and the worker counts once it resumes, a turn of the event
        loop or more later. ``Router.drain`` waits for no such step to be under way, so
        that the counters read after it count every job the storage shows settled."""
        self.settling += 1
        try:
            yield
        finally:
            self.settling -= 1

    async def _record(self, jobs: list[Job], outcomes: list[tuple[Outcome, Failure | None]],
                      *, of: list[Job] | None = None) -> None:
        """Record what became of each of ``jobs`` (a part of the batch ``of``, when it is
        being split) that is not recorded yet, and note it in ``recorded``."""
        now = self.clock.now()
        key = id(of or jobs)
        if of is None and key not in self.recorded and \
                outcomes.count(DELIVERED) == len(outcomes):
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
        # The jobs of one accept share its time, the very float object (its bundle's), so a
        # batch has few distinct ones, nearly always one: then a count by identity, in C,
        # tells, where counting the times by hash cost about 500 instructions a job.
        created = [job.created_at for job in delivered]
        counts = ({created[0]: len(created)}
                  if created and created.count(created[0]) == len(created) else Counter(created))
        for created_at, count in counts.items():
            self.metrics.latency.observe(self.clock.age(created_at, now), self.name,
                                         count=count)

    async def _record_failure(self, job: Job, outcome: DestinationError,
                              failure: Failure | None, *, now: float) -> None:
        # Each job its own Failure (a batch's may be shared): its reason changes below.
        assert failure is not None, "_attempt gives every failed job its Failure"
        failure = dataclasses.replace(failure)
        if isinstance(outcome, RetryableError) and outcome.caused_by_others:
            # Refused for another event of its request (``RetryableError``): not its own
            # attempt, so not counted, and sent again at once, without the event at fault.
            # Counted, one bad event cost its neighbours their attempts, dead-lettering them
            # with a low max_attempts, and their users their order past order_hold_attempts.
            await self.storage.retry([dataclasses.replace(job, attempts=job.attempts - 1)],
                                     not_before=[now], now=now, failure=failure)
            self.metrics.retried.inc(self.name)
            self._log_failure(job, failure, "retry")  # the attempt sent, though not counted
            return
        if isinstance(outcome, RetryableError):
            due = retry.next_attempt_at(job.attempts, outcome, self.delivery, now=now,
                                        rng=self.rng)
            gave_up = retry.exhausted(job.attempts, self.clock.age(job.created_at, due),
                                      self.delivery)
            if gave_up is None:
                if outcome.pause_destination is False and outcome.retry_after and job.user_key:
                    # The user's throttle: its other events wait as long (``health``: see
                    # ``_hold_back_throttled_users``).
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

    async def _complete_delivered(self) -> None:
        """Tell the storage which jobs were delivered, all at once: each worker round and
        the upkeep every second do this, rather than once a request, since a storage call
        costs more than a small request. Until then a delivered job stays queued, so a crash
        in between sends it again (at least once, with the same ``messageId``), never loses
        it."""
        if not self.delivered:
            return
        delivered, self.delivered = self.delivered, []
        with self._settling():
            try:
                await self.storage.complete(delivered)
            except BaseException:
                self.delivered[:0] = delivered
                raise
            self.metrics.delivered.inc(self.name, amount=len(delivered))
        now = time.monotonic()
        self.delivered_per_second = len(delivered) / max(now - self.last_completed_at, 1e-3)
        self.last_completed_at = now

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
            self.batches_queued.set()
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
