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
                   "failed_at, reason, status, request, response, first_attempt_at, "
                   "accepted_id")
PLACE = "coalesce(accepted_id, id)"
"""A letter's place in its destination's order of acceptance, which a replay follows: the
id its job had when its event was accepted (a lane's ids grow in commit order). A letter
written before letters kept it, or by a router of an earlier release (after a rollback),
does not know it and takes its own id, which is below every job id (a lane's ids start at
2^40): such letters are replayed first, in the order they were written, as before. Indexed
with the destination (``dead_letters_accepted``). The column came within layout 2
(``schema.ADDED_COLUMNS``)."""


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
        every body in memory, and the write lock (intake waits for it) for its whole work.

        Each destination's letters are queued in the order their events were accepted
        (``PLACE``), not the order they failed in, which on an ``ordered`` destination was
        each user's order of delivery: a user's event that went through more retries, or was
        replayed and failed again, was dead-lettered after the user's later events, and
        replayed, went out after them. The pages follow that order, by destination."""
        clause, params = _where(where)
        # A letter whose body the spool's damage took (its bundle's list was unreadable) has
        # nothing to send: replayed, it went out as an empty request. It stays, to be purged.
        # Only letters that exist now: a replayed job failing again during a long replay
        # becomes a newer letter, which this replay must not pick up again.
        clause += (" AND " if clause else " WHERE ") + "length(body) > 0 AND id <= ?"
        (upto,) = await self._call(lambda connection: connection.execute(
            "SELECT coalesce(max(id), 0) FROM dead_letters").fetchone(), writes=False)
        params = (*params, upto)
        # The destinations' names from the index alone; the rest of the filter is the pages'.
        named, names = _where(DeadLetterFilter(where.destination,
                                               exact_destination=where.exact_destination))
        destinations = await self._call(lambda connection: [name for (name,) in connection.execute(
            f"SELECT DISTINCT destination FROM dead_letters{named}", names)], writes=False)

        def page(connection: sqlite3.Connection, destination: str,
                 after: tuple[int, int] | None) -> list[tuple[Any, ...]]:
            """The next page of ``destination``'s letters, past the place and id ``after``
            (a seek in ``dead_letters_accepted``: a comparison of row values is not one),
            queued as new jobs, with ids in the order of their places."""
            past, more = "", []
            if after is not None:
                past = f" AND {PLACE} >= ? AND ({PLACE} > ? OR id > ?)"
                more = [after[0], after[0], after[1]]
            letters = connection.execute(
                f"SELECT id, {PLACE}, message_id, user_key, grp, body FROM dead_letters"
                f"{clause} AND destination = ?{past} ORDER BY {PLACE}, id LIMIT {REPLAY_PAGE}",
                (*params, destination, *more)).fetchall()
            if letters:
                first = _take_ids(connection, destination, len(letters))
                connection.executemany(
                    "INSERT INTO jobs (id, destination, message_id, user_key, grp, body, "
                    "created_at, due_at, body_crc, accepted_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(first + n, destination, message_id, user_key, group, body, now, now,
                      zlib.crc32(body), place)
                     for n, (_, place, message_id, user_key, group, body) in enumerate(letters)])
                connection.executemany("DELETE FROM dead_letters WHERE id = ?",
                                       [(letter[0],) for letter in letters])
            return letters

        replayed = 0
        for destination in destinations:
            after: tuple[int, int] | None = None
            while letters := await self._call(functools.partial(
                    page, destination=destination, after=after)):
                replayed, after = replayed + len(letters), (letters[-1][1], letters[-1][0])
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
     failed_at, reason, status, request, response, first_attempt_at, accepted_id) = row
    return DeadLetter(letter_id, destination, message_id, user_key, group, body, attempts,
                      created_at, failed_at, reason, status,
                      orjson.loads(request) if request else None, response, first_attempt_at,
                      accepted_id)
