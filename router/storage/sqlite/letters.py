"""The dead letters as an operator sees them (``router dlq``): listed, replayed and purged,
each by a ``DeadLetterFilter``."""

from __future__ import annotations

import functools
import sqlite3
import zlib
from typing import Any

import orjson

from router.storage.base import DeadLetter, DeadLetterFilter
from router.storage.sqlite.lanes import _take_ids
from router.storage.sqlite.writer import Writer

REPLAY_PAGE = 1000
"""Dead letters a replay moves back to the queue in one transaction."""
_LETTER_COLUMNS = ("id, destination, message_id, user_key, grp, body, attempts, created_at, "
                   "failed_at, reason, status, request, response, first_attempt_at")


class DeadLetterQueue(Writer):
    """The dead letters of a ``SqliteStorage``."""

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


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    """A dead letter from a row of ``_LETTER_COLUMNS``; its request is stored as JSON."""
    (letter_id, destination, message_id, user_key, group, body, attempts, created_at,
     failed_at, reason, status, request, response, first_attempt_at) = row
    return DeadLetter(letter_id, destination, message_id, user_key, group, body, attempts,
                      created_at, failed_at, reason, status,
                      orjson.loads(request) if request else None, response, first_attempt_at)
