"""Per-destination pacing: a token bucket for the configured rate, and a pause of the whole
destination (a throttled API's ``Retry-After``, a rest after failures or when outcomes
cannot be recorded)."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """A token bucket: ``rate`` requests a second on average, bursts up to one second's worth
    (at least one request)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate or 1.0)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Hold every request of the destination for ``seconds``."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    @property
    def paused(self) -> bool:
        return time.monotonic() < self.paused_until

    def free(self) -> bool:
        """Whether a request may go at once, needing no token: no rate limit, no pause and
        nobody waiting. The common case, asked without a coroutine (``acquire`` is one)."""
        return self.rate is None and not self._lock.locked() and \
            time.monotonic() >= self.paused_until

    async def acquire(self) -> None:
        """Wait until one request may go."""
        if self.free():
            return  # the common case costs no lock
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                if now < self.paused_until:
                    await asyncio.sleep(self.paused_until - now)
                    continue
                if self.rate is None:
                    return
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)
