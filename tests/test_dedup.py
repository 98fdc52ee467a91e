"""The dedup window (contract, "Events": messageId): the first event with a messageId per source
is accepted, any other within the window is a duplicate. Both embedded backends, the SQLite one
on a real file."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from router.storage import storage_for_url
from router.storage.base import Acceptance, NewJob
from router.storage.sqlite import PURGE_AFTER_EVENTS, SqliteStorage

LATER = 35.0  # seconds: well past the tiny windows these tests use

WINDOW = 12 * 3600.0
T0 = 1_700_000_000.0


def job(message_id: str, destination: str = "hook") -> NewJob:
    return NewJob(destination, message_id, "user-1", "", b'{"n": 1}')


def item(message_id: str, source: str = "web", destinations: tuple[str, ...] = ("hook",)
         ) -> Acceptance:
    return Acceptance(source, message_id, [job(message_id, d) for d in destinations])


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path gives sqlite:////...


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request, tmp_path):
    url = "memory://" if request.param == "memory" else sqlite_url(tmp_path / "router.db")
    store = storage_for_url(url)
    await store.open()
    yield store
    await store.close()


async def accept(store, *items, window=WINDOW, now=T0) -> list[bool]:
    return await store.accept(list(items), window=window, now=now)


async def pending(store, destination: str = "hook") -> int:
    stats = await store.stats(now=T0)
    queue = stats.queues.get(destination)
    return queue.pending if queue else 0


async def test_first_message_id_wins_and_a_repeat_is_a_duplicate(storage):
    assert await accept(storage, item("m-1")) == [True]
    assert await accept(storage, item("m-1"), now=T0 + 60) == [False]
    assert await accept(storage, item("m-2"), now=T0 + 60) == [True]


async def test_a_duplicate_queues_nothing(storage):
    await accept(storage, item("m-1", destinations=("a", "b")))
    await accept(storage, item("m-1", destinations=("a", "b")), now=T0 + 1)
    assert await pending(storage, "a") == 1
    assert await pending(storage, "b") == 1


async def test_repeat_within_one_batch_is_a_duplicate(storage):
    assert await accept(storage, item("m-1"), item("m-2"), item("m-1")) == [True, True, False]
    assert await pending(storage) == 2


async def test_same_message_id_from_another_source_is_not_a_duplicate(storage):
    assert await accept(storage, item("m-1", source="web")) == [True]
    assert await accept(storage, item("m-1", source="ios"), now=T0 + 1) == [True]
    assert await accept(storage, item("m-1", source="ios"), now=T0 + 2) == [False]
    assert await accept(storage, item("m-1", source="web"), now=T0 + 3) == [False]


async def test_message_ids_are_compared_exactly(storage):
    assert await accept(storage, item("abc"), item("ABC"), item("abc ")) == [True, True, True]


async def test_accepted_again_after_the_window_expires(storage):
    window = 600.0
    assert await accept(storage, item("m-1"), window=window, now=T0) == [True]
    assert await accept(storage, item("m-1"), window=window, now=T0 + window - 1) == [False]
    assert await accept(storage, item("m-1"), window=window, now=T0 + window + 1) == [True]
    # the new acceptance starts a new window, and queues the event again
    assert await accept(storage, item("m-1"), window=window, now=T0 + window + 2) == [False]
    assert await pending(storage) == 2


async def test_a_duplicate_does_not_extend_the_window(storage):
    window = 600.0
    await accept(storage, item("m-1"), window=window, now=T0)
    await accept(storage, item("m-1"), window=window, now=T0 + 500)
    assert await accept(storage, item("m-1"), window=window, now=T0 + window + 1) == [True]


async def test_concurrent_accepts_of_one_message_id_admit_exactly_one(storage):
    results = await asyncio.gather(*(accept(storage, item("m-race"), now=T0 + i / 1000)
                                     for i in range(20)))
    assert sorted(flag for (flag,) in results) == [False] * 19 + [True]
    assert await pending(storage) == 1


# -- SQLite: a real file ---------------------------------------------------------------------------

async def test_sqlite_window_survives_closing_and_reopening(tmp_path):
    url = sqlite_url(tmp_path / "state" / "router.db")
    first = storage_for_url(url)
    await first.open()
    assert await accept(first, item("m-1"), item("m-2", source="ios")) == [True, True]
    await first.close()
    assert (tmp_path / "state" / "router.db").exists()

    reopened = storage_for_url(url)
    await reopened.open()
    try:
        assert await accept(reopened, item("m-1"), now=T0 + 3600) == [False]
        assert await accept(reopened, item("m-2", source="ios"), now=T0 + 3600) == [False]
        assert await accept(reopened, item("m-2", source="web"), now=T0 + 3600) == [True]
        assert await accept(reopened, item("m-1"), now=T0 + WINDOW + 1) == [True]
        assert await pending(reopened) == 4
    finally:
        await reopened.close()


async def test_sqlite_window_is_shared_by_two_storages_on_one_file(tmp_path):
    """Each opened storage looks ids up in an index of its own; what another one accepted
    into the same file is indexed before its next accept is judged."""
    path = tmp_path / "router.db"
    first, second = SqliteStorage(path), SqliteStorage(path)
    await first.open()
    await second.open()
    try:
        assert await accept(second, item("warm-up")) == [True]
        assert await accept(first, item("m-1"), item("m-2")) == [True, True]
        assert await accept(second, item("m-1"), item("m-3")) == [False, True]
        assert await accept(first, item("m-3")) == [False]
    finally:
        await first.close()
        await second.close()


async def test_sqlite_window_of_an_older_spool_is_kept(tmp_path):
    """Spools written before ``seen`` kept the window in an indexed ``dedup`` table; opening
    one moves its entries, so what it accepted stays a duplicate."""
    path = tmp_path / "router.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE dedup (source TEXT NOT NULL, message_id TEXT NOT NULL,
            expires_at REAL NOT NULL, PRIMARY KEY (source, message_id)) WITHOUT ROWID;
        CREATE INDEX dedup_expiry ON dedup (expires_at);""")
    old.executemany("INSERT INTO dedup VALUES (?, ?, ?)",
                    [("web", "kept", T0 + WINDOW), ("web", "expired", T0 - 1)])
    old.commit()
    old.close()
    store = SqliteStorage(path)
    await store.open()
    try:
        assert await accept(store, item("kept"), item("expired"), item("new")) == [
            False, True, True]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        tables = {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "dedup" not in tables


async def test_sqlite_relative_url_is_relative_to_the_base_dir(tmp_path):
    store = storage_for_url("sqlite:///var/router.db", base_dir=tmp_path)
    await store.open()
    try:
        await accept(store, item("m-1"))
    finally:
        await store.close()
    assert (tmp_path / "var" / "router.db").exists()


async def test_sqlite_expired_entries_are_purged_so_the_table_stays_bounded(tmp_path):
    path = tmp_path / "router.db"
    store = SqliteStorage(path)
    await store.open()
    try:
        tiny = 1.0
        for batch in range(10):
            await store.accept([item(f"m-{batch}-{i}") for i in range(200)], window=tiny,
                               now=T0 + batch * 0.01)
        before = (await store.stats(now=T0)).dedup_entries
        assert before == 2000

        later = T0 + LATER
        # each accept forgets up to twice as many expired ids as it remembers
        fresh = [item(f"fresh-{i}") for i in range(1000)]
        assert await store.accept(fresh, window=tiny, now=later) == [True] * 1000
        after = (await store.stats(now=later)).dedup_entries
        assert after == 1000
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
    assert rows == 1000


async def test_sqlite_purge_keeps_entries_still_in_their_window(tmp_path):
    store = SqliteStorage(tmp_path / "router.db")
    await store.open()
    try:
        await store.accept([item("short")], window=1.0, now=T0)
        await store.accept([item("long")], window=WINDOW, now=T0)
        later = T0 + LATER
        # enough intake for a purge to run (it runs once per PURGE_AFTER_EVENTS events)
        await store.accept([item(f"other-{n}") for n in range(PURGE_AFTER_EVENTS)],
                           window=WINDOW, now=later)
        assert (await store.stats(now=later)).dedup_entries == 1 + PURGE_AFTER_EVENTS
        assert await store.accept([item("long")], window=WINDOW, now=later) == [False]
        assert await store.accept([item("short")], window=WINDOW, now=later) == [True]
    finally:
        await store.close()


async def test_sqlite_dedup_index_is_swept_of_expired_ids(tmp_path):
    # The dedup index has no index by expiry: each purge sweeps a stretch of it in key
    # order, going round again at its end. The expired ids all leave it, those still in
    # their window stay, and an expired one is new again meanwhile.
    store = SqliteStorage(tmp_path / "router.db")
    await store.open()

    def indexed(connection: sqlite3.Connection) -> int:
        return connection.execute("SELECT count(*) FROM dedup_index.keys").fetchone()[0]

    try:
        await store.accept([Acceptance("web", f"old-{i}", []) for i in range(5000)],
                           window=1.0, now=T0)
        await store.accept([Acceptance("web", "kept", [])], window=WINDOW, now=T0)
        later = T0 + LATER
        assert await store.accept([Acceptance("web", "old-7", [])], window=1.0,
                                  now=later) == [True]
        for batch in range(6):
            await store.accept([Acceptance("web", f"new-{batch}-{i}", [])
                                for i in range(PURGE_AFTER_EVENTS)], window=WINDOW, now=later)
        assert await store._call(indexed, writes=False) == 6 * PURGE_AFTER_EVENTS + 2  # kept, old-7
        assert await store.accept([Acceptance("web", "kept", [])], window=WINDOW,
                                  now=later) == [False]
        assert await store.accept([Acceptance("web", "new-0-5", [])], window=WINDOW,
                                  now=later) == [False]
        assert await store.accept([Acceptance("web", "old-5", [])], window=WINDOW,
                                  now=later) == [True]
    finally:
        await store.close()


async def test_memory_expired_entries_are_purged_so_it_stays_bounded():
    store = storage_for_url("memory://")
    await store.open()
    tiny = 1.0
    for batch in range(11):  # past the size at which the memory backend starts purging
        await store.accept([Acceptance("web", f"m-{batch}-{i}", []) for i in range(1000)],
                           window=tiny, now=T0)
    before = (await store.stats(now=T0)).dedup_entries
    assert before == 11_000
    later = T0 + 100
    for i in range(1000):
        await store.accept([Acceptance("web", f"fresh-{i}", [])], window=WINDOW, now=later)
    after = (await store.stats(now=later)).dedup_entries
    assert after < before
    await store.close()


async def test_sqlite_purge_keeps_up_with_sustained_traffic(tmp_path):
    store = SqliteStorage(tmp_path / "router.db")
    await store.open()
    try:
        per_interval = 40_000  # about 1,300 events/s
        now = T0
        for interval in range(4):
            for start in range(0, per_interval, 4000):
                await store.accept([Acceptance("web", f"{interval}-{i}", [])
                                    for i in range(start, start + 4000)],
                                   window=1.0, now=now + start / per_interval)
            now += LATER
        await store.accept([Acceptance("web", "last", [])], window=1.0, now=now)
        entries = (await store.stats(now=now)).dedup_entries
    finally:
        await store.close()
    # every id above expired more than one purge interval ago, save the last batch's; a
    # purge runs once per PURGE_AFTER_EVENTS accepted, so that many may wait for the next
    assert entries <= per_interval + PURGE_AFTER_EVENTS
