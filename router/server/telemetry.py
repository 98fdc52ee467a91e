"""What ``GET /metrics`` shows about intake, beside the router's delivery metrics.

Counters are bumped by the handlers; the queue gauges are read from ``storage.stats`` when
scraped, so they are exact for whichever process (or several, with Redis) shares the storage,
and cost nothing between scrapes. Label values are bounded (configured source and destination
names, the six call types, fixed outcome and reason codes, endpoint names), so a hostile
client cannot grow the series without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from router.metrics import Counter, Gauge, Histogram, Registry
from router.process_stats import ProcessStats, build_info, read_process
from router.storage.base import QueueStats, Storage, StorageStats

if TYPE_CHECKING:
    from router.delivery.process import DeliveryProcess


class IngestMetrics:
    def __init__(self, destinations: Iterable[str] = (), registry: Registry | None = None
                 ) -> None:
        self.registry = registry or Registry()
        self.destinations = tuple(destinations)
        add = self.registry.add
        self.events = add(Counter(
            "router_ingest_events_total",
            "Events received over HTTP, by source, call type and outcome "
            "(accepted, rejected, duplicate).", ["source", "type", "outcome"]))
        self.decisions = add(Counter(
            "router_destination_events_total",
            "Accepted events by destination and what routing decided for it: send, skipped "
            "(integrations map, filter, nothing to send) or invalid (the destination refused "
            "to translate it; `router send --dry-run` shows why).",
            ["destination", "outcome"]))
        self.requests = add(Counter(
            "router_http_requests_total", "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"]))
        self.refusals = add(Counter(
            "router_http_refused_total", "Requests refused as a whole, by reason code "
            "(unauthorized, request_too_large, invalid_json, ...).", ["code"]))
        self.commit_seconds = add(Histogram(
            "router_ingest_commit_seconds",
            "Time to make a request's accepted events durable (the wait before 200)."))
        self._stats = StorageStats()
        self._stats_at = 0.0
        self._stats_read = False
        self._reading: asyncio.Future[StorageStats] | None = None
        add(Gauge("router_storage_up",
                  "1 when this scrape read the storage's figures, 0 when it could not (Redis "
                  "down, say): the queue gauges then show the last figures read, the oldest "
                  "age counted on to now.", [],
                  lambda: {(): 1.0 if self._stats_read else 0.0}))
        add(Gauge("router_queue_depth", "Jobs waiting for delivery, by destination.",
                  ["destination"], self._depth))
        add(Gauge("router_queue_oldest_age_seconds",
                  "Age of the oldest job waiting for delivery, by destination.",
                  ["destination"], self._oldest_age))
        add(Gauge("router_dead_letters", "Jobs in the dead-letter store, by destination.",
                  ["destination"], self._dead_letters))
        add(Gauge("router_dedup_window_ids",
                  "Message ids the dedup window remembers (about the events accepted in the "
                  "window), so that its memory on Redis or disk on SQLite can be sized.", [],
                  lambda: _unlabelled(self._stats.dedup_entries)))
        add(Gauge("router_storage_bytes", "Bytes the spool's database holds (SQLite).", [],
                  lambda: _unlabelled(self._stats.bytes_used)))
        add(Gauge("router_storage_disk_free_bytes",
                  "Free space on the spool's disk (SQLite): intake stops below its "
                  "min_free_bytes.", [], lambda: _unlabelled(self._stats.disk_free_bytes)))

    async def read_stats(self, storage: Storage) -> None:
        """Read the storage's figures for the gauges. Scrapes that come while a read is under
        way wait for that one instead of starting their own: each read counts the queues,
        and on SQLite it takes the writer's turn from intake while it runs."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(storage.stats(now=time.time()))
            self._reading.add_done_callback(self._read_done)
        try:
            self.use_stats(await asyncio.shield(self._reading))
        except Exception:
            # The figures stay the last read, but a frozen oldest age (and a depth of 0 when
            # none was read yet) told an alert that all was well while nothing was delivered.
            self._stats_read, self._stats_at = False, time.time()
            raise

    def _read_done(self, reading: asyncio.Future[StorageStats]) -> None:
        self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: each scrape waiting on it has its own copy

    def use_stats(self, stats: StorageStats, *, now: float | None = None) -> None:
        """The storage figures the gauges show until the next scrape."""
        self._stats, self._stats_at = stats, time.time() if now is None else now
        self._stats_read = True

    def _queues(self) -> dict[str, QueueStats]:
        """Every configured destination (an idle one shows 0, not nothing), plus any other
        the storage still holds work for (one removed from the config, say)."""
        queues = {name: QueueStats() for name in self.destinations}
        queues.update(self._stats.queues)
        return queues

    def _depth(self) -> dict[tuple[str, ...], float]:
        return {(name,): queue.pending for name, queue in self._queues().items()}

    def _oldest_age(self) -> dict[tuple[str, ...], float]:
        return {(name,): max(0.0, self._stats_at - queue.oldest_created_at)
                if queue.pending and queue.oldest_created_at is not None else 0.0
                for name, queue in self._queues().items()}

    def _dead_letters(self) -> dict[tuple[str, ...], float]:
        return {(name,): queue.dead_letters for name, queue in self._queues().items()}


def add_process_metrics(registry: Registry,
                        delivery_process: Callable[[], DeliveryProcess | None]) -> None:
    """The build, and what the serving process and its delivery process cost, read when
    scraped. The serving process's figures carry the names every Prometheus client library
    gives them (``process_*``), so stock dashboards and alerts work; the delivery process's
    are the router's own, with whether it runs and how often it was replaced."""
    add = registry.add
    info = build_info()
    add(Gauge("router_build_info", "Always 1: the router's version and Python's.",
              list(info), lambda: {tuple(info.values()): 1.0}))
    readings = _ProcessReadings()

    def delivery_pid() -> int | None:
        process = delivery_process()
        return process.running_pid if process is not None else None

    def figure(of: Callable[[ProcessStats], float | None],
               pid: Callable[[], int | str | None] = lambda: "self"
               ) -> Callable[[], dict[tuple[str, ...], float]]:
        """A figure of the process ``pid()`` names (none while there is no such process)."""
        def read() -> dict[tuple[str, ...], float]:
            stats = readings.of(pid())
            return _unlabelled(of(stats) if stats is not None else None)
        return read

    def of_delivery(read: Callable[[DeliveryProcess], float]
                    ) -> Callable[[], dict[tuple[str, ...], float]]:
        """No series while delivery runs in the serving process."""
        def value() -> dict[tuple[str, ...], float]:
            process = delivery_process()
            return _unlabelled(read(process) if process is not None else None)
        return value

    add(Gauge("process_cpu_seconds_total", "User and system CPU time of the serving process.",
              [], figure(lambda stats: stats.cpu_seconds), kind="counter"))
    add(Gauge("process_resident_memory_bytes", "Resident memory of the serving process.",
              [], figure(lambda stats: stats.resident_bytes)))
    add(Gauge("process_virtual_memory_bytes", "Virtual memory of the serving process.",
              [], figure(lambda stats: stats.virtual_bytes)))
    add(Gauge("process_start_time_seconds", "When the serving process started (Unix time).",
              [], figure(lambda stats: stats.start_time)))
    add(Gauge("process_open_fds", "Open file descriptors of the serving process.",
              [], figure(lambda stats: stats.open_fds)))
    add(Gauge("process_max_fds", "The serving process's limit on open file descriptors.",
              [], figure(lambda stats: stats.max_fds)))
    add(Gauge("router_delivery_process_up",
              "1 while the delivery process runs and delivers, 0 while it is being replaced.",
              [], of_delivery(lambda process: float(process.running_pid is not None))))
    add(Gauge("router_delivery_process_restarts_total",
              "Delivery processes started to replace one that exited.", [],
              of_delivery(lambda process: process.restarts), kind="counter"))
    add(Gauge("router_delivery_process_cpu_seconds_total",
              "User and system CPU time of the running delivery process.",
              [], figure(lambda stats: stats.cpu_seconds, delivery_pid), kind="counter"))
    add(Gauge("router_delivery_process_resident_memory_bytes",
              "Resident memory of the running delivery process.",
              [], figure(lambda stats: stats.resident_bytes, delivery_pid)))


class _ProcessReadings:
    """One reading of ``/proc`` a process and scrape, shared by the figures rendered from
    it (six for the serving process), rather than one each. The figures of a scrape are
    rendered in one turn of the event loop; the readings are dropped at the next."""

    def __init__(self) -> None:
        self._taken: dict[int | str, ProcessStats | None] = {}

    def of(self, pid: int | str | None) -> ProcessStats | None:
        if pid is None:
            return None
        if not self._taken:
            asyncio.get_running_loop().call_soon(self._taken.clear)
        if pid not in self._taken:
            self._taken[pid] = read_process(pid)
        return self._taken[pid]


def _unlabelled(value: float | None) -> dict[tuple[str, ...], float]:
    """A gauge without labels, or no series at all where the storage has no such figure."""
    return {} if value is None else {(): float(value)}
