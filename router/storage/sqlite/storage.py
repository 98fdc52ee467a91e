"""``SqliteStorage``: its state, its opening and closing, and the ``Storage`` interface. What
it does is in its bases, one concern each (``router.storage.sqlite`` lists them)."""

from __future__ import annotations

import asyncio
import functools
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson

from router.errors import SpoolInUse, StorageFull, StorageUnavailable
from router.storage.base import Acceptance, Failure, Job, QueueStats, Storage, StorageStats
from router.storage.bundle_format import DAMAGED_BODY
from router.storage.sqlite.budget import MIN_FREE_BYTES, Budget, _disk_free_bytes
from router.storage.sqlite.dedup import _FIRST_KEY, DedupWindow, _check_the_index_name_fits
from router.storage.sqlite.errors import _storage_error
from router.storage.sqlite.lanes import (LANE_BITS, Lanes, RowWriter, _lanes_of, _OpenBundle,
                                         _take_ids_of)
from router.storage.sqlite.letters import _LETTER_COLUMNS, DeadLetterQueue
from router.storage.sqlite.schema import PAGE_SIZE, SpoolFile, holding_index
from router.storage.sqlite.writer import LOCK_TIMEOUT, _expired_row, _Operation

log = logging.getLogger("router.storage")
PURGE_AFTER_EVENTS = 1000
"""Expired message ids are purged once this many events were accepted (a statement less
for most group commits)."""
CLAIM_WAIT = 5.0
"""How long ``claim_delivery`` waits for another holder to let go: the delivery process of
a router killed with ``kill -9`` stops at once on its own, but not in no time."""
_JOB_COLUMNS = ("id, destination, message_id, user_key, grp, body, created_at, attempts, "
                "first_attempt_at")


class SqliteStorage(SpoolFile, DedupWindow, Lanes, DeadLetterQueue, Budget, Storage):
    """The spool in one SQLite file. Its state is all set here, in ``__init__`` (and reset
    by ``open``); its bases hold its work by concern, each in a module of its own:
    ``SpoolFile`` (``schema``), ``DedupWindow`` (``dedup``), ``Lanes`` (``lanes``),
    ``DeadLetterQueue`` (``letters``) and ``Budget`` (``budget``), and under the first four
    ``Writer`` (``writer``), which runs every operation on the writer thread."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL",
                 max_bytes: int | None = None, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.path = path
        self._wal_path = path.with_name(path.name + "-wal")
        self._page_size = PAGE_SIZE
        """The file's own page size, read once it is open."""
        self._dedup_index: tuple[Path, int] | None = None
        """This process's dedup index file, and the descriptor that holds its lock, while
        the spool is open."""
        self.synchronous = synchronous.upper()
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._operations: queue.SimpleQueue[_Operation | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._leaving: threading.Thread | None = None
        """The writer of an ``open`` that failed or was cancelled, told to stop, perhaps not
        gone yet: the next ``open`` waits for it, so two writers never share this state."""
        self._closing: asyncio.Future[None] | None = None
        self._delivery_lock: int | None = None
        self._recover = True
        self._accepted_since_purge = 0
        self._indexed_up_to = 0
        """The last row of ``seen`` in this connection's ``dedup_index``."""
        self._swept_from = _FIRST_KEY
        """The key of the dedup index from which the next purge sweeps it."""
        self._witness: tuple[int, str, str, float] | None = None
        """A row of ``seen`` that the running group commit wrote, if it wrote to the dedup
        index: what tells, after a COMMIT that failed, whether the spool's part of it was
        committed all the same (``_spool_committed``)."""
        self._index_written = False
        """Whether the running group commit wrote to the dedup index."""
        self._intake_failing = False
        """Whether the last accept failed to be written (an I/O error, a lock held too long):
        ``ping`` then writes before it says the storage is ready."""
        # The state of the lanes this process reads (touched by the writer thread only):
        self._read_up_to: dict[int, int] = {}
        """Per lane, the last job id its cursor has passed."""
        self._bundles: dict[int, _OpenBundle] = {}
        """The bundles read and not yet finished, by id (their last job's), with the jobs of
        each that this process holds."""
        self._holding_indexed: set[str] = set()
        """The ``holding_index`` names this process has made sure of."""
        self._ordered_lanes: set[str] = set()
        """The ordered destinations whose bundles this process has moved into ``jobs``."""
        self._damaged: list[tuple[Job, str]] = []
        """Jobs that a lease found damaged (a CRC that does not match), with why, for
        ``lease`` to dead-letter."""
        self._undo: list[Callable[[], object]] | None = None
        """How to undo what the running operation changed in the state above, should its
        SQL be rolled back (see ``_on_rollback``)."""

    @classmethod
    def from_url(cls, url: str, *, base_dir: Path) -> SqliteStorage:
        """``sqlite:///var/router.db`` is relative to ``base_dir``; ``sqlite:////abs.db`` is
        absolute. Options: ``?synchronous=full``, ``?max_bytes=10000000000`` and
        ``?min_free_bytes=``; any other is a ``ValueError``."""
        rest = url.removeprefix("sqlite:///")
        path_part, _, query = rest.partition("?")
        options = {key: values[-1] for key, values in parse_qs(query).items()}
        unknown = sorted(set(options) - {"synchronous", "max_bytes", "min_free_bytes"})
        if unknown:
            raise ValueError(f"unknown sqlite:// storage option {unknown[0]!r}; the options "
                             "are synchronous, max_bytes and min_free_bytes")
        synchronous = options.get("synchronous", "normal")
        if synchronous.lower() not in ("normal", "full"):
            raise ValueError("the synchronous option of a sqlite:// storage URL is `normal` "
                             "(the default) or `full`")
        path = Path(path_part)
        if not path.is_absolute():
            path = base_dir / path
        max_bytes = _byte_count(options, "max_bytes") if "max_bytes" in options else None
        min_free_bytes = (_byte_count(options, "min_free_bytes") if "min_free_bytes" in options
                          else MIN_FREE_BYTES)
        return cls(path, synchronous=synchronous, max_bytes=max_bytes,
                   min_free_bytes=min_free_bytes)

    # -- the writer thread ------------------------------------------------------------------

    async def open(self, *, recover: bool = True) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
        if self._leaving is not None:
            await asyncio.to_thread(self._leaving.join)
            self._leaving = None
        if self._thread is not None:
            raise RuntimeError("the storage is already open")
        self._recover = recover
        self._read_up_to, self._bundles = {}, {}
        self._ordered_lanes = set()
        self._damaged = []
        self._indexed_up_to = 0
        self._swept_from = _FIRST_KEY
        _check_the_index_name_fits(self.path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A queue of its own: a stop left in an earlier writer's queue must not end this one.
        operations: queue.SimpleQueue[_Operation | None] = queue.SimpleQueue()
        self._operations = operations
        self._thread = threading.Thread(target=self._run, args=(ready, operations),
                                        name="sqlite-writer", daemon=True)
        self._thread.start()
        try:
            await ready
        except BaseException:  # it failed, or the open was cancelled: the writer stops too
            operations.put(None)
            self._leaving, self._thread = self._thread, None
            raise

    async def close(self) -> None:
        """Stop the writer once what is queued is done, and give up the delivery lock. Calls
        made from here on raise; a second ``close`` waits for the first; a ``close`` that
        is cancelled finishes all the same."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._operations.put(None)
                await asyncio.to_thread(thread.join)
            if self._delivery_lock is not None:
                os.close(self._delivery_lock)  # releases the lock
                self._delivery_lock = None
        finally:
            self._closing = None

    async def claim_delivery(self) -> None:
        """An exclusive lock on ``<spool>.delivery-lock``, held until ``close``: the jobs a
        process has read live in its memory, so a second process (or a second router in
        this one) delivering from the file would send them again. The kernel drops the lock
        with the process, so a crash never leaves the spool claimed."""
        deadline = time.monotonic() + CLAIM_WAIT
        while (descriptor := lock_delivery(self.path)) is None:
            if time.monotonic() >= deadline:
                raise SpoolInUse(f"another router is delivering from {self.path}; a SQLite "
                                 "spool takes one delivering router (use redis:// storage to "
                                 "share work between routers)")
            await asyncio.sleep(0.1)
        self._delivery_lock = descriptor
        # Only the holder of the claim may take leases back: jobs leased by a process that
        # died go back to the queue (sent again, never lost), but a router that opens the
        # spool beside a live one (a refused second `router serve`, `router send`) would
        # take back the live one's in-flight jobs, and they would be sent twice.
        await self._call(lambda connection: connection.execute(
            "UPDATE jobs SET leased = 0 WHERE leased = 1"))

    def _error(self, exc: Exception) -> Exception:
        """``exc`` as the router's own error when it is SQLite's (``_storage_error``)."""
        return _storage_error(exc, self.path) if isinstance(exc, sqlite3.Error) else exc

    # -- the interface ----------------------------------------------------------------------

    async def accept(self, items: Sequence[Acceptance], *, window: float, now: float) -> list[bool]:
        # The rows are built here, before the write lock is taken: another process (the
        # delivery process) waits for that lock, so it is held for SQLite's work only.
        lanes = _lanes_of(items, now)

        def operation(connection: sqlite3.Connection) -> list[bool]:
            indexed_up_to = self._indexed_up_to  # the dedup index is rolled back too
            self._on_rollback(lambda: setattr(self, "_indexed_up_to", indexed_up_to))
            self._check_budget(connection)
            self._accepted_since_purge += len(items)
            if self._accepted_since_purge >= PURGE_AFTER_EVENTS:
                self._purge_dedup(connection, now, accepted=self._accepted_since_purge)
                self._accepted_since_purge = 0
            self._index_seen(connection, now)
            accepted = self._remember(connection, items, expires_at=now + window, now=now)
            kept = lanes if all(accepted) else [lane.of(accepted) for lane in lanes]
            kept = [lane for lane in kept if lane.jobs.bodies]
            counts: dict[str, int] = {}
            for lane in kept:
                counts[lane.destination] = counts.get(lane.destination, 0) + len(lane.jobs.bodies)
            next_ids = _take_ids_of(connection, counts)
            # The lanes' rows by the function that writes them: all the ordered lanes' rows
            # of ``jobs`` together, 1,000 to a statement; the bundles one by one.
            by_writer: dict[RowWriter, list[Any]] = {}
            for lane in kept:
                first = next_ids[lane.destination]
                next_ids[lane.destination] = first + len(lane.jobs.bodies)
                by_writer.setdefault(lane.write, []).extend(lane.values(first))
            for write, values in by_writer.items():
                write(connection, values)
            return accepted

        try:
            await self._dedup_index_ready()
            accepted = await self._call(operation)
        except StorageUnavailable:
            self._intake_failing = True
            raise
        self._intake_failing = False
        return accepted

    async def prepare_intake(self) -> None:
        """Build the dedup index from ``seen`` now: 2 s of CPU for 900,000 ids in the window,
        which the first request after a restart used to wait for (soak audit). As a read,
        outside any transaction on the spool: it writes only to the process's own index,
        and must not hold the spool's write lock (a router beside this one would stall)."""
        await self._dedup_index_ready()
        await self._call(lambda connection: self._index_seen(connection, time.time()),
                         writes=False)

    async def lease(self, destination: str, limit: int, *, now: float, lease_for: float,
                    ordered: bool = False, hold_attempts: int | None = None) -> list[Job]:
        leased = await self._lease(destination, limit, now=now, ordered=ordered,
                                   hold_attempts=hold_attempts)
        if self._damaged:
            await self._dead_letter_damaged(now)
        return leased

    async def _dead_letter_damaged(self, now: float) -> None:
        """Move the damaged jobs that a lease found to the dead letters, where an operator
        sees what was lost, instead of sending bytes the disk changed (another messageId,
        another amount) or failing every lease of the destination on an unreadable bundle."""
        found, self._damaged = self._damaged, []
        by_reason: dict[tuple[str, str], list[Job]] = {}
        for job, reason in found:
            by_reason.setdefault((job.destination, reason), []).append(job)
        for (destination, reason), jobs in by_reason.items():
            log.error("spool %s: %d job(s) of destination %s moved to the dead letters, %s",
                      self.path, len(jobs), destination, reason)
            try:
                await self.dead_letter(jobs, now=now, failure=Failure(reason))
            except Exception as exc:  # noqa: BLE001 - read again, and found again, later
                log.warning("spool %s: cannot move them yet (%s); they stay queued",
                            self.path, exc)
                with contextlib.suppress(Exception):  # else held until the next start
                    await self.release([job.id for job in jobs])

    async def _lease(self, destination: str, limit: int, *, now: float, ordered: bool,
                     hold_attempts: int | None) -> list[Job]:
        earlier, holding = "jobs AS earlier", ""
        if ordered and hold_attempts is not None:
            index, create, holds = holding_index(int(hold_attempts))
            if index not in self._holding_indexed:
                await self._call(lambda connection: connection.execute(create))
                self._holding_indexed.add(index)
            earlier = f"jobs AS earlier INDEXED BY {index}"
            holding = f" AND earlier.{holds}"
        if ordered and destination not in self._ordered_lanes:
            await self._move_bundles_into_jobs(destination)
        head_of_user = (f" AND NOT EXISTS (SELECT 1 FROM {earlier} WHERE earlier.destination"
                        " = jobs.destination AND earlier.user_key = jobs.user_key AND earlier.id"
                        f" < jobs.id{holding})") if ordered else ""

        # A lease needs no expiry here: it lasts until the job is completed, retried,
        # dead-lettered or released, or the process restarts (then every job is read again).
        # In `jobs` only the unindexed `leased` flag changes; in `bundles` nothing is
        # written, so when no job of `jobs` is due, leasing is a read that takes no lock.
        def read_bundles_only(connection: sqlite3.Connection) -> list[Job] | None:
            if connection.execute("SELECT 1 FROM jobs WHERE destination = ? AND due_at <= ? "
                                  "AND leased = 0 LIMIT 1", (destination, now)).fetchone():
                return None
            return self._read_bundles(connection, destination, limit)

        def operation(connection: sqlite3.Connection) -> list[Job]:
            rows = connection.execute(
                f"UPDATE jobs SET leased = 1 WHERE id IN (SELECT id FROM jobs WHERE destination"
                f" = ? AND due_at <= ? AND leased = 0{head_of_user} ORDER BY due_at, id LIMIT ?)"
                f" RETURNING {_JOB_COLUMNS}, body_crc", (destination, now, limit)).fetchall()
            leased, damaged = [], []
            for *columns, crc in rows:  # no CRC: a row written before layout 2
                job = Job(*columns)
                if crc is None or zlib.crc32(job.body) == crc:
                    leased.append(job)
                else:
                    damaged.append((job, DAMAGED_BODY))
            self._note_damaged(damaged)
            leased.sort(key=_by_id)
            if len(leased) < limit:
                leased += self._read_bundles(connection, destination, limit - len(leased))
            return leased

        leased = await self._call(read_bundles_only, writes=False)
        if leased is not None:
            return leased
        try:
            return await self._call(operation)
        except StorageFull:  # the due rows cannot be marked; the bundles need no write, and
            # delivering them is what frees the disk (it deadlocked here once)
            return await self._call(
                lambda connection: self._read_bundles(connection, destination, limit),
                writes=False)

    async def _move_bundles_into_jobs(self, destination: str) -> None:
        """Before a destination's first ordered lease, its jobs accepted while it was not
        ordered join the per-user order (``_bundles_into_jobs``). Indexed rows take more
        room than bundles: on a full disk the move waits for a later lease, and the jobs
        left in bundles go out meanwhile, as before, since delivering them frees the disk."""
        after: int | None = 0
        while after is not None:
            try:
                after = await self._call(functools.partial(
                    self._bundles_into_jobs, destination=destination, after=after))
            except StorageFull as exc:
                log.warning("destination %s: its jobs queued before it was ordered cannot "
                            "join the per-user order yet, the disk is full (%s); they go "
                            "out unordered meanwhile", destination, exc)
                return
        self._ordered_lanes.add(destination)

    async def complete(self, jobs: Sequence[Job]) -> None:
        job_ids = [job.id for job in jobs]

        def operation(connection: sqlite3.Connection) -> None:
            others = self._settle(connection, job_ids)
            for start in range(0, len(others), 500):
                chunk = others[start:start + 500]
                connection.execute(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})",
                                   chunk)

        await self._call(operation)

    async def retry(self, jobs: Sequence[Job], *, not_before: Sequence[float], now: float,
                    failure: Failure) -> None:
        def operation(connection: sqlite3.Connection) -> None:
            in_jobs_table = set(self._settle(connection, [job.id for job in jobs]))
            for job, due in zip(jobs, not_before):
                if job.id not in in_jobs_table:  # it leaves its bundle for `jobs`
                    connection.execute(
                        "INSERT INTO jobs (id, destination, message_id, user_key, grp, body, "
                        "created_at, due_at, attempts, first_attempt_at, last_error, body_crc) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job.id, job.destination, job.message_id, job.user_key, job.group,
                         job.body, job.created_at, due, job.attempts, job.first_attempt_at,
                         failure.reason, zlib.crc32(job.body)))
                else:
                    connection.execute(
                        "UPDATE jobs SET leased = 0, due_at = ?, attempts = ?, "
                        "first_attempt_at = ?, last_error = ? WHERE id = ?",
                        (due, job.attempts, job.first_attempt_at, failure.reason, job.id))

        await self._call(operation)

    async def dead_letter(self, jobs: Sequence[Job], *, now: float, failure: Failure) -> None:
        request = orjson.dumps(failure.request).decode() if failure.request else None

        def operation(connection: sqlite3.Connection) -> None:
            in_jobs_table = set(self._settle(connection, [job.id for job in jobs]))
            for job in jobs:
                accepted_id = job.id  # a job of a bundle was accepted as it is
                if job.id in in_jobs_table:
                    # a replayed job keeps the id its event was accepted as (`accepted_id`)
                    deleted = connection.execute("DELETE FROM jobs WHERE id = ? RETURNING "
                                                 "accepted_id", (job.id,)).fetchall()
                    if not deleted:
                        continue
                    accepted_id = job.id if deleted[0][0] is None else deleted[0][0]
                connection.execute(
                    f"INSERT INTO dead_letters ({_LETTER_COLUMNS}) VALUES "
                    "(NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.destination, job.message_id, job.user_key, job.group, job.body,
                     job.attempts, job.created_at, now, failure.reason, failure.status,
                     request, failure.response, job.first_attempt_at, accepted_id))

        await self._call(operation)

    async def renew(self, job_ids: Sequence[int | str], *, now: float, lease_for: float
                    ) -> None:
        """Nothing to do: a lease here lasts until its job is settled or released, or the
        process ends (one process delivers from a spool)."""

    async def release(self, job_ids: Sequence[int | str]) -> None:
        """Jobs of ``jobs`` are due again at once; for jobs of bundles, the lane's cursor
        moves back so they are read again (jobs still held are skipped)."""
        now = time.time()

        def operation(connection: sqlite3.Connection) -> None:
            rows = []
            holders = self._holders(job_ids)
            cursors = dict(self._read_up_to)

            def undo() -> None:
                for bundle, job_id in zip(holders, job_ids):
                    if bundle is not None:
                        bundle.held[int(job_id) - bundle.first_id] = 1
                self._read_up_to.update(cursors)

            self._on_rollback(undo)
            for bundle, job_id in zip(holders, job_ids):
                if bundle is None:
                    rows.append((now, job_id))
                    continue
                number = int(job_id)
                bundle.held[number - bundle.first_id] = 0
                lane = number >> LANE_BITS
                if self._read_up_to.get(lane, number) >= number:
                    self._read_up_to[lane] = number - 1
            connection.executemany("UPDATE jobs SET leased = 0, due_at = ? WHERE id = ?", rows)

        await self._call(operation)

    async def ping(self) -> bool:
        """Whether intake would be refused for want of room (``StorageFull``, saying why),
        read on the writer thread: readiness without the counts of ``stats``, which grow
        with the dedup window and would hold up the group commits. After an accept that
        could not be written, also whether a write goes through now (``StorageUnavailable``
        while it does not): with room alone, ``/health`` said ok while every event was
        refused for disk I/O errors, and a load balancer kept sending them (I/O fault audit)."""
        await self._call(self._check_budget, writes=False)
        if self._intake_failing:
            await self._dedup_index_ready()
            await self._call(_expired_row)  # the least write that goes as an accept's does
            self._intake_failing = False
        return True

    async def stats(self, *, now: float) -> StorageStats:
        """Read on a connection of its own, in a thread: on the writer's, the counts held up
        every group commit behind them, 31 ms with 500,000 jobs queued at each scrape of
        ``/metrics`` (stall audit)."""
        def operation() -> StorageStats:
            uri = f"{self.path.absolute().as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT,
                                                    isolation_level=None)) as connection:
                # One read transaction, so that every count is of the same moment (the
                # delivery process may settle a bundle in between); in WAL mode it holds up
                # no writer.
                connection.execute("BEGIN")
                try:
                    return figures(connection)
                finally:
                    connection.execute("COMMIT")

        def figures(connection: sqlite3.Connection) -> StorageStats:
            stats = StorageStats()
            lanes = dict(connection.execute("SELECT number, destination FROM lanes"))
            # A bundle's jobs noted in `settled_runs` are done, or counted in `jobs` (retries).
            settled = dict(connection.execute(
                f"SELECT last >> {LANE_BITS}, SUM(last - first + 1) FROM settled_runs GROUP BY 1"))
            bundled = connection.execute(
                f"SELECT id >> {LANE_BITS}, SUM(id - first_id + 1), MIN(created_at) FROM bundles"
                " GROUP BY 1").fetchall()
            # From the index alone (a table scan would read every body): a destination's
            # lowest job id is its oldest job, since ids are handed out in arrival order.
            rows = [(destination, count, connection.execute(
                        "SELECT created_at FROM jobs WHERE id = ?", (first,)).fetchone()[0])
                    for destination, count, first in connection.execute(
                        "SELECT destination, COUNT(*), MIN(id) FROM jobs INDEXED BY jobs_due "
                        "GROUP BY destination")]
            for destination, pending, oldest in [
                    *((lanes[lane], pending - settled.get(lane, 0), oldest)
                      for lane, pending, oldest in bundled), *rows]:
                queue = stats.queues.setdefault(destination, QueueStats())
                queue.pending += pending
                queue.oldest_created_at = min(oldest, queue.oldest_created_at or oldest)
            for destination, count in connection.execute(
                    "SELECT destination, COUNT(*) FROM dead_letters GROUP BY destination"):
                stats.queues.setdefault(destination, QueueStats()).dead_letters = count
            # Rows are appended and purged oldest first, so the id range is the count (about,
            # if the window was changed between runs) without reading millions of rows.
            stats.dedup_entries = connection.execute(
                "SELECT COALESCE(MAX(id) - MIN(id) + 1, 0) FROM seen").fetchone()[0]
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            stats.bytes_used = pages * self._page_size
            stats.disk_free_bytes = _disk_free_bytes(self.path)
            return stats

        if self._thread is None:
            raise RuntimeError("storage is not open")
        try:
            return await asyncio.to_thread(operation)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc


def _byte_count(options: dict[str, str], name: str) -> int:
    text = options[name]
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"the {name} option of a sqlite:// storage URL is a whole number of "
                         f"bytes, such as 10000000000; got {text!r}")
    return int(text)


def _by_id(job: Job) -> int | str:
    return job.id


def lock_delivery(path: Path) -> int | None:
    """The descriptor of ``<spool>.delivery-lock``, locked exclusively (closing it lets go),
    or None while another process holds it."""
    descriptor = os.open(path.with_name(path.name + ".delivery-lock"),
                         os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor
