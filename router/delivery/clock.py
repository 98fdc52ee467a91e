"""The wall clock that delivery schedules by, proof against the system clock being stepped.

When an event was accepted and when a retry is due are stored in wall time, because they
must mean the same in another process and after a restart. But NTP steps a clock that was
far off (a VM restored from a snapshot, a host without time sync for weeks), and the steps
were costly: a clock stepped back an hour held every retry, every job of an ``ordered``
destination and every partial batch for an hour; stepped forward a day, it made every
event waiting for a retry "older than max_age" seconds after it was accepted.

``DeliveryClock`` schedules by a time that never goes back: after a step back it runs on the
monotonic clock from where it was (so the due times written before the step come due on
time, and those written after it keep their waits), ahead of the wall clock by the step.
Ages are measured against the wall clock, which stamps every accepted event, with the steps
forward since an event was accepted left out, so neither kind of step ages an event. Both
hold within a process; after a restart the wall clock is trusted again (retries scheduled
while the clock was behind then wait the step longer).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("router.delivery")

STEP_TOLERANCE = 2.0
"""Seconds the wall clock may differ from where the monotonic clock says it should be
before the difference counts as a step (NTP's own slewing stays far below this)."""
STEPS_REMEMBERED = 64


class DeliveryClock:
    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._monotonic = wall, monotonic
        self._anchor_wall, self._anchor_monotonic = wall(), monotonic()
        self._behind_by = 0.0
        """How far the wall clock is behind this clock since it stepped back."""
        self._forward_steps: deque[tuple[float, float]] = deque(maxlen=STEPS_REMEMBERED)
        """(the wall time just before the step, its size) for each step forward."""

    def now(self) -> float:
        """Wall time, except that it never goes back (but for under ``STEP_TOLERANCE``)."""
        wall, monotonic = self._wall(), self._monotonic()
        expected = self._anchor_wall + (monotonic - self._anchor_monotonic)
        if not self._behind_by and -STEP_TOLERANCE <= wall - expected <= STEP_TOLERANCE:
            # The usual case, no step (read a few times a request): what the rest below
            # comes to then, without its branches.
            self._anchor_wall, self._anchor_monotonic = wall, monotonic
            return wall
        wall_before = expected - self._behind_by  # where the wall clock should be
        if wall > wall_before + STEP_TOLERANCE:
            self._forward_steps.append((wall_before, wall - wall_before))
            log.warning("the system clock stepped forward by %.0f s; events accepted before "
                        "are not aged by the step", wall - wall_before)
        elif wall < wall_before - STEP_TOLERANCE:
            log.warning("the system clock stepped back by %.0f s; delivery keeps its "
                        "schedule on the monotonic clock", wall_before - wall)
        if wall < expected - STEP_TOLERANCE:  # behind this clock, since a step back
            self._behind_by = expected - wall
            return expected
        self._behind_by = 0.0
        self._anchor_wall, self._anchor_monotonic = wall, monotonic
        return wall

    def age(self, created_at: float, at: float) -> float:
        """How old an event accepted at ``created_at`` (wall time) is at ``at`` (this clock's
        time): by the wall clock, leaving out the steps forward taken since it was accepted.
        (An event accepted before a step back looks younger by the step: its ``max_age``
        is stretched, never cut.)"""
        stepped = sum(size for before, size in self._forward_steps if created_at < before
                      ) if self._forward_steps else 0.0
        return max(0.0, at - self._behind_by - created_at - stepped)
