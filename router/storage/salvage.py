"""Salvaging a SQLite spool whose pages are damaged (reliability.md R12).

SQLite stops reading a table at its first damaged page ("database disk image is malformed"),
and the ``.recover`` of its shell is missing from some builds and fails on a WAL spool in
others (Debian 12's 3.40.1: "SQL logic error"). So an operator whose disk damaged a spool
had no way to get back the events still readable in it. ``salvage`` copies every row that
can be read into a new file, stepping over the damaged stretches of each table, and writes
that file over the damaged one with SQLite's backup, which other connections to the file
see coherently; the damaged files are copied aside first, so nothing is thrown away.

A damaged byte inside an event that SQLite reads without complaint is the bundles' CRCs'
concern (``router.storage.sqlite``); this is for SQLite's own structure."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.storage.bundle_format import unpack_bundle
from router.storage.sqlite import LANE_BITS, LAYOUT, PAGE_SIZE, SCHEMA, damage_in

TABLES = ("lanes", "seen", "bundles", "settled_runs", "jobs", "dead_letters")
"""The spool's tables, each copied row by row."""
ROWS_A_READ = 256
LOST_LANE = "(unreadable lane {number})"
"""The destination a lane of jobs gets when its row in ``lanes`` was lost and nothing else
names it: its number stays taken, so that a new destination never takes (and delivers)
another's jobs, and its jobs go to the dead letters under this name."""
LOST_LANE_REASON = ("damaged in the spool: the destination of this job was lost with its row "
                    "of the lanes table")


@dataclass
class TableSalvage:
    copied: int = 0
    unreadable_stretches: int = 0
    """Runs of rows that could not be read (a damaged page each, or more): those rows are
    lost, and how many there were cannot be known."""


@dataclass
class SalvageReport:
    damage: str | None
    """What SQLite's ``integrity_check`` found; None for an intact spool, left untouched."""
    kept_as: list[Path] = field(default_factory=list)
    """The copies of the damaged files, kept beside the spool."""
    tables: dict[str, TableSalvage] = field(default_factory=dict)
    lost_lanes: dict[int, int] = field(default_factory=dict)
    """Lanes whose destination was lost: their number and how many of their jobs went to
    the dead letters."""


def salvage(path: Path, stamp: str) -> SalvageReport:
    """Salvage the spool at ``path`` in place if it is damaged; ``stamp`` names the copies
    of the damaged files (``router.db.damaged-STAMP``). The caller makes sure no router
    uses the file (``router salvage`` holds its delivery lock)."""
    source = sqlite3.connect(path, isolation_level=None)
    try:
        report = SalvageReport(damage_in(source))
        if report.damage is None:
            return report
        source.execute("BEGIN IMMEDIATE")  # no one writes while it is copied and read
        report.kept_as = _keep_copies(path, stamp)
        salvaged = path.with_name(path.name + ".salvaged")
        _remove(salvaged)
        target = sqlite3.connect(salvaged, isolation_level=None)
        try:
            _create(target, _page_size(source))
            target.execute("BEGIN")
            for table in TABLES:
                report.tables[table] = _copy_table(source, target, table)
            if not any(result.copied for result in report.tables.values()):
                raise sqlite3.DatabaseError(
                    "no row of it can be read (its first page, which lists the tables, may "
                    "be the damaged one); it is left as it is")
            report.lost_lanes = _keep_lane_numbers(target, time.time())
            target.execute("COMMIT")
            source.execute("ROLLBACK")
            target.backup(source)  # over the damaged file, under SQLite's own locks
        finally:
            target.close()
            _remove(salvaged)
        source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        left = damage_in(source)
        if left is not None:
            raise sqlite3.DatabaseError(f"the salvaged spool is still damaged: {left}")
        return report
    finally:
        source.close()


def _keep_copies(path: Path, stamp: str) -> list[Path]:
    kept = []
    for suffix in ("", "-wal"):
        original = Path(f"{path}{suffix}")
        if original.exists():
            copy = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
            shutil.copyfile(original, copy)
            os.chmod(copy, 0o600)  # the events, personal data among them, as in the spool
            kept.append(copy)
    return kept


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _page_size(connection: sqlite3.Connection) -> int:
    """The damaged file's page size, which the backup over it must keep (a WAL file's page
    size cannot change); its header says it even when its tables are unreadable."""
    with contextlib.suppress(sqlite3.DatabaseError):
        return int(connection.execute("PRAGMA page_size").fetchone()[0])
    return PAGE_SIZE


def _create(target: sqlite3.Connection, page_size: int) -> None:
    target.execute(f"PRAGMA page_size={page_size}")
    target.execute("PRAGMA journal_mode=WAL")
    target.executescript(SCHEMA)
    target.execute(f"PRAGMA user_version={LAYOUT}")


def _copy_table(source: sqlite3.Connection, target: sqlite3.Connection, table: str
                ) -> TableSalvage:
    # The columns both files have: a spool of layout 1 lacks those that layout 2 added,
    # and asking for them fails like damage would.
    present: set[str] = set()
    with contextlib.suppress(sqlite3.DatabaseError):
        present = {row[1] for row in source.execute(f"PRAGMA table_info({table})")}
    columns = [row[1] for row in target.execute(f"PRAGMA table_info({table})")
               if not present or row[1] in present]
    insert = (f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) "
              f"VALUES ({', '.join('?' * len(columns))})")
    result = TableSalvage()
    for rows in _readable_rows(source, table, columns, result):
        target.executemany(insert, rows)
        result.copied += len(rows)
    return result


def _readable_rows(source: sqlite3.Connection, table: str, columns: list[str],
                   result: TableSalvage) -> Iterator[list[tuple[object, ...]]]:
    """The rows of ``table`` in rowid order, a few hundred at a time. Where a read fails,
    rows are read one at a time up to the damage, which is then stepped over."""
    select = (f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? "
              "ORDER BY rowid LIMIT ?")

    def read(after: int, limit: int) -> list[Any] | None:
        try:
            return source.execute(select, (after, limit)).fetchall()
        except sqlite3.DatabaseError:
            return None

    after: int | None = -(1 << 63)
    while after is not None:
        rows = read(after, ROWS_A_READ)
        if rows is None:  # the damage is in these rows: take those before it one by one
            rows = read(after, 1)
        if rows is None:
            result.unreadable_stretches += 1
            after = _past_the_damage(read, after)
            continue
        if not rows:
            return
        after = rows[-1][0]
        yield [row[1:] for row in rows]


def _past_the_damage(read: Callable[[int, int], list[Any] | None], after: int) -> int | None:
    """Where reading can go on past a damaged stretch that begins after rowid ``after``, as
    the next ``after``; None when nothing past it can be read. The first rowid that a read
    reaches again is found by doubling steps, then halving them."""
    failed, step = after, 1
    while read(after + step - 1, 1) is None:
        failed = after + step
        step *= 2
        if after + step >= 1 << 63:
            return None
    readable = after + step
    while readable - failed > 1:
        middle = (failed + readable) // 2
        if read(middle - 1, 1) is None:
            failed = middle
        else:
            readable = middle
    return readable - 1


def _keep_lane_numbers(target: sqlite3.Connection, now: float) -> dict[int, int]:
    """Make each lane that salvaged jobs use known in ``lanes``, its sequence past their ids,
    so that no id is handed out twice. A lane whose row was lost gets its destination back
    from its rows in ``jobs``, which name it; with none, its bundles' jobs, whose
    destination nothing else records, go to the dead letters under a placeholder name that
    keeps the number taken. Returns those lanes and how many jobs each had."""
    tops = target.execute(
        f"SELECT lane, MAX(sequence) FROM (SELECT {_LANE} AS lane, {_SEQUENCE} AS sequence "
        f"FROM bundles UNION ALL SELECT {_LANE}, {_SEQUENCE} FROM jobs UNION ALL SELECT "
        f"last >> {LANE_BITS}, last & {(1 << LANE_BITS) - 1} FROM settled_runs) "
        "WHERE lane > 0 GROUP BY lane").fetchall()
    known = {number for (number,) in target.execute("SELECT number FROM lanes")}
    lost = {}
    for number, top in tops:
        if number in known:
            target.execute("UPDATE lanes SET last_seq = MAX(last_seq, ?) WHERE number = ?",
                           (top, number))
            continue
        named = target.execute(f"SELECT destination FROM jobs WHERE {_LANE} = ? LIMIT 1",
                               (number,)).fetchone()
        name = named[0] if named else LOST_LANE.format(number=number)
        target.execute("INSERT INTO lanes (destination, number, last_seq) VALUES (?, ?, ?)",
                       (name, number, top))
        if not named:
            lost[number] = _dead_letter_lane(target, number, name, now)
    return lost


_LANE = f"id >> {LANE_BITS}"
_SEQUENCE = f"id & {(1 << LANE_BITS) - 1}"


def _dead_letter_lane(target: sqlite3.Connection, number: int, name: str, now: float) -> int:
    """Move the unsettled jobs of the bundles of lane ``number`` to the dead letters as
    ``name``'s; returns how many there were."""
    settled = {job_id for first, last in target.execute(
                   f"SELECT first, last FROM settled_runs WHERE last >> {LANE_BITS} = ?",
                   (number,))
               for job_id in range(first, last + 1)}
    letters = []
    for bundle_id, first_id, created_at, packed in target.execute(
            f"SELECT id, first_id, created_at, jobs FROM bundles WHERE {_LANE} = ?", (number,)
            ).fetchall():
        bundle = unpack_bundle(packed, bundle_id - first_id + 1)
        for index, (message_id, user_key, group, body) in enumerate(zip(
                bundle.message_ids, bundle.user_keys, bundle.groups, bundle.bodies)):
            if first_id + index not in settled:
                letters.append((name, message_id, user_key, group, body, 0, created_at, now,
                                bundle.damaged.get(index, LOST_LANE_REASON), first_id + index))
    target.executemany(
        "INSERT INTO dead_letters (destination, message_id, user_key, grp, body, attempts, "
        "created_at, failed_at, reason, accepted_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        letters)
    target.execute(f"DELETE FROM bundles WHERE {_LANE} = ?", (number,))
    target.execute(f"DELETE FROM settled_runs WHERE last >> {LANE_BITS} = ?", (number,))
    return len(letters)
