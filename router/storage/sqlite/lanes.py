"""The spool's jobs by destination: each destination's lane of job ids, what an accept adds
to it (``_Lane``: a bundle, or rows of ``jobs``), and the lanes this process reads
(``Lanes``: the cursors, the bundles read and not yet finished, and the settling of their
jobs in ``settled_runs``)."""

from __future__ import annotations

import sqlite3
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from operator import is_
from typing import Any, NamedTuple, cast

from router.storage.base import Acceptance, Job
from router.storage.bundle_format import (BundleEntry, UnpackedBundle, pack_entries,
                                         read_bundle)
from router.storage.sqlite.writer import Writer, _insert_rows

LANE_BITS = 40
"""Job ids are ``lane << LANE_BITS | sequence``: 10^12 jobs a destination, 2^23 destinations."""
MAX_BUNDLE_JOBS = 1000
"""An accept writes a destination's jobs in bundles of at most this many."""
BUNDLES_MOVED_AT_ONCE = 20
"""Bundles a transaction moves into ``jobs`` when a destination becomes ordered: a backlog
of a million jobs moves in small steps, between which intake goes on."""


class Lanes(Writer):
    """The lanes this process reads, touched by the writer thread only."""

    # The storage's state they use, which ``SqliteStorage.__init__`` sets and describes:
    _read_up_to: dict[int, int]
    _bundles: dict[int, _OpenBundle]
    _damaged: list[tuple[Job, str]]

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
            job_ids = [job.id for job in taken] + [job.id for job, _ in damaged]
            for bundle, job_id in zip(self._holders(job_ids), job_ids):
                if bundle is not None:
                    bundle.held[int(job_id) - bundle.first_id] = 0
            for bundle_id in opened:  # read in a transaction that did not happen
                self._bundles.pop(bundle_id, None)

        self._on_rollback(undo)
        while len(taken) + len(damaged) < limit:
            # A bundle is keyed by its last job id, so the bundles that hold the next
            # `wanted` ids end past `after` and start at or before `after + wanted`; one
            # holds at most MAX_BUNDLE_JOBS ids, which bounds the scan.
            wanted = after + limit - len(taken)
            rows = connection.execute(
                "SELECT id, first_id, created_at FROM bundles WHERE id > ? AND id <= ? AND "
                "first_id <= ? ORDER BY id",
                (after, min(end - 1, wanted + MAX_BUNDLE_JOBS), wanted)).fetchall()
            if not rows:  # none there: the next bundle, past a run of ids used by `jobs`
                rows = connection.execute(
                    "SELECT id, first_id, created_at FROM bundles WHERE id > ? AND id < ? "
                    "ORDER BY id LIMIT 1", (after, end)).fetchall()
                if not rows:
                    break
            for bundle_id, first_id, created_at in rows:
                if bundle_id not in self._bundles:
                    opened.append(bundle_id)
                bundle = self._open_bundle(connection, bundle_id, first_id, created_at)
                jobs, unsettled, held = bundle.jobs, bundle.unsettled, bundle.held
                room = limit - len(taken) - len(damaged)
                start = max(after + 1 - first_id, 0)
                stop = min(start + room, len(jobs.bodies))
                if start < stop and not jobs.damaged and not unsettled.count(0, start, stop) \
                        and not held.count(1, start, stop):
                    # The jobs wanted, from the cursor on, all free to take, as a lease of
                    # fresh jobs nearly always finds them: made at once, in C, from the
                    # bundle's fields. The loop below, over a tuple a job, cost a lease about
                    # 1,100 instructions a job more.
                    taken += map(Job, range(first_id + start, first_id + stop),
                                 repeat(destination), jobs.message_ids[start:stop],
                                 jobs.user_keys[start:stop], jobs.groups[start:stop],
                                 jobs.bodies[start:stop], repeat(bundle.created_at))
                    held[start:stop] = b"\x01" * (stop - start)
                    after = first_id + stop - 1
                else:  # job by job, with the least Python a job: the room left counted
                    # down only as a job is taken
                    for index in range(start, len(jobs.bodies)):
                        after = job_id = first_id + index
                        if unsettled[index] and not held[index]:
                            job = Job(job_id, destination, jobs.message_ids[index],
                                      jobs.user_keys[index], jobs.groups[index], jobs.bodies[index],
                                      bundle.created_at)
                            held[index] = 1
                            if jobs.damaged and index in jobs.damaged:
                                damaged.append((job, jobs.damaged[index]))
                            else:
                                taken.append(job)
                            room -= 1
                            if not room:
                                break
                if len(taken) + len(damaged) == limit:
                    break
        self._read_up_to[lane] = after
        self._note_damaged(damaged)
        return taken

    def _bundles_into_jobs(self, connection: sqlite3.Connection, destination: str,
                           after: int) -> int | None:
        """Move the jobs of a destination's bundles past id ``after`` (accepted while it was
        not ``ordered``), up to ``BUNDLES_MOVED_AT_ONCE`` bundles, into ``jobs``, where the
        per-user check sees them; returns the id to go on after, or None when none is left.
        Left in bundles, they were out of that check's sight, and a user's events accepted
        after the switch went out before the user's older ones. Only for a lane this
        process has not read: one it holds jobs of is left as it is. A bundle with damaged
        jobs stays a bundle, for the lease to dead-letter them."""
        lane = _lane_of(connection, destination)
        if lane is None or lane in self._read_up_to:
            return None
        rows = connection.execute(
            "SELECT id, first_id, created_at FROM bundles WHERE id > ? AND id < ? "
            "ORDER BY id LIMIT ?", (max(after, lane << LANE_BITS), (lane + 1) << LANE_BITS,
                                    BUNDLES_MOVED_AT_ONCE)).fetchall()
        for bundle_id, first_id, created_at in rows:
            # A bundle at a time, a body at a time, not all twenty at once, whole.
            bundle = _OpenBundle(bundle_id, first_id, created_at,
                                 _read_bundle(connection, bundle_id, first_id),
                                 _settled_in(connection, first_id, bundle_id))
            if bundle.jobs.damaged:
                continue
            values: list[Any] = []
            jobs = bundle.jobs
            for index in bundle.unsettled_indexes():
                body = jobs.bodies[index]
                values += (first_id + index, destination, jobs.message_ids[index],
                           jobs.user_keys[index], jobs.groups[index], body, created_at,
                           created_at, zlib.crc32(body))
            _insert_jobs(connection, values)
            connection.execute("DELETE FROM bundles WHERE id = ?", (bundle_id,))
            connection.execute("DELETE FROM settled_runs WHERE last BETWEEN ? AND ?",
                               (first_id, bundle_id))
        return int(rows[-1][0]) if rows else None

    def _note_damaged(self, damaged: list[tuple[Job, str]]) -> None:
        """Keep damaged jobs that a lease found, with why, for ``lease`` to dead-letter;
        forgotten again if the lease's transaction is rolled back."""
        if damaged:
            self._damaged += damaged
            self._on_rollback(lambda: setattr(self, "_damaged", [
                found for found in self._damaged if found not in damaged]))

    def _open_bundle(self, connection: sqlite3.Connection, bundle_id: int, first_id: int,
                     created_at: float) -> _OpenBundle:
        bundle = self._bundles.get(bundle_id)
        if bundle is None:
            bundle = self._bundles[bundle_id] = _OpenBundle(
                bundle_id, first_id, created_at, _read_bundle(connection, bundle_id, first_id),
                _settled_in(connection, first_id, bundle_id))
        return bundle

    def _holders(self, job_ids: Iterable[int | str]) -> list[_OpenBundle | None]:
        """The open bundle that holds each job for this process (leased from it, not settled
        yet), or None (a row of ``jobs``): a bisection a job, for the paths that are rare."""
        ends = sorted(self._bundles)
        holders: list[_OpenBundle | None] = []
        for job_id in map(int, job_ids):
            at = bisect_left(ends, job_id)
            bundle = self._bundles[ends[at]] if at < len(ends) else None
            holders.append(bundle if bundle is not None and bundle.first_id <= job_id
                           and bundle.held[job_id - bundle.first_id] else None)
        return holders

    def _runs_by_bundle(self, ids: list[int]
                        ) -> Iterator[tuple[_OpenBundle | None, int, int]]:
        """``ids`` (sorted, no two alike) as runs of consecutive ids, each within one open
        bundle, with it (None: of no open bundle, rows of ``jobs``). The bundle is found by
        bisection once a run (a batch's ids are mostly one run), where a dict from each held
        job to its bundle (an insert at the lease, a look-up and a pop at the settling) cost
        about 880 instructions a job."""
        ends = sorted(self._bundles)
        for first, last in _runs(ids):
            at = bisect_left(ends, first)
            while first <= last:
                bundle = self._bundles[ends[at]] if at < len(ends) else None
                if bundle is None or bundle.first_id > last:
                    yield None, first, last
                    break
                if first < bundle.first_id:
                    yield None, first, bundle.first_id - 1
                    first = bundle.first_id
                upto = min(last, bundle.id)
                yield bundle, first, upto
                first, at = upto + 1, at + 1

    def _settle(self, connection: sqlite3.Connection, job_ids: Iterable[int | str]
                ) -> list[int | str]:
        """Forget held jobs: the bundles they finish are deleted, and in a bundle still
        open they are noted in ``settled_runs``. Returns the ids that are not of a bundle
        (rows of ``jobs``)."""
        others: list[int | str] = []
        settled: dict[_OpenBundle, list[tuple[int, int]]] = {}
        # A set first, since a run must hold no id twice to be one.
        ids = sorted(set(cast("Iterable[int]", job_ids)))
        for bundle, first, last in self._runs_by_bundle(ids):
            if bundle is None:
                others += range(first, last + 1)
                continue
            offset, held = bundle.first_id, bundle.held
            if not held.count(0, first - offset, last - offset + 1):
                pieces = [(first, last)]
            else:  # some of them are rows of `jobs` (a job retried, then leased again)
                others += [job_id for job_id in range(first, last + 1)
                           if not held[job_id - offset]]
                pieces = list(_runs([job_id for job_id in range(first, last + 1)
                                     if held[job_id - offset]]))
            if pieces:
                settled.setdefault(bundle, []).extend(pieces)
                bundle.note(pieces, settled=True)
        # A finished bundle goes whole, with its notes; the others' settled jobs are noted,
        # a row per run of consecutive ids of one bundle.
        finished: list[_OpenBundle] = []
        runs: list[int] = []
        had_settled_rows = [(bundle, bundle.has_settled_rows) for bundle in settled]
        for bundle, bundle_runs in settled.items():
            if bundle.finished:
                del self._bundles[bundle.id]
                finished.append(bundle)
            else:
                bundle.has_settled_rows = True
                runs += [bound for first, last in bundle_runs for bound in (last, first)]

        def undo() -> None:
            for bundle, bundle_runs in settled.items():
                bundle.note(bundle_runs, settled=False)
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


RowWriter = Callable[[sqlite3.Connection, list[Any]], object]
"""How a lane's rows are written (``_insert_jobs``, ``_insert_bundles``): given the values of
one or more lanes, flat, as ``_Lane.values`` gives them."""


class _Lane:
    """What one accept adds for one destination, built before the write lock is taken: a
    bundle, or for an ordered destination rows of ``jobs``. Job ids are taken under the
    lock."""

    def __init__(self, destination: str, ordered: bool, jobs: _Jobs, now: float,
                 alike: list[tuple[_Jobs, list[Any]]] | None = None) -> None:
        """``alike``: the jobs and values of the lanes of the same accept built so far, for
        a bundle to take the blob of one whose jobs are this one's (see ``_same_jobs``)."""
        self.destination = destination
        self.ordered = ordered
        self.jobs = jobs
        self.now = now
        entries, bodies = jobs.entries, jobs.bodies
        if ordered:
            self.write: RowWriter = _insert_jobs
            self._values: list[Any] = [
                value for (message_id, user_key, group, _, crc), body in zip(entries, bodies)
                for value in (0, destination, message_id, user_key, group, body, now, now, crc)]
            return
        self.write = _insert_bundles
        for other, values in alike or ():
            if _same_jobs(jobs, other):
                self._values = list(values)  # its own: `values` sets the ids in it
                break
        else:
            self._values = [
                value for start in range(0, len(bodies), MAX_BUNDLE_JOBS)
                for value in (0, 0, now, pack_entries(entries[start:start + MAX_BUNDLE_JOBS],
                                                      bodies[start:start + MAX_BUNDLE_JOBS]))]
            if alike is not None:
                alike.append((jobs, self._values))

    def of(self, accepted: list[bool]) -> _Lane:
        """The same without the jobs of duplicate events."""
        jobs = self.jobs
        kept = [n for n, owner in enumerate(jobs.owners) if accepted[owner]]
        return _Lane(self.destination, self.ordered,
                     _Jobs([jobs.owners[n] for n in kept], [jobs.entries[n] for n in kept],
                           [jobs.bodies[n] for n in kept]), self.now)

    def values(self, first: int) -> list[Any]:
        """The values to insert, flat, with job ids from ``first`` on."""
        count = len(self.jobs.bodies)
        if self.ordered:
            self._values[0::9] = range(first, first + count)
        else:
            for row, start in enumerate(range(first, first + count, MAX_BUNDLE_JOBS)):
                last = min(start + MAX_BUNDLE_JOBS, first + count) - 1
                self._values[row * 4:row * 4 + 2] = last, start
        return self._values


_BUNDLE_INSERT = "INSERT INTO bundles (id, first_id, created_at, jobs)"
"""Run a bundle a statement. An INSERT of several rows may fail halfway (a conflict), so
within a transaction SQLite keeps a statement journal for it, a copy of each page it
changes that existed before; past 64 KB that journal goes to a temporary file. The
bundles of an accept, written together, changed 16 KB pages enough to pass it at nearly
every accept: a file made, written (about 130 KB), read on nothing and removed each time.
An INSERT of one row needs no statement journal."""


def _insert_bundles(connection: sqlite3.Connection, values: list[Any]) -> None:
    """The bundles of ``values`` (4 to a row, as ``_Lane.values`` gives them), each inserted
    as a ``zeroblob`` of its size and then written through a blob handle. Bound as a
    parameter, a bundle of hundreds of KB was first copied whole by SQLite into a buffer of
    its own (``SQLITE_TRANSIENT``), cold, then into its pages: callgrind's accept of 5,000
    events to 3 destinations, 203.5M -> 191.5M instructions, and with its cache simulation
    941,000 -> 765,000 misses of a 1.25 MB L2 (docs/performance.md, session 30)."""
    for row in range(0, len(values), 4):
        bundle_id, first_id, created_at, blob = values[row:row + 4]
        connection.execute(f"{_BUNDLE_INSERT} VALUES (?, ?, ?, zeroblob(?))",
                           (bundle_id, first_id, created_at, len(blob)))
        with connection.blobopen("bundles", "jobs", bundle_id) as handle:
            handle.write(blob)


_ORDERED_INSERT = ("INSERT INTO jobs (id, destination, message_id, user_key, grp, body, "
                   "created_at, due_at, body_crc)")


def _insert_jobs(connection: sqlite3.Connection, values: list[Any]) -> None:
    """Rows of ``jobs`` (9 values to a row, as ``_Lane.values`` gives them)."""
    _insert_rows(connection, _ORDERED_INSERT, 9, values)


class _Jobs(NamedTuple):
    """A lane's jobs, field by field: the index of the event of each, its entry in a
    bundle's header (messageId, user key, group, body length, body CRC-32), and its body."""

    owners: list[int]
    entries: list[BundleEntry]
    bodies: list[bytes]


_Fields = tuple[list[int], list[BundleEntry], list[bytes]]
"""A ``_Jobs`` as ``_lanes_of`` gathers it: a plain tuple, whose items the interpreter
reads at once (of a ``NamedTuple``, through the generic path: 300 instructions a job)."""


def _same_jobs(jobs: _Jobs, other: _Jobs) -> bool:
    """Whether two lanes' jobs make the same bundle: the same bodies (the objects: the
    destinations of one plugin share theirs, ``Event.shared``) with the same entries. Then
    the second takes the first's blob, and its header is not serialized, checksummed and
    joined to the bodies again: an accept to three ``segment`` destinations packs one
    bundle where it packed three (``_lanes_of`` 16,100 against 13,200 instructions an event,
    callgrind). Compared in C, an element at a time; the length or the first body mostly
    tells two lanes that differ apart."""
    return (len(jobs.bodies) == len(other.bodies) and all(map(is_, jobs.bodies, other.bodies))
            and jobs.entries == other.entries)


def _lanes_of(items: Sequence[Acceptance], now: float) -> list[_Lane]:
    """The accept's jobs by lane, each with its entry in a bundle's header, whose body
    CRC-32 is computed once per body object: the destinations of one plugin share their
    body (``Event.shared``: the router serializes it once), so an accept to three
    ``segment`` destinations holds each body three times, and its CRC, at about 6
    instructions a byte, was 5 % of an accept. Looked up inline, by the body's id
    (``items`` holds every body while this runs), and not at all for the job after one
    with the same body: a call a job to look it up, and a tuple kept to pin the body, cost
    1,500 instructions an event. Lanes whose jobs are alike share their bundle's blob
    (``_same_jobs``)."""
    # Unordered lanes, then ordered ones, by destination: a tuple made and hashed a job,
    # to key one dict by both, cost about 900 instructions an event.
    lanes: tuple[dict[str, _Fields], dict[str, _Fields]] = ({}, {})
    crc_by_id: dict[int, int] = {}
    body: bytes | None = None
    crc = 0
    for index, item in enumerate(items):
        for job in item.jobs:
            by_destination = lanes[job.ordered]
            lane = by_destination.get(job.destination)
            if lane is None:
                lane = by_destination[job.destination] = ([], [], [])
            if job.body is not body:
                body = job.body
                crc = crc_by_id.get(id(body), -1)  # a CRC-32 is never negative
                if crc < 0:
                    crc = crc_by_id[id(body)] = zlib.crc32(body)
            lane[0].append(index)
            lane[1].append((job.message_id, job.user_key, job.group, len(body), crc))
            lane[2].append(body)
    alike: list[tuple[_Jobs, list[Any]]] = []
    return [_Lane(destination, ordered, _Jobs(*fields), now, alike)
            for ordered in (False, True) for destination, fields in lanes[ordered].items()]


def _read_bundle(connection: sqlite3.Connection, bundle_id: int, first_id: int
                 ) -> UnpackedBundle:
    """The jobs of a bundle, read from its blob a body at a time, not whole (``read_bundle`` says
    why)."""
    with connection.blobopen("bundles", "jobs", bundle_id, readonly=True) as blob:
        return read_bundle(blob, bundle_id - first_id + 1)


def _runs(ids: list[int]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive numbers in sorted ``ids``, as (first, last)."""
    if not ids:
        return
    if ids[-1] - ids[0] == len(ids) - 1:  # one run, as a batch's ids mostly are
        yield ids[0], ids[-1]
        return
    first = previous = ids[0]
    for job_id in ids[1:]:
        if job_id != previous + 1:
            yield first, previous
            first = job_id
        previous = job_id
    yield first, previous


class _OpenBundle:
    """A bundle this process has read: its jobs, unpacked (with which are damaged, and why),
    which are not settled yet (``unsettled``: a byte a job, by index, 1 until it is) and
    which this process holds (``held``: 1 from its lease until it is settled or released),
    which a cursor moved back by ``release`` must not hand out twice. Bytes rather than sets
    of ids: a set made for every bundle read, and its ids removed one by one as they settle,
    cost a lease and complete about 400 instructions a job; the bytes are made at once and
    cleared a run of ids at a time."""

    __slots__ = ("created_at", "first_id", "has_settled_rows", "held", "id", "jobs", "unsettled")

    def __init__(self, bundle_id: int, first_id: int, created_at: float, jobs: UnpackedBundle,
                 settled: set[int]) -> None:
        self.id = bundle_id
        self.first_id = first_id
        self.created_at = created_at
        self.jobs = jobs
        self.unsettled = bytearray(b"\x01") * (bundle_id - first_id + 1)
        self.held = bytearray(bundle_id - first_id + 1)
        for job_id in settled:
            if first_id <= job_id <= bundle_id:
                self.unsettled[job_id - first_id] = 0
        self.has_settled_rows = bool(settled)

    @property
    def finished(self) -> bool:
        """Every job of the bundle is settled."""
        return 1 not in self.unsettled

    def note(self, runs: Iterable[tuple[int, int]], *, settled: bool) -> None:
        """Note the held jobs of ``runs`` (first and last ids) settled, or, undone, held and
        unsettled again."""
        for first, last in runs:
            self.unsettled[first - self.first_id:last - self.first_id + 1] = \
                self.held[first - self.first_id:last - self.first_id + 1] = \
                bytes([not settled]) * (last - first + 1)

    def unsettled_indexes(self) -> list[int]:
        """The index of each job not settled yet, in order."""
        return [index for index, unsettled in enumerate(self.unsettled) if unsettled]


def _settled_in(connection: sqlite3.Connection, first_id: int, bundle_id: int) -> set[int]:
    """The ids of a bundle's jobs already settled, from its rows of ``settled_runs``."""
    return {job_id for first, last in connection.execute(
                "SELECT first, last FROM settled_runs WHERE last BETWEEN ? AND ?",
                (first_id, bundle_id))
            for job_id in range(first, last + 1)}


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
