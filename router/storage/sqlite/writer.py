"""The writer thread of a ``SqliteStorage``: one connection, and the group commit.

Every operation on the spool is queued (``Writer._call``) and run on this thread: the reads
first, outside any transaction, then the writes of whatever has gathered in one transaction
(``_commit``), each in a savepoint of its own. An operation that changes this process's
memory as well registers how to undo it with ``_on_rollback``, and it is undone if the
operation's SQL is rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

T = TypeVar("T")
log = logging.getLogger("router.storage")
MAX_OPERATIONS_PER_COMMIT = 1000
# Imported, and read, by schema (the busy timeout while the file is set up), dedup and
# storage (their read-only connections) and errors (the message that names it): a test
# that changes it patches each of these modules that it depends on.
LOCK_TIMEOUT = 10.0
"""Seconds to wait for the write lock that another process holds."""


class _Operation(NamedTuple):
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    writes: bool


class Writer:
    """The writer thread's side of a ``SqliteStorage``: what runs the queued operations."""

    # The storage's state they use, which ``SqliteStorage.__init__`` sets and describes:
    _operations: queue.SimpleQueue[_Operation | None]
    _thread: threading.Thread | None
    _undo: list[Callable[[], object]] | None
    _dedup_index: tuple[Path, int] | None
    _indexed_up_to: int
    _witness: tuple[int, str, str, float] | None
    _index_written: bool

    if TYPE_CHECKING:  # what the writer needs of the storage it runs for
        def _connect(self) -> sqlite3.Connection: ...
        def _error(self, exc: Exception) -> Exception: ...
        def _remove_dedup_index(self) -> None: ...

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
    when there was nothing to insert. Not ``executemany``: each of its
    rows gives up the GIL and takes it back, and under load every take waits for the event
    loop's thread while the write lock, which another process may be waiting for, is held."""
    step = 1000 * width
    last = None
    for start in range(0, len(values), step):
        chunk = values[start:start + step]
        row = "(" + ", ".join("?" * width) + ")"
        last = connection.execute(
            f"{insert} VALUES {', '.join([row] * (len(chunk) // width))}", chunk).lastrowid
    return last


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


class _TransactionLost(Exception):
    """SQLite rolled back the whole transaction by itself (it does on a full disk)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _undo(changes: list[Callable[[], object]]) -> None:
    for undo in reversed(changes):
        undo()


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
