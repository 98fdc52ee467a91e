"""The wall clock that delivery schedules by, proof against the system clock being stepped.

When an event was accepted and when a retry is due are stored in wall time, because they
must mean the same in another process and after a restart. But NTP steps a clock that was
far off (a VM restored from a snapshot, a host without time sync for weeks), and the steps
were costly: a clock stepped back an hour held every retry, every job of an ``ordered``
destination and every partial batch for an hour; stepped forward a day, it made every
event waiting for a retry "older than max_age" seconds after it was accepted.

``DeliveryClock`` follows the wall clock, except that it never goes back: from a step back
until the wall clock catches up, it runs on the monotonic clock from where it was. And it
remembers the steps forward, so an event accepted before one is not aged by it. Both hold
within a process; after a restart the wall clock is trusted again.
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
        self._behind = False
        """Whether the wall clock is behind this clock since it stepped back."""
        self._forward_steps: deque[tuple[float, float]] = deque(maxlen=STEPS_REMEMBERED)
        """(this clock's time just before the step, its size) for each step forward."""

    def now(self) -> float:
        """Wall time, never earlier than the last reading (but for under ``STEP_TOLERANCE``)."""
        wall, monotonic = self._wall(), self._monotonic()
        expected = self._anchor_wall + (monotonic - self._anchor_monotonic)
        if wall < expected - STEP_TOLERANCE:
            if not self._behind:
                self._behind = True
                log.warning("the system clock stepped back by %.0f s; delivery keeps its "
                            "schedule on the monotonic clock until it catches up",
                            expected - wall)
            return expected
        if wall > expected + STEP_TOLERANCE:
            self._forward_steps.append((expected, wall - expected))
            log.warning("the system clock stepped forward by %.0f s; events accepted before "
                        "are not aged by the step", wall - expected)
        self._behind = False
        self._anchor_wall, self._anchor_monotonic = wall, monotonic
        return wall

    def age(self, created_at: float, at: float) -> float:
        """How old an event accepted at ``created_at`` is at ``at`` (both this clock's or
        the wall clock's times), leaving out the steps forward taken since it was accepted."""
        stepped = sum(size for before, size in self._forward_steps if created_at < before)
        return max(0.0, at - created_at - stepped)
