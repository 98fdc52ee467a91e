"""Interpreter settings for the processes the router owns (``router serve`` and its delivery
process), and for programs that embed the router and want the same throughput; the limit on
open files, which its connections count against; and the watchdog that says when the event
loop stops turning.

Every event allocates a few hundred objects that live for one batch. With CPython's default
thresholds (700, 10, 10) the cyclic garbage collector runs every few events, and each batch
in flight when it runs is promoted to an older generation, whose collections then walk every
long-lived object: the modules, pydantic's schemas, the plugins. Measured on the routing path
(bench/delivery.py), that was a fifth of the CPU. Freezing what exists once the router has
started takes those objects out of every collection, and a larger first threshold lets
short-lived objects die by reference counting before the collector ever sees them. The
router's own objects are acyclic, so collecting cycles less often holds little memory back.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import sys
import threading
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("router")
T = TypeVar("T")

YOUNG_THRESHOLD = 50_000
"""Allocations between collections of the youngest generation (CPython's default: 700).
A ``route_many`` of 500 events has about 150,000 objects in flight; at 10,000 the routing
thread spent about 2 µs an event more (bench/delivery.py, session 11)."""


def tune_garbage_collector() -> None:
    """Call once the router has started: collect, freeze what is left (it lives as long as
    the process), and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, max(middle, 20), max(old, 20))


DESCRIPTORS_KEPT = 64
"""File descriptors left for the router's own use (storage files, the delivery process,
logs) beyond its connections."""
_reserved_descriptors = DESCRIPTORS_KEPT


POOL_SHARE = 0.75
"""Of the open files left, the most the destinations' pool takes when they are short and
the HTTP API is still to come in the same process (``expect_http_api``)."""
_http_api_to_come = False


def expect_http_api() -> None:
    """Say, before the router starts, that this process will serve the HTTP API: the
    destinations' pool, which reserves first, then leaves it a share of a short limit.
    Elsewhere (a delivery process, a router embedded without the API) the pool may take
    all of it."""
    global _http_api_to_come
    _http_api_to_come = True


def pool_share() -> float:
    """The share of a short limit the destinations' pool may take (see ``POOL_SHARE``)."""
    return POOL_SHARE if _http_api_to_come else 1.0


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> asyncio.Future[T]:
    """Run ``work`` until it ends or ``stop`` is set, whichever comes first: a stop during a
    start gives the start up (cancelled, it closes what it opened) rather than wait for it.
    Returns ``work``'s future, done: cancelled when the stop came first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    finally:
        stopped.cancel()
        if not task.done():  # the caller is cancelled itself (a second Ctrl-C)
            task.cancel()
    return task


def reserve_descriptors(count: int, what: str, *, share: float = 1.0) -> int:
    """Make room for ``count`` more open files (connections: the clients', or those to the
    destinations). Returns how many fit: ``count``, or fewer, with a warning naming
    ``what``; when short, at most ``share`` of the room left (the destinations' pool leaves
    the rest to the HTTP API, which reserves after it: taking it all once left the API one
    connection, and a single idle client made ``/health`` answer 503).
    ``release_descriptors`` gives them back."""
    global _reserved_descriptors
    soft = _raise_soft_limit(_reserved_descriptors + count)
    room = count
    if soft is not None and soft < _reserved_descriptors + count:
        room = max(1, min(count, int((soft - _reserved_descriptors) * share)))
        log.warning("this process may open at most %d files, room for %d %s, not %d; raise "
                    "the limit (ulimit -n) for more", soft, room, what, count)
    _reserved_descriptors += room
    return room


def _raise_soft_limit(wanted: int) -> int | None:
    """This process's soft limit on open files (None: unlimited), raised first to the hard
    one, as Go's runtime does at start: the soft limit is often 1,024, the hard one far
    higher. Raised only as far as the router counted its needs, it left no room for what
    it does not count, such as connections it turns away (each held until answered), and a
    flood of clients took the descriptors that SQLite needs to open its files. Where the
    hard limit cannot be reached (unlimited, while the kernel caps it: macOS's 10,240),
    at least ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    failure: Exception | None = None
    for target in (hard, wanted):
        if target != resource.RLIM_INFINITY and soft < target and (
                hard == resource.RLIM_INFINITY or target <= hard):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return target
            except (ValueError, OSError) as exc:
                failure = exc
    if failure is not None and soft < wanted:
        log.warning("cannot raise the limit on open files from %d: %s", soft, failure)
    return soft


def release_descriptors(count: int) -> None:
    global _reserved_descriptors
    _reserved_descriptors = max(DESCRIPTORS_KEPT, _reserved_descriptors - count)


STALL_WARNING_SECONDS = 5.0
"""How long the event loop may go without turning before the watchdog says so."""
STACK_FRAMES_SHOWN = 6


class LoopWatchdog:
    """Says in the log when the event loop stops turning, and where it is stuck.

    Everything the router does runs on one event loop: a plugin whose ``translate`` loops or
    sleeps, or any other blocking call, holds up intake, every destination and ``/health``
    alike, and nothing else would tell the operator why. A thread cannot stop such code, but
    it can watch the loop's heartbeat and, once it is ``threshold`` seconds late, log the
    innermost frames the loop's thread is running (file, line and function: no values, so
    no secrets), then log again when the loop turns."""

    def __init__(self, *, threshold: float | None = None,
                 holds_up: str = "intake, delivery and /health") -> None:
        self.threshold = STALL_WARNING_SECONDS if threshold is None else threshold
        self.holds_up = holds_up
        """What waits for this loop, as the warning says it: the router's loop holds up
        intake and /health, and delivery too unless a process of its own delivers."""
        self._last_beat = time.monotonic()
        self._heartbeat: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching the running loop (call from inside it)."""
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        self._stopped.clear()
        self._beat(loop)
        self._thread = threading.Thread(target=self._watch, args=(loop, loop_thread),
                                        name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last_beat = time.monotonic()
        self._heartbeat = loop.call_later(self.threshold / 4, self._beat, loop)

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        stalled_since: float | None = None
        while not self._stopped.wait(self.threshold / 4) and not loop.is_closed():
            late = time.monotonic() - self._last_beat
            if stalled_since is None and late >= self.threshold:
                stalled_since = self._last_beat
                log.warning("the event loop has not turned for %.1f s: %s wait until it "
                            "does. It is running: %s", late, self.holds_up,
                            _innermost(loop_thread))
            elif stalled_since is not None and self._last_beat > stalled_since:
                log.warning("the event loop turned again after %.1f s",
                                 self._last_beat - stalled_since)
                stalled_since = None


def _innermost(thread_id: int) -> str:
    """The innermost frames ``thread_id`` is running, outermost first, as ``file:line in
    function`` (the file's last three path parts)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "(no frames)"
    frames = traceback.extract_stack(frame)[-STACK_FRAMES_SHOWN:]
    return " > ".join(f"{'/'.join(Path(entry.filename).parts[-3:])}:{entry.lineno} in "
                      f"{entry.name}" for entry in frames)
