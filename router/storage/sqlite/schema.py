"""The spool file: its layout (``SCHEMA``, stamped ``LAYOUT``), the writer's connection to it
(``SpoolFile``: made, set up, checked for damage, converted from an earlier layout), and what
reads its structure (``damage_in``, ``holding_index``)."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from router.errors import StorageMisconfigured, StorageUnavailable
from router.storage.sqlite.dedup import _dedup_key
from router.storage.sqlite.errors import SALVAGE_ADVICE
from router.storage.sqlite.lanes import LANE_BITS
from router.storage.sqlite.writer import LOCK_TIMEOUT, Writer

PAGE_SIZE = 16384
"""Bytes a page, for new spool files. The spool is mostly bundles, blobs of hundreds of KB
that are written once, read once and deleted: with SQLite's default of 4 KB, each is a
chain of over a hundred overflow pages, every one a WAL frame written, checkpointed, read
and freed. 16 KB pages cut the spool's CPU an event by about a sixth (a fifth to a quarter
for ordered destinations, whose jobs are rows); ``bench.delivery``'s ``spool`` phase
measures it."""
WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint that empties it, and the size at
which a commit checkpoints it (``PRAGMA wal_autocheckpoint``, in the file's pages). SQLite's
default of 1,000 pages (16 MB) checkpointed four times as often, and each checkpoint copies
home every page the WAL holds, the freed pages of delivered bundles among them; a window of
64 MB copies a page written several times once. With a router keeping up (accept 500 events
for 3 destinations, then lease and complete them, 100,000 events), 14.5 against 15.5 µs of
CPU an event (the median of 8 alternated pairs, lower in each)."""
LAYOUT = 2
"""The spool's layout, stamped in the file as ``PRAGMA user_version``. A file stamped with a
higher number was written by a newer router, which a rollback to this one must not read as
if it understood it (it would send again what the newer one delivered, or miss what it
queued). 0 is a file made before stamping, whose tables tell its layout."""
_UNREAD_PAGE = re.compile(r"unable to get the page\. error code=(\d+)")

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
    body_crc INTEGER, accepted_id INTEGER);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (destination, due_at, id);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (destination, user_key, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, destination TEXT NOT NULL, message_id TEXT NOT NULL,
    user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL,
    created_at REAL NOT NULL, failed_at REAL NOT NULL, reason TEXT NOT NULL, status INTEGER,
    request TEXT, response TEXT, first_attempt_at REAL, accepted_id INTEGER);
CREATE INDEX IF NOT EXISTS dead_letters_destination ON dead_letters (destination, failed_at);
CREATE INDEX IF NOT EXISTS dead_letters_accepted ON dead_letters (
    destination, coalesce(accepted_id, id));
"""
ADDED_COLUMNS = (("dead_letters", "first_attempt_at", "REAL"), ("jobs", "body_crc", "INTEGER"),
                 ("dead_letters", "accepted_id", "INTEGER"), ("jobs", "accepted_id", "INTEGER"))
"""Columns a router adds to a file that lacks them. Layout 2 added the dead letters'
``first_attempt_at`` and the checksums of ``jobs`` to layout 1's tables. ``accepted_id``, the
id a job had when its event was accepted, which a replayed job (in ``jobs``) and its letter
keep so that a replay queues letters in the order of acceptance (``letters.PLACE``), came
later without a new layout: a router of layout 2 that does not know it reads and writes
such a file correctly (it names its columns; it only replays in the old order), so a
rollback keeps its spool. It is NULL in the rows written before, in the rows a router that
does not know it writes, and in the jobs that were not replayed: the row's own id stands
for it."""


class SpoolFile(Writer):
    """The file of a ``SqliteStorage`` as its writer opens it."""

    # The storage's state they use, which ``SqliteStorage.__init__`` sets and describes:
    path: Path
    synchronous: str
    _recover: bool
    _page_size: int

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

    def _set_up(self, connection: sqlite3.Connection) -> None:
        # Only a new file takes it; a file made before keeps its own page size.
        connection.execute(f"PRAGMA page_size={PAGE_SIZE}")
        connection.execute("PRAGMA journal_mode=WAL")
        # Under steady load from two processes the WAL can outgrow the auto-checkpoint size,
        # and a WAL file keeps its largest size unless limited.
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
        connection.execute(f"PRAGMA wal_autocheckpoint={WAL_SIZE_LIMIT // self._page_size}")
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
        # The columns first: SCHEMA indexes some of them, in tables a file of an earlier
        # layout already has (CREATE TABLE IF NOT EXISTS leaves those as they are).
        missing = [(table, column, kind) for table, column, kind in ADDED_COLUMNS
                   if (columns := _columns_of(connection, table)) and column not in columns]
        if missing and not self._recover:
            raise StorageMisconfigured(
                f"the spool {self.path} was written by an earlier version of the router and "
                f"is not converted yet (its table {missing[0][0]!r} has no column "
                f"{missing[0][1]!r}): stop the router that uses it and start the new one, "
                "which converts the file")
        for table, column, kind in missing:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        connection.executescript(SCHEMA)
        _move_the_old_tables(connection, earlier)
        if layout < LAYOUT and (self._recover or fresh):
            connection.execute(f"PRAGMA user_version={LAYOUT}")


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
