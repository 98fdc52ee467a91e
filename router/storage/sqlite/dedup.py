"""The dedup window: ``seen``, its durable record in the spool, written in arrival order, and
the dedup index, the lookup side, a file of this process's own beside the spool
(``DEDUP_INDEX_SCHEMA``); ``seen_before`` reads ``seen`` from beside a running router."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import os
import secrets
import sqlite3
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path

import orjson

from router.errors import StorageUnavailable
from router.storage.base import Acceptance
from router.storage.sqlite.writer import LOCK_TIMEOUT, Writer

DEDUP_PURGE_MINIMUM = 100
DEDUP_INDEX_SUFFIX = ".dedup-"
DEDUP_INDEX_SCHEMA = """
PRAGMA dedup_index.journal_mode = MEMORY;
PRAGMA dedup_index.synchronous = OFF;
PRAGMA dedup_index.locking_mode = EXCLUSIVE;
PRAGMA dedup_index.cache_size = -4096;
CREATE TABLE dedup_index.keys (key INTEGER PRIMARY KEY, expires_at REAL NOT NULL);
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
against 6.5). With 4 MB: 300 µs and 14.5 µs (``bench.delivery``'s ``dedup_window``).

It has no index by expiry: every id accepted was written to it as well, in a place of its
own (the ids are random), about 2,800 instructions an event of an accept's 44,100
(``bench.callgrind_route --part accept``); expired ids are swept in key order instead
(``_purge_dedup``). The file is this process's own and made anew at each open, so its
layout is free to change."""
DEDUP_SWEEP_RATE = 4
"""Keys of the dedup index a purge looks at for each event accepted since the last one:
one sweep of the index, in key order, takes a quarter of the window's intake, so an expired
id stays in it for at most about a quarter of the window (the index holds about 1.25 times
the ids of the window, the sweep costing about 4 rows visited an event)."""
_FIRST_KEY, _LAST_KEY = -(2**63), 2**63 - 1
"""The least and the greatest key (``hash`` gives a 64-bit signed integer, as SQLite's are)."""
DEDUP_INDEX_NAME_EXTRA = len(DEDUP_INDEX_SUFFIX) + 7 + 1 + 8
"""Bytes the dedup index's name adds to the spool's: the suffix, a pid, "-", 8 hex digits."""
SQLITE_MAX_PATH = 512
"""The longest path SQLite opens (its unix VFS's ``MAX_PATHNAME``)."""


class DedupWindow(Writer):
    """The dedup window of a ``SqliteStorage``: its index, its purge, and its lookups."""

    # The storage's state they use, which ``SqliteStorage.__init__`` sets and describes:
    path: Path
    _swept_from: int

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

    def _purge_dedup(self, connection: sqlite3.Connection, now: float, *, accepted: int) -> None:
        """Forget expired message ids, so both sides stay bounded at any intake rate without
        one large delete stalling the writer. Rows of ``seen`` expire in the order they were
        written (each at its accept's time plus the window), so only the oldest are looked
        at, twice as many as ``accepted`` (the events accepted since the last purge). The
        dedup index, which has no index by expiry (``DEDUP_INDEX_SCHEMA``), is swept in key
        order from where the last purge stopped, ``DEDUP_SWEEP_RATE`` keys an event, back
        to the first key at its end. An expired key left in it a while is only room: a
        key whose entry has expired counts as new (``_take_keys``)."""
        limit = max(2 * accepted, DEDUP_PURGE_MINIMUM)
        connection.execute("DELETE FROM seen WHERE id IN (SELECT id FROM seen ORDER BY id "
                           "LIMIT ?) AND expires_at <= ?", (limit, now))
        start = self._swept_from
        row = connection.execute(
            "SELECT key FROM dedup_index.keys WHERE key >= ? ORDER BY key LIMIT 1 OFFSET ?",
            (start, max(DEDUP_SWEEP_RATE * accepted, DEDUP_PURGE_MINIMUM) - 1)).fetchone()
        end = row[0] if row is not None else _LAST_KEY
        # Not undone with a rollback: the keys it passed over are swept on the next round.
        self._swept_from = end + 1 if end < _LAST_KEY else _FIRST_KEY
        if connection.execute("DELETE FROM dedup_index.keys WHERE key >= ? AND key <= ? AND "
                              "expires_at <= ?", (start, end, now)).rowcount:
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
                  expires_at: float, now: float) -> list[bool]:
        """Record each ``(source, messageId)`` not seen within its window; returns whether
        each item's was new. Of two repeats in a batch, the first is new, the second not.

        Message ids are random (UUIDs, mostly), so an index of them takes each new one at a
        random place: in the spool's file, every accepted event would rewrite a page of that
        index through the WAL and again at the checkpoint (measured: 32 KB written and 35 µs
        an event). So the durable record, ``seen``, is written in arrival order, and lookups
        go to ``dedup_index``, which nothing writes to disk. It is keyed by the pair's 64-bit
        hash: two different ids of one source with the same hash inside the window would
        make the second a duplicate, about once in 10^12 events with ten million ids in the
        window.

        One statement per 300 events, which takes their keys (``_take_keys``); the second of
        two repeats in a batch then meets the entry the first just wrote. The items are matched
        to those keys by their hashes, computed once: a set of the pairs taken, looked up
        and emptied again item by item, hashed each pair three more times."""
        accepted: list[bool] = []
        new_pairs: list[tuple[str, str]] = []
        for start in range(0, len(items), 300):
            pairs = [(item.source, item.message_id) for item in items[start:start + 300]]
            hashes = [hash(pair) for pair in pairs]  # _dedup_key(*pair), without a call an event
            keys = dict(zip(hashes, pairs))
            taken = _take_keys(connection, list(keys), expires_at=expires_at, now=now)
            if len(taken) == len(pairs):  # each one new, and none twice: mostly
                accepted += [True] * len(pairs)
                new_pairs += pairs
                continue
            for key, pair in zip(hashes, pairs):
                # `keys` holds the last pair of a hash: of two that share it, that one is new
                new = key in taken and keys[key] == pair
                if new:
                    taken.discard(key)  # a repeat later in this batch is a duplicate
                    new_pairs.append(pair)
                accepted.append(new)
        last = _write_seen(connection, new_pairs, expires_at)
        if last is not None:  # the index has these rows already
            self._indexed_up_to = last[0]
            witness, self._witness = self._witness, last
            self._on_rollback(lambda: setattr(self, "_witness", witness))
        return accepted

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


_SOURCE, _MESSAGE_ID = itemgetter(0), itemgetter(1)


def _write_seen(connection: sqlite3.Connection, pairs: list[tuple[str, str]],
                expires_at: float) -> tuple[int, str, str, float] | None:
    """Append ``pairs`` to ``seen``; returns the last row written, or None when there
    was none. A statement per source (an accept's events mostly share theirs) binds the
    source and the expiry once, not once a row: each text bound is copied and costs
    about 800 instructions, a sixth of what writing an event to ``seen`` cost. The pairs
    of one source (a ``route_many``'s) are told apart in C, without a loop a pair."""
    sources = set(map(_SOURCE, pairs))
    by_source: dict[str, list[str]] = {}
    if len(sources) == 1:
        by_source[sources.pop()] = list(map(_MESSAGE_ID, pairs))
    else:
        for source, message_id in pairs:
            by_source.setdefault(source, []).append(message_id)
    last = None
    for source, message_ids in by_source.items():
        for start in range(0, len(message_ids), 1000):
            chunk = message_ids[start:start + 1000]
            row_id = connection.execute(
                "INSERT INTO seen (source, message_id, expires_at) SELECT ?, column1, ? "
                f"FROM (VALUES {', '.join(['(?)'] * len(chunk))})",
                (source, expires_at, *chunk)).lastrowid
            assert row_id is not None  # an INSERT's
            last = (row_id, source, chunk[-1], expires_at)
    return last


def _take_keys(connection: sqlite3.Connection, keys: list[int], *, expires_at: float,
               now: float) -> set[int]:
    """Write ``keys`` (no two alike) to the dedup index, expiring at ``expires_at``, where
    they are new or expired (at ``now``); returns those it wrote. Mostly every one is new,
    which the count of rows written tells: then the statement need not return them, and
    reading them back cost about 2,600 instructions an event. When one is not, the
    statement is rolled back and run again, returning the keys it writes."""
    insert = ("INSERT INTO dedup_index.keys (key, expires_at) "
              f"SELECT column1, ? FROM (VALUES {', '.join(['(?)'] * len(keys))}) "
              "WHERE true ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at "
              "WHERE keys.expires_at <= ?")
    parameters = (expires_at, *keys, now)
    connection.execute("SAVEPOINT take_keys")
    if connection.execute(insert, parameters).rowcount == len(keys):
        taken = set(keys)
    else:
        connection.execute("ROLLBACK TO take_keys")
        taken = {key for (key,) in connection.execute(f"{insert} RETURNING key", parameters)}
    connection.execute("RELEASE take_keys")
    return taken


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


def _dedup_key(source: str, message_id: str) -> int:
    """The dedup index's key of a pair (``_remember`` computes it inline, as ``hash``)."""
    return hash((source, message_id))


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
