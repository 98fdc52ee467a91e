"""When a whole destination rests, and which of its users wait: ``Health``, the decisions a
worker makes from the answers it gets. The pause after failures in a row (``_note_health``),
the rest after a 429 that states no wait (``_rest_after_throttle``), and the holding back of
the users an API throttles one by one (``_hold_back_throttled_users``). The durations come
from ``router.delivery.retry``; a pause is the rate limiter's (``limiter.pause``), so every
sender of the destination waits it out."""

from __future__ import annotations

import logging
import random

from router.delivery import retry
from router.delivery.clock import DeliveryClock
from router.delivery.outcomes import DELIVERED
from router.delivery.ratelimit import RateLimiter
from router.destination import DeliveryDefaults, Outcome
from router.errors import RetryableError
from router.storage.base import Failure, Job, Storage

log = logging.getLogger("router.delivery")
FAILURES_BEFORE_PAUSE = 3
"""Batches whose first attempts all failed, in a row, before the whole destination rests."""
HELD_BACK = ("not sent: the destination throttles this event's user, whose other events "
             "wait until the throttle ends")


class Health:
    """A destination's rests and its users held back, decided from what its answers say."""

    # The worker's state they use, which ``DestinationWorker.__init__`` sets and describes:
    name: str
    delivery: DeliveryDefaults
    storage: Storage
    rng: random.Random
    clock: DeliveryClock
    limiter: RateLimiter
    failures_in_a_row: int
    throttled_in_a_row: int
    held_users: dict[str, float]

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
        if DELIVERED in outcomes:  # an event got through: the usual case, asked in C first
            self.failures_in_a_row = self.throttled_in_a_row = 0
        elif outcomes and all(isinstance(outcome, RetryableError) for outcome, _ in outcomes):
            if self.limiter.paused or all(job.attempts > 1 for job in batch):
                return
            self.failures_in_a_row += 1
            rests = self.failures_in_a_row - FAILURES_BEFORE_PAUSE + 1
            if rests > 0:
                self.limiter.pause(retry.destination_pause(rests, self.delivery, self.rng))

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
