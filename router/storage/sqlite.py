"""``sqlite:///path``: the embedded default. One file holds the dedup window, the spool and the
dead letters, so one transaction accepts an event (dedup record and jobs together).

All access goes through one writer thread with one connection. Operations queue up and the
thread runs whatever has gathered in a single transaction (group commit), so a burst of
events costs one commit, not one per event, while each caller still waits for its own change
to be durable. WAL with ``synchronous=NORMAL`` survives a process crash (``kill -9``) without
losing a committed event; ``?synchronous=full`` also survives power loss, at a higher cost.

The spool has two tables, because most jobs never fail:

- ``bundles``, where new jobs are appended: each accept writes one row per destination
  holding all of that destination's jobs from it, packed (``router.storage.bundle_format``).
  Each destination has a *lane* of job ids (its lane number in the high bits, a sequence in
  the low ones); a bundle takes a run of them and is keyed by its last, so a destination's
  bundles are one id range in arrival order. A worker reads its lane past an in-memory
  cursor, so leasing writes nothing, and a bundle whose jobs are all delivered is one
  delete: the spool costs a row per ``accept`` and destination, not per event.
- ``jobs``, indexed by due time and by user: jobs waiting for a retry, replayed dead letters,
  and every job of a destination that keeps per-user order (the per-user check needs the
  index). A job keeps its id when it moves here.

Jobs of a bundle that are settled while others of its bundle are still out (delivered,
retried or dead-lettered) are noted in ``settled_runs``, a row per run of consecutive ids
(a delivered batch is one run), so that the bundle, read again after a restart, gives back
only what is unfinished; those rows go with their bundle. A process keeps each bundle it
reads unpacked until the bundle is finished, so the leases that take it a batch at a time
read and parse it once.

Leases live in the process (one process delivers from a SQLite file): after a crash or restart,
every job not yet completed is read again, so nothing is lost and duplicates carry the same
``messageId``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import glob
import logging
import os
import queue
import re
import resource
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs

import orjson

from router.errors import SpoolInUse, StorageFull, StorageMisconfigured, StorageUnavailable
from router.storage.bundle_format import DAMAGED_BODY, pack_bundle, unpack_bundle
from router.storage.base import (Acceptance, DeadLetter, DeadLetterFilter, Failure, Job,
                                 NewJob, QueueStats, Storage, StorageStats, amount_of_bytes)

T = TypeVar("T")
log = logging.getLogger("router.storage")
MAX_OPERATIONS_PER_COMMIT = 1000
DEDUP_PURGE_MINIMUM = 100
PURGE_AFTER_EVENTS = 1000
"""Expired message ids are purged once this many events were accepted (a statement less
for most group commits)."""
LOCK_TIMEOUT = 10.0
"""Seconds to wait for the write lock that another process holds."""
CLAIM_WAIT = 5.0
"""How long ``claim_delivery`` waits for another holder to let go: the delivery process of
a router killed with ``kill -9`` stops at once on its own, but not in no time."""
PAGE_SIZE = 16384
"""Bytes a page, for new spool files. The spool is mostly bundles, blobs of hundreds of KB
that are written once, read once and deleted: with SQLite's default of 4 KB, each is a
chain of over a hundred overflow pages, every one a WAL frame written, checkpointed, read
and freed. 16 KB pages cut the spool's CPU an event by about a sixth (a fifth to a quarter
for ordered destinations, whose jobs are rows); ``bench.delivery``'s ``spool`` phase
measures it."""
WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint that empties it."""
LAYOUT = 2
"""The spool's layout, stamped in the file as ``PRAGMA user_version``. A file stamped with a
higher number was written by a newer router, which a rollback to this one must not read as
if it understood it (it would send again what the newer one delivered, or miss what it
queued). 0 is a file made before stamping, whose tables tell its layout."""
MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space on the spool's disk below which intake is refused, kept for delivery."""
SALVAGE_ADVICE = ("stop every router process that uses it, then run `router salvage -c "
                  "CONFIG`, which keeps a copy of the damaged file and puts back every row "
                  "that can still be read (docs/storage.md, 'A damaged spool')")
DEDUP_INDEX_SUFFIX = ".dedup-"
_UNREAD_PAGE = re.compile(r"unable to get the page\. error code=(\d+)")
LANE_BITS = 40
"""Job ids are ``lane << LANE_BITS | sequence``: 10^12 jobs a destination, 2^23 destinations."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, message_id TEXT NOT NULL,
    expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS lanes (
    destination TEXT PRIMARY KEY, number INTEGER NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, created_at REAL NOT NULL,
    jobs BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS settled_runs (last INTEGER PRIMARY KEY, first INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, destination TEXT NOT NULL, message_id TEXT NOT NULL,
    user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL,
    due_at REAL NOT NULL, leased INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, first_attempt_at REAL, last_error TEXT,
    body_crc INTEGER);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (destination, due_at, id);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (destination, user_key, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, destination TEXT NOT NULL, message_id TEXT NOT NULL,
    user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL,
    created_at REAL NOT NULL, failed_at REAL NOT NULL, reason TEXT NOT NULL, status INTEGER,
    request TEXT, response TEXT, first_attempt_at REAL);
CREATE INDEX IF NOT EXISTS dead_letters_destination ON dead_letters (destination, failed_at);
"""
DEDUP_INDEX_SCHEMA = """
PRAGMA dedup_index.journal_mode = MEMORY;
PRAGMA dedup_index.synchronous = OFF;
PRAGMA dedup_index.locking_mode = EXCLUSIVE;
PRAGMA dedup_index.cache_size = -4096;
CREATE TABLE dedup_index.keys (key INTEGER PRIMARY KEY, expires_at REAL NOT NULL);
CREATE INDEX dedup_index.keys_expiry ON keys (expires_at);
"""
"""The lookup side of the dedup window: a database of this process's own, in a file beside
the spool (``router.db.dedup-PID-TOKEN``) that nothing fsyncs or journals; the OS's page
cache holds what SQLite's does not. It is made anew at each open, rebuilt from ``seen``,
locked while open and removed at close; one no process holds is removed at the next open. In
SQLite's temporary directory (``/var/tmp``), as it was, it took room outside the spool's
disk that neither ``max_bytes`` nor ``min_free_bytes`` saw (about 51 bytes an id), and when
that disk filled, intake refused every event while ``/health`` said ok and the refusal named
the spool's disk (disk audit). SQLite's own cache for it is kept small (4 MB):
each commit of a temporary database costs in proportion to the pages its cache holds, and
with 64 MB, a million ids in the window made every commit cost 2 ms (an accept of one event
2,056 µs of CPU against 264 with an empty window; a hundred a call, 66.9 µs an event
against 6.5). With 4 MB: 300 µs and 14.5 µs (``bench.delivery``'s ``dedup_window``)."""

_JOB_COLUMNS = ("id, destination, message_id, user_key, grp, body, created_at, attempts, "
                "first_attempt_at")
MAX_BUNDLE_JOBS = 1000
"""An accept writes a destination's jobs in bundles of at most this many."""
REPLAY_PAGE = 1000
"""Dead letters a replay moves back to the queue in one transaction."""
_LETTER_COLUMNS = ("id, destination, message_id, user_key, grp, body, attempts, created_at, "
                   "failed_at, reason, status, request, response, first_attempt_at")
ADDED_COLUMNS = (("dead_letters", "first_attempt_at", "REAL"), ("jobs", "body_crc", "INTEGER"))
"""Columns that layout 2 added to tables of layout 1, which a router adds to such a file."""


class _Operation(NamedTuple):
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    writes: bool


class SqliteStorage(Storage):
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
        """The bundles read and not yet finished, by id."""
        self._bundle_of: dict[int | str, _OpenBundle] = {}
        """The jobs of bundles leased by this process and not yet settled, each with its
        bundle: what a cursor moved back by ``release`` must not hand out twice."""
        self._holding_indexed: set[str] = set()
        """The ``holding_index`` names this process has made sure of."""
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
        self._read_up_to, self._bundles, self._bundle_of = {}, {}, {}
        self._damaged = []
        self._indexed_up_to = 0
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

    def _run(self, ready: asyncio.Future[None],
             operations: queue.SimpleQueue[_Operation | None]) -> None:
        loop = ready.get_loop()
        try:
            connection = self._connect()
        except Exception as exc:  # noqa: BLE001 - reported to the opener
            _tell(loop, ready, self._error(exc))
            return
        _tell(loop, ready, None)
        try:
            self._serve_operations(connection, operations)
        finally:
            connection.close()
            self._remove_dedup_index()

    def _serve_operations(self, connection: sqlite3.Connection,
                          operations: queue.SimpleQueue[_Operation | None]) -> None:
        """The writer thread's loop: gather what is queued, reads first, then one commit for
        the writes, until ``close`` queues the stop (None)."""
        with connection:
            while (first := operations.get()) is not None:
                batch = [first]
                stop = False
                while len(batch) < MAX_OPERATIONS_PER_COMMIT:
                    try:
                        item = operations.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                # Reads first, outside the write transaction: WAL readers take no lock, so
                # a worker's lease never waits for another process's writes, nor holds them up.
                self._run_reads(connection, [item for item in batch if not item.writes])
                writes = [item for item in batch if item.writes]
                if writes:
                    self._commit(connection, writes)
                if stop:
                    break

    def _connect(self) -> sqlite3.Connection:
        """The writer's connection, set up; closed again when the setup fails (a spool of a
        later layout, a lock held elsewhere), not left for the garbage collector.

        A new spool is readable by its owner only: it holds the events, personal data among
        them, and the dead letters' requests and answers. SQLite gives its ``-wal`` and
        ``-shm`` files the database file's permissions; a spool made before keeps its own."""
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._set_up(connection)
        except BaseException:
            connection.close()
            self._remove_dedup_index()
            raise
        return connection

    async def _dedup_index_ready(self) -> None:
        """Made if it is not yet (see ``_attach_dedup_index``), outside any transaction."""
        if self._dedup_index is None:
            await self._call(self._attach_dedup_index, writes=False)

    def _attach_dedup_index(self, connection: sqlite3.Connection) -> None:
        """A new, empty ``dedup_index`` file (see ``DEDUP_INDEX_SCHEMA``), private as the
        spool is and locked (``flock``) while open, after removing those no process holds.
        By lock, not by process id: a router that is process 1 in its container is process
        1 again after a restart, and the files of its earlier lives piled up (review).

        Made by the first intake (``prepare_intake`` in a router), not at open: a process
        that only delivers or reads never uses one, and the delivery process, which could
        not make it on a failing disk, was started again and again (I/O fault audit)."""
        if self._dedup_index is not None:
            return
        index = self.path.with_name(
            f"{self.path.name}{DEDUP_INDEX_SUFFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            for other in self.path.parent.glob(
                    f"{glob.escape(self.path.name)}{DEDUP_INDEX_SUFFIX}*"):
                _remove_if_unheld(other)
            held = os.open(index, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StorageUnavailable(f"the spool's dedup index {index} cannot be made: "
                                     f"{exc.strerror}") from exc
        self._dedup_index = (index, held)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            connection.execute("ATTACH ? AS dedup_index", (str(index),))
            connection.executescript(DEDUP_INDEX_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("DETACH dedup_index")
            self._remove_dedup_index()
            raise StorageUnavailable(f"the spool's dedup index {index} cannot be made: "
                                     f"{exc}") from exc

    def _remove_dedup_index(self) -> None:
        """After the connection is closed: closing a descriptor of a file drops every lock
        the process's SQLite holds on it."""
        if self._dedup_index is not None:
            index, held = self._dedup_index
            index.unlink(missing_ok=True)
            os.close(held)
            self._dedup_index = None

    def _set_up(self, connection: sqlite3.Connection) -> None:
        # Only a new file takes it; a file made before keeps its own page size.
        connection.execute(f"PRAGMA page_size={PAGE_SIZE}")
        connection.execute("PRAGMA journal_mode=WAL")
        # Under steady load from two processes the WAL can outgrow the auto-checkpoint size
        # (1,000 pages: 16 MB), and a WAL file keeps its largest size unless limited.
        connection.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        synchronous = "FULL" if self.synchronous == "FULL" else "NORMAL"
        connection.execute(f"PRAGMA synchronous={synchronous}")
        connection.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT * 1000)}")
        # Some builds of SQLite overwrite deleted content with zeros, through the WAL: then
        # deleting delivered bundles on a full disk needs as much space as it frees.
        connection.execute("PRAGMA secure_delete=OFF")
        if self._recover and (damage := self._damage(connection)) is not None:
            raise StorageUnavailable(damage)
        self._prepare_layout(connection)
        (self._page_size,) = connection.execute("PRAGMA page_size").fetchone()
        connection.create_function("dedup_key", 2, _dedup_key, deterministic=True)
        connection.execute("PRAGMA busy_timeout=0")  # _begin waits for the lock itself

    def _damage(self, connection: sqlite3.Connection) -> str | None:
        """The file's damage and what to do, or None. A router checks when it starts
        (``PRAGMA integrity_check``, 0.34 s a GB), so that damage is said at once, not met
        by an intake or a lease hours later, and then again every few seconds; ``router
        check --storage`` asks the same (``damage``)."""
        damage = damage_in(connection)
        return None if damage is None else (
            f"the spool {self.path} is damaged ({damage}): {SALVAGE_ADVICE}")

    async def damage(self) -> str | None:
        return await self._call(self._damage, writes=False)

    def _prepare_layout(self, connection: sqlite3.Connection) -> None:
        """Create the tables of a new file; convert a file of an earlier layout, but only in
        a router (``open(recover=True)``): ``router dlq`` or ``router check --storage`` run
        beside a router of the earlier version would drop tables from under it. Refuse a
        file of a later layout."""
        (layout,) = connection.execute("PRAGMA user_version").fetchone()
        if layout > LAYOUT:
            raise StorageMisconfigured(
                f"the spool {self.path} was written by a newer version of the router (spool "
                f"layout {layout}; this version reads layout {LAYOUT} and earlier): run the "
                "newer version, or give this one a new spool file")
        fresh = connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
        earlier = _old_tables(connection)
        if earlier and not self._recover:
            raise StorageMisconfigured(
                f"the spool {self.path} was written by an earlier version of the router and "
                f"is not converted yet (it has the table {earlier[0]!r}): stop the router "
                "that uses it and start the new one, which converts the file")
        connection.executescript(SCHEMA)
        _move_the_old_tables(connection, earlier)
        missing = [(table, column, kind) for table, column, kind in ADDED_COLUMNS
                   if column not in _columns_of(connection, table)]
        if missing and not self._recover:
            raise StorageMisconfigured(
                f"the spool {self.path} was written by an earlier version of the router and "
                f"is not converted yet (its table {missing[0][0]!r} has no column "
                f"{missing[0][1]!r}): stop the router that uses it and start the new one, "
                "which converts the file")
        for table, column, kind in missing:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if layout < LAYOUT and (self._recover or fresh):
            connection.execute(f"PRAGMA user_version={LAYOUT}")

    def _run_reads(self, connection: sqlite3.Connection, reads: list[_Operation]) -> None:
        for operation, future, _ in reads:
            self._undo = []
            try:
                result, error = operation(connection), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                _undo(self._undo)
                result = None
                error = self._error(exc)
            finally:
                self._undo = None
            future.get_loop().call_soon_threadsafe(_resolve, future, result, error)

    def _commit(self, connection: sqlite3.Connection, batch: list[_Operation]) -> None:
        """Run ``batch`` in one transaction, each operation undone alone if it fails (in a
        savepoint, unless it is alone: every statement hands the GIL over and back, and a
        wait for it there holds the write lock that another process may be waiting for).

        What an operation changed in this process's memory is undone with its SQL. A full
        disk makes SQLite roll back the whole transaction by itself: then every operation
        of the batch fails, and its changes are undone."""
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        undo_so_far: list[Callable[[], object]] = []
        alone = len(batch) == 1
        indexed_up_to = self._indexed_up_to
        self._witness, self._index_written = None, False
        try:
            _begin(connection)
            for operation, future, _ in batch:
                if not alone:
                    connection.execute("SAVEPOINT operation")
                self._undo = []
                try:
                    result = operation(connection)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    _undo(self._undo)
                    error: BaseException = self._error(exc)
                    if not connection.in_transaction:
                        raise _TransactionLost(error) from exc
                    connection.execute("ROLLBACK" if alone else "ROLLBACK TO operation")
                    outcomes.append((future, None, error))
                else:
                    undo_so_far += self._undo
                    outcomes.append((future, result, None))
                if not alone:
                    connection.execute("RELEASE operation")
            if connection.in_transaction:
                self._commit_witnessed(connection, indexed_up_to)
        except (sqlite3.Error, _TransactionLost) as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            _undo(undo_so_far)
            error = exc.error if isinstance(exc, _TransactionLost) else self._error(exc)
            outcomes = [(future, None, error) for _, future, _ in batch]
        finally:
            self._undo = None
        for future, result, failure in outcomes:
            future.get_loop().call_soon_threadsafe(_resolve, future, result, failure)

    def _commit_witnessed(self, connection: sqlite3.Connection, indexed_up_to: int) -> None:
        """COMMIT, and when it fails in the dedup index only, let the batch's outcomes stand.

        In WAL mode SQLite commits the spool, then the attached index, and not atomically
        across them: when the index's part fails (a disk filled from outside, an I/O
        error), the spool's changes are durable all the same. Reported as failed, and their
        bookkeeping in memory undone, they were worse than a failure (spool audit): an
        accepted event answered 503, a leased job no worker held (an ordered destination
        stalled until restart), a completion that failed again for good on its own
        ``settled_runs`` row, a retry sent twice and a dead letter written twice. So a batch
        that writes to the index also has a row of ``seen`` to look for afterwards: its
        accepts' last one, or else a witness row of its own (expired at once, so nothing
        reads it as a message id). The index was rolled back whole, so it is brought up to
        date from ``seen`` again at the next accept."""
        if self._index_written and self._witness is None:
            self._witness = _expired_row(connection)
        try:
            connection.execute("COMMIT")
        except sqlite3.Error:
            if not self._spool_committed(connection):
                raise
            log.warning("the dedup index %s could not be written; the spool's commit "
                        "stands, and the index is brought up to date from it",
                        self._dedup_index[0] if self._dedup_index else "")
            self._indexed_up_to = min(self._indexed_up_to, indexed_up_to)

    def _spool_committed(self, connection: sqlite3.Connection) -> bool:
        """After a COMMIT that failed: whether the batch's witness row is in the spool. Its
        id alone could be another process's row by now; with its values, it is not."""
        if self._witness is None or connection.in_transaction:
            return False
        try:
            return connection.execute(
                "SELECT 1 FROM seen WHERE id = ? AND source = ? AND message_id = ? AND "
                "expires_at = ?", self._witness).fetchone() is not None
        except sqlite3.Error:
            return False

    def _on_rollback(self, undo: Callable[[], object]) -> None:
        """Note how to undo a change the running operation made to this process's memory
        (a bundle settled, a cursor moved), run if its SQL is rolled back: left in place, a
        job whose retry could not be written on a full disk was in no table and in no
        memory, and was lost once its bundle's other jobs were delivered."""
        if self._undo is not None:
            self._undo.append(undo)

    async def _call(self, operation: Callable[[sqlite3.Connection], T], *,
                    writes: bool = True) -> T:
        """Run ``operation`` on the writer thread: in the next group commit, or, when it
        only reads (``writes=False``), before it and outside any transaction."""
        if self._thread is None:
            raise RuntimeError("storage is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._operations.put(_Operation(operation, future, writes))
        return await future

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
                self._purge_dedup(connection, now, at_least=2 * self._accepted_since_purge)
                self._accepted_since_purge = 0
            self._index_seen(connection, now)
            remembered = self._remember(connection, items, expires_at=now + window, now=now)
            accepted = []
            for item in items:
                key = (item.source, item.message_id)
                accepted.append(key in remembered)
                remembered.discard(key)  # a repeat later in this batch is a duplicate
            kept = lanes if all(accepted) else [lane.of(accepted) for lane in lanes]
            kept = [lane for lane in kept if lane.jobs]
            counts: dict[str, int] = {}
            for lane in kept:
                counts[lane.destination] = counts.get(lane.destination, 0) + len(lane.jobs)
            next_ids = _take_ids_of(connection, counts)
            by_table: dict[tuple[str, int], list[Any]] = {}
            for lane in kept:
                first = next_ids[lane.destination]
                next_ids[lane.destination] = first + len(lane.jobs)
                by_table.setdefault((lane.insert, lane.width), []).extend(lane.values(first))
            for (insert, width), values in by_table.items():
                _insert_rows(connection, insert, width, values)
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

    def _check_budget(self, connection: sqlite3.Connection) -> None:
        """Refuse new work (``StorageFull``) when the spool has reached ``max_bytes``, or
        when it has less than ``min_free_bytes`` of room: delivery needs room to write what
        becomes of the work already accepted (the WAL, retries, dead letters), and on a disk
        filled to the last byte it could record nothing, and stopped.

        The room is the disk's free space, plus the pages free inside the spool (what
        delivery has freed: the file keeps its size, and new work takes them first), less
        what the next checkpoint will add to the file: the pages the WAL holds beyond the
        file's end, which a long read (a backup, a ``sqlite3`` shell) keeps from being copied
        home while intake goes on. With the free space alone, the WAL grew to 194 MB beside
        64 MB free, the checkpoint after the read took the last byte, and delivery could
        record nothing again (disk audit); and once a backlog had drained, its room stayed
        inside the file, and intake stayed refused with an empty queue (soak).

        The WAL file's size bounds that growth, so while the disk has room beyond it the
        spool's own figures are not read (two pragmas, 5.6 µs an accept call)."""
        free = _disk_free_bytes(self.path)
        if self.max_bytes is None and free - _file_size(self._wal_path) >= self.min_free_bytes:
            return
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        (free_pages,) = connection.execute("PRAGMA freelist_count").fetchone()
        size = self._page_size
        growth = max(0, pages * size - _file_size(self.path))
        if free + free_pages * size - growth < self.min_free_bytes:
            inside = (f" and {amount_of_bytes(free_pages * size)} inside the spool"
                      if free_pages else "")
            added = (f", less the {amount_of_bytes(growth)} its next checkpoint adds to the "
                     "spool" if growth >= 2**20 else "")
            raise StorageFull(f"the spool's disk has {amount_of_bytes(free)} free{inside}"
                              f"{added}, under the {amount_of_bytes(self.min_free_bytes)} kept "
                              "for delivery (?min_free_bytes=)")
        if self.max_bytes is not None and (pages - free_pages) * size >= self.max_bytes:
            raise StorageFull(f"the spool has reached its budget of {self.max_bytes} bytes")

    def _purge_dedup(self, connection: sqlite3.Connection, now: float, *, at_least: int) -> None:
        """Forget expired message ids, twice as many as were just remembered, so both sides
        stay bounded at any intake rate without one large delete stalling the writer. Rows of
        ``seen`` expire in the order they were written (each at its accept's time plus the
        window), so only the oldest are looked at."""
        limit = max(at_least, DEDUP_PURGE_MINIMUM)
        connection.execute("DELETE FROM seen WHERE id IN (SELECT id FROM seen ORDER BY id "
                           "LIMIT ?) AND expires_at <= ?", (limit, now))
        if connection.execute("DELETE FROM dedup_index.keys WHERE key IN (SELECT key FROM "
                              "dedup_index.keys WHERE expires_at <= ? LIMIT ?)",
                              (now, limit)).rowcount:
            self._index_written = True

    def _index_seen(self, connection: sqlite3.Connection, now: float) -> None:
        """Bring the dedup index up to date with ``seen``: all of it at ``prepare_intake`` (or
        the first accept) after opening, and afterwards whatever another process may have
        accepted into the file.
        The keys go in sorted, which SQLite appends instead of placing each one."""
        last = connection.execute("SELECT COALESCE(MAX(id), 0) FROM seen").fetchone()[0]
        if last == self._indexed_up_to:
            return
        if connection.execute(
                "INSERT INTO dedup_index.keys (key, expires_at) SELECT dedup_key(source, "
                "message_id) AS key, MAX(expires_at) FROM seen WHERE id > ? AND id <= ? AND "
                "expires_at > ? GROUP BY key ORDER BY key ON CONFLICT (key) DO UPDATE SET "
                "expires_at = max(expires_at, excluded.expires_at)",
                (self._indexed_up_to, last, now)).rowcount:
            self._index_written = True
        self._indexed_up_to = last

    def _remember(self, connection: sqlite3.Connection, items: Sequence[Acceptance], *,
                  expires_at: float, now: float) -> set[tuple[str, str]]:
        """Record each ``(source, messageId)`` not seen within its window; returns those.

        Message ids are random (UUIDs, mostly), so an index of them takes each new one at a
        random place: in the spool's file, every accepted event would rewrite a page of that
        index through the WAL and again at the checkpoint (measured: 32 KB written and 35 µs
        an event). So the durable record, ``seen``, is written in arrival order, and lookups
        go to ``dedup_index``, which nothing writes to disk. It is keyed by the pair's 64-bit
        hash: two different ids of one source with the same hash inside the window would
        make the second a duplicate, about once in 10^12 events with ten million ids in the
        window.

        One statement per 300 events: the first of two repeats in a batch is taken, the
        second then meets the entry the first just wrote."""
        taken: set[tuple[str, str]] = set()
        for start in range(0, len(items), 300):
            keys = {_dedup_key(*pair): pair for pair in ((item.source, item.message_id)
                                                         for item in items[start:start + 300])}
            taken.update(keys[key] for (key,) in connection.execute(
                "INSERT INTO dedup_index.keys (key, expires_at) "
                f"SELECT column1, ? FROM (VALUES {', '.join(['(?)'] * len(keys))}) "
                "WHERE true ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at "
                "WHERE keys.expires_at <= ? RETURNING key", (expires_at, *keys, now)))
        pairs = list(taken)
        last = _insert_rows(connection, "INSERT INTO seen (source, message_id, expires_at)", 3,
                            [value for source, message_id in pairs
                             for value in (source, message_id, expires_at)])
        if last is not None:  # the index has these rows already
            self._indexed_up_to = last
            witness, self._witness = self._witness, (last, *pairs[-1], expires_at)
            self._on_rollback(lambda: setattr(self, "_witness", witness))
        return taken

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

    def _read_bundles(self, connection: sqlite3.Connection, destination: str, limit: int
                      ) -> list[Job]:
        """Up to ``limit`` jobs of a destination's bundles past its cursor, moving the
        cursor and skipping jobs already settled or still held by this process."""
        lane = _lane_of(connection, destination)
        if lane is None:
            return []
        end = (lane + 1) << LANE_BITS
        after = self._read_up_to.get(lane, lane << LANE_BITS)
        taken: list[Job] = []
        damaged: list[tuple[Job, str]] = []
        opened: list[int] = []

        def undo(cursor: int = after) -> None:
            self._read_up_to[lane] = cursor
            for job in taken + [job for job, _ in damaged]:
                self._bundle_of.pop(job.id, None)
            for bundle_id in opened:  # read in a transaction that did not happen
                self._bundles.pop(bundle_id, None)

        self._on_rollback(undo)
        while len(taken) + len(damaged) < limit:
            # A bundle is keyed by its last job id, so the bundles that hold the next
            # `wanted` ids end past `after` and start at or before `after + wanted`; one
            # holds at most MAX_BUNDLE_JOBS ids, which bounds the scan.
            wanted = after + limit - len(taken)
            rows = connection.execute(
                "SELECT id, first_id FROM bundles WHERE id > ? AND id <= ? AND first_id <= ? "
                "ORDER BY id", (after, min(end - 1, wanted + MAX_BUNDLE_JOBS), wanted)).fetchall()
            if not rows:  # none there: the next bundle, past a run of ids used by `jobs`
                rows = connection.execute(
                    "SELECT id, first_id FROM bundles WHERE id > ? AND id < ? ORDER BY id "
                    "LIMIT 1", (after, end)).fetchall()
                if not rows:
                    break
            for bundle_id, first_id in rows:
                if bundle_id not in self._bundles:
                    opened.append(bundle_id)
                bundle = self._open_bundle(connection, bundle_id, first_id)
                for index in range(max(after + 1 - first_id, 0), len(bundle.jobs)):
                    if len(taken) + len(damaged) == limit:
                        break
                    after = job_id = first_id + index
                    if job_id in bundle.unsettled and job_id not in self._bundle_of:
                        message_id, user_key, group, body = bundle.jobs[index]
                        job = Job(job_id, destination, message_id, user_key, group, body,
                                  bundle.created_at)
                        self._bundle_of[job_id] = bundle
                        if bundle.damaged and index in bundle.damaged:
                            damaged.append((job, bundle.damaged[index]))
                        else:
                            taken.append(job)
                if len(taken) + len(damaged) == limit:
                    break
        self._read_up_to[lane] = after
        self._note_damaged(damaged)
        return taken

    def _note_damaged(self, damaged: list[tuple[Job, str]]) -> None:
        """Keep damaged jobs that a lease found, with why, for ``lease`` to dead-letter;
        forgotten again if the lease's transaction is rolled back."""
        if damaged:
            self._damaged += damaged
            self._on_rollback(lambda: setattr(self, "_damaged", [
                found for found in self._damaged if found not in damaged]))

    def _open_bundle(self, connection: sqlite3.Connection, bundle_id: int, first_id: int
                     ) -> _OpenBundle:
        bundle = self._bundles.get(bundle_id)
        if bundle is None:
            created_at, packed = connection.execute(
                "SELECT created_at, jobs FROM bundles WHERE id = ?", (bundle_id,)).fetchone()
            settled = {job_id for first, last in connection.execute(
                           "SELECT first, last FROM settled_runs WHERE last BETWEEN ? AND ?",
                           (first_id, bundle_id))
                       for job_id in range(first, last + 1)}
            bundle = self._bundles[bundle_id] = _OpenBundle(bundle_id, first_id, created_at,
                                                            packed, settled)
        return bundle

    def _settle(self, connection: sqlite3.Connection, job_ids: Iterable[int | str]
                ) -> list[int | str]:
        """Forget held jobs: the bundles they finish are deleted, and in a bundle still
        open they are noted in ``settled_runs``. Returns the ids that are not of a bundle
        (rows of ``jobs``)."""
        others: list[int | str] = []
        settled: dict[_OpenBundle, list[int]] = {}
        for job_id in job_ids:
            bundle = self._bundle_of.pop(job_id, None)
            if bundle is None:
                others.append(job_id)
            else:
                bundle.unsettled.discard(job_id)
                settled.setdefault(bundle, []).append(int(job_id))
        # A finished bundle goes whole, with its notes; the others' settled jobs are noted,
        # a row per run of consecutive ids of one bundle.
        finished: list[_OpenBundle] = []
        runs: list[int] = []
        had_settled_rows = [(bundle, bundle.has_settled_rows) for bundle in settled]
        for bundle, ids in settled.items():
            if not bundle.unsettled:
                del self._bundles[bundle.id]
                finished.append(bundle)
            else:
                bundle.has_settled_rows = True
                runs += [bound for first, last in _runs(sorted(ids)) for bound in (last, first)]

        def undo() -> None:
            for bundle, ids in settled.items():
                bundle.unsettled.update(ids)
                self._bundle_of.update(dict.fromkeys(ids, bundle))
            for bundle, had in had_settled_rows:
                bundle.has_settled_rows = had
            for bundle in finished:
                self._bundles[bundle.id] = bundle

        if settled:
            self._on_rollback(undo)
        if runs:
            _insert_rows(connection, "INSERT INTO settled_runs (last, first)", 2, runs)
        for start in range(0, len(finished), 500):
            chunk = finished[start:start + 500]
            connection.execute(f"DELETE FROM bundles WHERE id IN ({', '.join('?' * len(chunk))})",
                               [bundle.id for bundle in chunk])
            for bundle in chunk:
                if bundle.has_settled_rows:
                    connection.execute("DELETE FROM settled_runs WHERE last BETWEEN ? AND ?",
                                       (bundle.first_id, bundle.id))
        return others

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
                if job.id not in in_jobs_table or connection.execute(
                        "DELETE FROM jobs WHERE id = ?", (job.id,)).rowcount:
                    connection.execute(
                        f"INSERT INTO dead_letters ({_LETTER_COLUMNS}) VALUES "
                        "(NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job.destination, job.message_id, job.user_key, job.group, job.body,
                         job.attempts, job.created_at, now, failure.reason, failure.status,
                         request, failure.response, job.first_attempt_at))

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
            held = {job_id: self._bundle_of[job_id] for job_id in job_ids
                    if job_id in self._bundle_of}
            cursors = dict(self._read_up_to)
            self._on_rollback(lambda: (self._bundle_of.update(held),
                                       self._read_up_to.update(cursors)))
            for job_id in job_ids:
                if self._bundle_of.pop(job_id, None) is None:
                    rows.append((now, job_id))
                    continue
                number = int(job_id)
                lane = number >> LANE_BITS
                if self._read_up_to.get(lane, number) >= number:
                    self._read_up_to[lane] = number - 1
            connection.executemany("UPDATE jobs SET leased = 0, due_at = ? WHERE id = ?", rows)

        await self._call(operation)

    async def dead_letters(self, where: DeadLetterFilter, *, limit: int = 100) -> list[DeadLetter]:
        clause, params = _where(where)

        def operation(connection: sqlite3.Connection) -> list[DeadLetter]:
            rows = connection.execute(f"SELECT {_LETTER_COLUMNS} FROM dead_letters{clause} "
                                      "ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
            return [_dead_letter(row) for row in reversed(rows)]

        return await self._call(operation)

    async def replay(self, where: DeadLetterFilter, *, now: float) -> int:
        """A page of letters a transaction: in one, a replay of a million letters held
        every body in memory, and the write lock (intake waits for it) for its whole work."""
        clause, params = _where(where)
        # A letter whose body the spool's damage took (its bundle's list was unreadable) has
        # nothing to send: replayed, it went out as an empty request. It stays, to be purged.
        clause += (" AND " if clause else " WHERE ") + "length(body) > 0 AND id > ? AND id <= ?"
        # Only letters that exist now: a replayed job failing again during a long replay
        # becomes a newer letter, which this replay must not pick up again.
        (upto,) = await self._call(lambda connection: connection.execute(
            "SELECT coalesce(max(id), 0) FROM dead_letters").fetchone(), writes=False)

        def page(connection: sqlite3.Connection, after: int) -> list[int]:
            letters = connection.execute(
                f"SELECT id, destination, message_id, user_key, grp, body FROM dead_letters"
                f"{clause} ORDER BY id LIMIT {REPLAY_PAGE}", (*params, after, upto)).fetchall()
            by_destination: dict[str, list[tuple[Any, ...]]] = {}
            for letter in letters:
                by_destination.setdefault(letter[1], []).append(letter[1:])
            for destination, rows in by_destination.items():
                first = _take_ids(connection, destination, len(rows))
                connection.executemany(
                    "INSERT INTO jobs (id, destination, message_id, user_key, grp, body, "
                    "created_at, due_at, body_crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(first + n, *row, now, now, zlib.crc32(row[-1]))
                     for n, row in enumerate(rows)])
            ids = [letter[0] for letter in letters]
            connection.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
            return ids

        replayed, after = 0, 0
        while ids := await self._call(functools.partial(page, after=after)):
            replayed, after = replayed + len(ids), ids[-1]
        return replayed

    async def purge(self, where: DeadLetterFilter) -> int:
        clause, params = _where(where)
        return await self._call(lambda connection: connection.execute(
            f"DELETE FROM dead_letters{clause}", params).rowcount)

    async def seen_before(self, source: str, message_ids: Sequence[str], *, now: float
                          ) -> set[str]:
        """Read from ``seen`` (the dedup index lives in the writer's memory) on a read-only
        connection of its own, so it works beside a router that has the spool open. A spool
        that no router has open, with no WAL file, is read as immutable: a read-only
        connection to it would leave new ``-wal`` and ``-shm`` files behind."""
        if not self.path.exists() or not message_ids:
            return set()
        return await asyncio.to_thread(self._read_seen, source, list(message_ids), now)

    def _read_seen(self, source: str, message_ids: list[str], now: float) -> set[str]:
        """Read as immutable while no router has the spool open (no WAL file), and again on
        an ordinary read-only connection if one opened it meanwhile: an immutable read of a
        file being written may fail ("malformed") or see a torn state."""
        wal = self.path.with_name(self.path.name + "-wal")
        if not wal.exists():
            before = self.path.stat()
            try:
                found = self._select_seen("immutable=1", source, message_ids, now)
            except sqlite3.DatabaseError:
                found = None
            after = self.path.stat()
            if found is not None and not wal.exists() and \
                    (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
                return found
        return self._select_seen("mode=ro", source, message_ids, now)

    def _select_seen(self, mode: str, source: str, message_ids: list[str], now: float
                     ) -> set[str]:
        """One scan of ``seen`` (it has no index by id) for all of ``message_ids``, given
        as one JSON array: in chunks of bound parameters, it took a scan a chunk."""
        uri = f"{self.path.absolute().as_uri()}?{mode}"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT)) as db:
            return {message_id for (message_id,) in db.execute(
                "SELECT message_id FROM seen WHERE source = ? AND expires_at > ? AND "
                "message_id IN (SELECT value FROM json_each(?))",
                (source, now, orjson.dumps(message_ids).decode()))}

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


def _disk_free_bytes(path: Path) -> int:
    disk = os.statvfs(path.parent)
    return disk.f_bavail * disk.f_frsize


def _remove_if_unheld(index: Path) -> None:
    """Remove a dedup index file that no open storage holds (its process is gone)."""
    try:
        descriptor = os.open(index, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: in use
        return
    else:
        index.unlink(missing_ok=True)
    finally:
        os.close(descriptor)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _by_id(job: Job) -> int | str:
    return job.id


class _Lane:
    """What one accept adds for one destination, built before the write lock is taken: a
    bundle, or for an ordered destination rows of ``jobs``. Job ids are taken under the
    lock."""

    def __init__(self, destination: str, ordered: bool, jobs: list[NewJob], owners: list[int],
                 now: float) -> None:
        self.destination = destination
        self.ordered = ordered
        self.jobs = jobs
        self.owners = owners
        """The index of the event each job belongs to."""
        self.now = now
        if ordered:
            self.insert, self.width = _ORDERED_INSERT, 9
            self._values: list[Any] = [
                value for job in jobs for value in (0, destination, job.message_id,
                                                    job.user_key, job.group, job.body, now, now,
                                                    zlib.crc32(job.body))]
        else:
            self.insert, self.width = _BUNDLE_INSERT, 4
            self._values = [
                value for start in range(0, len(jobs), MAX_BUNDLE_JOBS)
                for value in (0, 0, now, pack_bundle(jobs[start:start + MAX_BUNDLE_JOBS]))]

    def of(self, accepted: list[bool]) -> _Lane:
        """The same without the jobs of duplicate events."""
        kept = [n for n, owner in enumerate(self.owners) if accepted[owner]]
        return _Lane(self.destination, self.ordered, [self.jobs[n] for n in kept],
                     [self.owners[n] for n in kept], self.now)

    def values(self, first: int) -> list[Any]:
        """The values to insert, flat, with job ids from ``first`` on."""
        if self.ordered:
            self._values[0::9] = range(first, first + len(self.jobs))
        else:
            for row, start in enumerate(range(first, first + len(self.jobs), MAX_BUNDLE_JOBS)):
                last = min(start + MAX_BUNDLE_JOBS, first + len(self.jobs)) - 1
                self._values[row * 4:row * 4 + 2] = last, start
        return self._values


_BUNDLE_INSERT = "INSERT INTO bundles (id, first_id, created_at, jobs)"
_ORDERED_INSERT = ("INSERT INTO jobs (id, destination, message_id, user_key, grp, body, "
                   "created_at, due_at, body_crc)")


def _lanes_of(items: Sequence[Acceptance], now: float) -> list[_Lane]:
    jobs: dict[tuple[str, bool], tuple[list[NewJob], list[int]]] = {}
    for index, item in enumerate(items):
        for job in item.jobs:
            lane = jobs.get((job.destination, job.ordered))
            if lane is None:
                lane = jobs[(job.destination, job.ordered)] = ([], [])
            lane[0].append(job)
            lane[1].append(index)
    return [_Lane(destination, ordered, lane_jobs, owners, now)
            for (destination, ordered), (lane_jobs, owners) in jobs.items()]


def _runs(ids: list[int]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive numbers in sorted ``ids``, as (first, last)."""
    first = previous = ids[0]
    for job_id in ids[1:]:
        if job_id != previous + 1:
            yield first, previous
            first = job_id
        previous = job_id
    yield first, previous


class _OpenBundle:
    """A bundle this process has read: its jobs, unpacked, which are damaged (why, by index)
    and which are not settled yet."""

    __slots__ = ("created_at", "damaged", "first_id", "has_settled_rows", "id", "jobs",
                 "unsettled")

    def __init__(self, bundle_id: int, first_id: int, created_at: float, packed: bytes,
                 settled: set[int]) -> None:
        self.id = bundle_id
        self.first_id = first_id
        self.created_at = created_at
        self.jobs, self.damaged = unpack_bundle(packed, bundle_id - first_id + 1)
        self.unsettled = set(range(first_id, bundle_id + 1)) - settled
        self.has_settled_rows = bool(settled)


def holding_index(hold_attempts: int) -> tuple[str, str, str]:
    """The name and the statement of the index of the jobs that hold their user's line
    under ``order_hold_attempts: N`` (fewer than N failed attempts), and the condition that
    selects them: a partial index, so the head-of-user check of a lease with the breaker is
    one seek. Through ``jobs_user`` it walked past every earlier job that had stepped out
    (1.0 s a lease with 1,000 stepped out and 10,000 behind, against 5 ms). Made by the
    first such lease, one per value of N ever used, and not otherwise: it costs every row of
    ``jobs`` it holds about 6 µs to write, and building it over a large backlog holds the
    spool's write lock (about 0.8 s a million rows)."""
    name, holds = f"jobs_holding_{hold_attempts}", f"attempts < {hold_attempts}"
    create = f"CREATE INDEX IF NOT EXISTS {name} ON jobs (destination, user_key, id) WHERE {holds}"
    return name, create, holds


def damage_in(connection: sqlite3.Connection) -> str | None:
    """What is wrong with the file's structure, or None: ``PRAGMA integrity_check``, which
    reads every page once (0.34 s a GB from the page cache) and compares each index with its
    table (``quick_check`` does not: a changed destination name in a row of ``jobs`` passed
    it, and then failed every completion), but does not look at what blobs hold."""
    try:
        findings = [row[0] for row in connection.execute("PRAGMA integrity_check(3)")]
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_CORRUPT:
            raise  # not a database at all, say: not for a salvage
        return str(exc)
    problems = [" ".join(finding.split()) for finding in findings if finding != "ok"]
    if problems and all(_unread_page(problem) for problem in problems):
        # SQLite reports a page the disk failed to read (EIO) as a finding: not damage that
        # a salvage would mend, but a disk to look at (I/O fault audit; the file was intact).
        error = sqlite3.OperationalError(f"disk I/O error: {'; '.join(problems)}")
        error.sqlite_errorcode = sqlite3.SQLITE_IOERR
        raise error
    return "; ".join(problems) or None  # one line: SQLite's findings span several


def _unread_page(finding: str) -> bool:
    """Whether an integrity finding is a page the disk did not give (``unable to get the
    page. error code=8458``, SQLite's I/O error class), not one that is wrong."""
    match = _UNREAD_PAGE.search(finding)
    return match is not None and int(match[1]) & 0xFF == sqlite3.SQLITE_IOERR


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


def _dedup_key(source: str, message_id: str) -> int:
    return hash((source, message_id))


def _expired_row(connection: sqlite3.Connection) -> tuple[int, str, str, float]:
    """A row of ``seen`` that no message id has, already expired (the next purge takes it,
    and no index or lookup reads it): a group commit's witness, or ``ping``'s probe write.
    Its values, which tell it from another process's row of the same id."""
    token = secrets.token_hex(8)
    (row_id,) = connection.execute("INSERT INTO seen (source, message_id, expires_at) "
                                   "VALUES ('', ?, 0) RETURNING id", (token,)).fetchone()
    return row_id, "", token, 0.0


def _insert_rows(connection: sqlite3.Connection, insert: str, width: int,
                 values: list[Any]) -> int | None:
    """``insert`` (``INSERT INTO table (columns)``) of ``values``, ``width`` to a row, 1,000
    rows a statement (SQLite takes 32,766 parameters); returns the last row's id, or None
    when there was nothing to insert. Not ``executemany``: each of its rows gives up the GIL
    and takes it back, and under load every take waits for the event loop's thread while
    the write lock, which another process may be waiting for, is held."""
    step = 1000 * width
    last = None
    for start in range(0, len(values), step):
        chunk = values[start:start + step]
        row = "(" + ", ".join("?" * width) + ")"
        last = connection.execute(
            f"{insert} VALUES {', '.join([row] * (len(chunk) // width))}", chunk).lastrowid
    return last


def _lane_of(connection: sqlite3.Connection, destination: str) -> int | None:
    row = connection.execute("SELECT number FROM lanes WHERE destination = ?",
                             (destination,)).fetchone()
    return row[0] if row else None


def _take_ids_of(connection: sqlite3.Connection, counts: dict[str, int]) -> dict[str, int]:
    """``_take_ids`` for several destinations in one statement (lanes are created only on
    first use, which is rare): the first new id of each."""
    if not counts:
        return {}
    cases = " ".join("WHEN ? THEN ?" for _ in counts)
    names = list(counts)
    sql = (f"UPDATE lanes SET last_seq = last_seq + CASE destination {cases} END WHERE "
           f"destination IN ({', '.join('?' * len(names))}) RETURNING destination, number, "
           "last_seq")
    params = [value for name in names for value in (name, counts[name])] + names
    taken = connection.execute(sql, params).fetchall()
    firsts = {name: (number << LANE_BITS) + last - counts[name] + 1
              for name, number, last in taken}
    for name in names:
        if name not in firsts:
            firsts[name] = _take_ids(connection, name, counts[name])
    return firsts


def _take_ids(connection: sqlite3.Connection, destination: str, count: int) -> int:
    """The first of ``count`` new job ids of a destination's lane (created on first use).
    Ids are taken under the write lock and never reused, so a lane's ids grow in commit
    order, which is what lets a worker read it with a cursor."""
    connection.execute(
        "INSERT OR IGNORE INTO lanes (destination, number) "
        "VALUES (?, (SELECT COALESCE(MAX(number), 0) + 1 FROM lanes))", (destination,))
    number, last = connection.execute(
        "UPDATE lanes SET last_seq = last_seq + ? WHERE destination = ? "
        "RETURNING number, last_seq", (count, destination)).fetchone()
    return (number << LANE_BITS) + last - count + 1


OLD_TABLE_MOVES = {
    "queue": ("INSERT INTO jobs (id, destination, message_id, user_key, grp, body, created_at, "
              "due_at) SELECT queue.id, lanes.destination, message_id, user_key, grp, body, "
              "created_at, created_at FROM queue JOIN lanes ON lanes.number = queue.id >> "
              f"{LANE_BITS}"),
    "dedup": ("INSERT INTO seen (source, message_id, expires_at) SELECT source, message_id, "
              "expires_at FROM dedup ORDER BY expires_at"),
    "settled": "INSERT INTO settled_runs (last, first) SELECT id, id FROM settled",
}
"""The tables of layouts before the first stamped one, and how each moves into this layout:
a ``queue`` table of one row a job (before bundles) to ``jobs``, due at once and keeping
its ids; an indexed ``dedup`` table (before ``seen``) to ``seen``, in the order its entries
expire; a ``settled`` table of one row a job (before runs) to ``settled_runs``."""


def _columns_of(connection: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}


def _old_tables(connection: sqlite3.Connection) -> list[str]:
    return [name for (name,) in connection.execute(
        f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN "
        f"({', '.join('?' * len(OLD_TABLE_MOVES))}) ORDER BY name", tuple(OLD_TABLE_MOVES))]


def _move_the_old_tables(connection: sqlite3.Connection, tables: Iterable[str]) -> None:
    """Convert a spool written by an earlier version: each of its old ``tables`` moves into
    this layout and is dropped, a transaction each."""
    for table in tables:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(OLD_TABLE_MOVES[table])
        connection.execute(f"DROP TABLE {table}")
        connection.execute("COMMIT")


def _where(where: DeadLetterFilter) -> tuple[str, tuple[Any, ...]]:
    conditions: list[str] = []
    params: list[Any] = []
    if where.destination is not None:
        conditions.append("destination = ?" if where.exact_destination
                          else "destination = ? COLLATE NOCASE")
        params.append(where.destination)
    if where.reason is not None:
        conditions.append("instr(lower(reason), lower(?)) > 0")
        params.append(where.reason)
    if where.since is not None:
        conditions.append("failed_at >= ?")
        params.append(where.since)
    if where.until is not None:
        conditions.append("failed_at <= ?")
        params.append(where.until)
    if where.ids is not None:
        conditions.append(f"id IN ({', '.join('?' * len(where.ids))})" if where.ids else "0")
        params.extend(where.ids)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), tuple(params)


def _begin(connection: sqlite3.Connection) -> None:
    """Take the write lock, waiting while another process (the delivery process, ``router
    dlq``) holds it. SQLite's own busy handler sleeps 1, 2, 5, 10 ms and more between tries,
    far longer than a group commit holds the lock, so two busy processes would spend most
    of their time asleep; this one retries after 0.1 ms, backing off to 1 ms."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    delay = 0.0001
    while True:
        try:
            connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.001)


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    """A dead letter from a row of ``_LETTER_COLUMNS``; its request is stored as JSON."""
    (letter_id, destination, message_id, user_key, group, body, attempts, created_at,
     failed_at, reason, status, request, response, first_attempt_at) = row
    return DeadLetter(letter_id, destination, message_id, user_key, group, body, attempts,
                      created_at, failed_at, reason, status,
                      orjson.loads(request) if request else None, response, first_attempt_at)


class _TransactionLost(Exception):
    """SQLite rolled back the whole transaction by itself (it does on a full disk)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _undo(changes: list[Callable[[], object]]) -> None:
    for undo in reversed(changes):
        undo()


DEDUP_INDEX_NAME_EXTRA = len(DEDUP_INDEX_SUFFIX) + 7 + 1 + 8
"""Bytes the dedup index's name adds to the spool's: the suffix, a pid, "-", 8 hex digits."""
SQLITE_MAX_PATH = 512
"""The longest path SQLite opens (its unix VFS's ``MAX_PATHNAME``)."""


def _check_the_index_name_fits(path: Path) -> None:
    """``StorageUnavailable`` when the dedup index, made beside the spool at the first
    intake, would have a name too long to be made: a spool name of 236 bytes passed `router
    check --storage`, then every intake failed (deployment audit)."""
    longest_name = 255
    with contextlib.suppress(OSError, ValueError):
        longest_name = os.pathconf(path.parent if path.parent.exists() else "/", "PC_NAME_MAX")
    name_bytes = len(os.fsencode(path.name)) + DEDUP_INDEX_NAME_EXTRA
    path_bytes = len(os.fsencode(str(path.absolute()))) + DEDUP_INDEX_NAME_EXTRA
    for what, size, limit, of in (("name", name_bytes, longest_name, "a file name"),
                                  ("path", path_bytes, SQLITE_MAX_PATH, "a path SQLite opens")):
        if size > limit:
            raise StorageUnavailable(
                f"the spool's {what} is too long: the dedup index made beside it "
                f"({path.name}{DEDUP_INDEX_SUFFIX}...) would have a {what} of {size} bytes, "
                f"over the {limit} {of} may have; choose a shorter one")


def _storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk is ``StorageFull``; a disk that fails or is read-only, a spool another
    process has held locked for ``LOCK_TIMEOUT`` (a stopped ``router dlq``, a process
    paused mid-commit), or a damaged spool file, ``StorageUnavailable`` (intake answers 503,
    "try later", and delivery puts the jobs back); anything else as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_CORRUPT:
        return StorageUnavailable(
            f"the spool {path} is damaged ({exc}): {SALVAGE_ADVICE}")
    if primary == sqlite3.SQLITE_FULL or (primary is None and "full" in str(exc).lower()):
        return StorageFull(f"the spool's disk is full: {exc}")
    if primary == sqlite3.SQLITE_CANTOPEN and (why := _no_descriptor_left()):
        return StorageUnavailable(f"{why}: {exc}")  # not the disk: ulimit -n
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN) and (
            why := _not_writable(path)):
        return StorageUnavailable(f"{why}: {exc}")  # not the disk: permissions or a mount
    if primary in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return StorageUnavailable(f"the spool's disk cannot be read or written: {exc}")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
            primary is None and "locked" in str(exc).lower()):
        return StorageUnavailable(f"another process has held the spool locked for over "
                                  f"{LOCK_TIMEOUT:g} s: {exc}")
    return exc


def _not_writable(path: Path) -> str | None:
    """Why this process may not write the spool, when that is why SQLite could not: a
    directory it may not write (SQLite makes its ``-wal`` and ``-shm`` files beside the
    spool), a spool file it may not write, or a read-only mount. Said as a disk fault, it
    sent operators to their disks (deployment audit). None when none of these holds."""
    for target, kind, access in ((path.parent, "directory", os.W_OK | os.X_OK),
                                 (path, "file", os.W_OK)):
        try:
            if not target.exists():
                continue
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                return f"the spool's {kind} {target} is on a read-only file system"
            if not os.access(target, access):
                return (f"this user (uid {os.geteuid()}) may not write the spool's {kind} "
                        f"{target}: SQLite writes the spool and its -wal and -shm files there")
        except OSError:
            continue
    return None


def _no_descriptor_left() -> str | None:
    """Why SQLite could not open a file when the process has no descriptor left (EMFILE,
    ENFILE), else None: said as a disk fault, it sent operators to their disks, not to
    ``ulimit -n``. Checked by opening one more file, at the moment of the error."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return (f"this process has no file descriptor left to open the spool's files "
                    f"({exc.strerror}; its limit is {soft}): raise the limit (ulimit -n), or "
                    "lower server.max_connections or the destinations' concurrency")
    return None


def _tell(loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None],
          error: BaseException | None) -> None:
    """Tell the opener how the open went, unless its loop has closed meanwhile (a router
    stopped while it started: its open was given up, and the writer only has to stop). The
    loop's RuntimeError ended the writer with a traceback instead."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, ready, None, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
