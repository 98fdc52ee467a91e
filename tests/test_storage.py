"""The durable storages: the contract ``sqlite://`` and ``redis://`` share, then what only
Redis promises (contract, "Delivery": several router processes share the work and the dedup
window; the work of a process that dies is taken over by the others).

The server is started here, on a free port bound to 127.0.0.1 with persistence off, never the
machine's shared Redis; every test uses its own key prefix. Most tests pass ``now`` (a fake
clock) so they are deterministic; the few about Redis's own expiry wait real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import resource
import dataclasses
import sqlite3
import zlib
import sys
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from router.routing import Router
from router.errors import StorageFull, StorageMisconfigured, StorageUnavailable
from router.storage import bundle_format, storage_for_url
from router.storage.base import (Acceptance, DeadLetter, DeadLetterFilter, Failure, Job,
                                 NewJob, amount_of_bytes)
from router.storage.memory import MemoryStorage
from router.storage.redis import RedisStorage
from router.storage.redis import errors as redis_errors
from router.storage.redis import scripts as redis_scripts
from router.storage.redis import storage as redis_storage
from router.storage.sqlite import budget as sqlite_budget
from router.storage.sqlite import errors as sqlite_errors
from router.storage.sqlite import lanes as sqlite_lanes
from router.storage.sqlite import letters as sqlite_letters
from router.storage.sqlite import writer as sqlite_writer
from router.storage.sqlite import LAYOUT, SqliteStorage
from router.testing.fake_server import Answer, FakeDestinationServer
from tests.delivery_helpers import (fill_the_disk, lease_large_and_short, router_for, track,
                                    webhook)
from tests.redis_helpers import start_redis_server, stop

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 12 * 3600.0
T0 = 1_700_000_000.0
LEASE_FOR = 30.0


# -- a private redis-server for the session ---------------------------------------------------

@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<free port>/0`` of a redis-server started for this session (no
    RDB, no AOF, a temporary working directory), stopped at the end."""
    process, port = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


def unique_url(redis_url: str) -> str:
    """The test server's URL with a prefix of its own, so tests never see each other's keys."""
    return f"{redis_url}?prefix=test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def url(redis_url: str) -> str:
    return unique_url(redis_url)


@pytest.fixture
async def redis_store(url: str):
    storage = RedisStorage.from_url(url)
    await storage.open()
    yield storage
    await storage.close()


@pytest.fixture(params=["redis", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    """Each backend that promises durability, for the contract they share."""
    if request.param == "redis":
        storage: RedisStorage | SqliteStorage = RedisStorage.from_url(
            unique_url(request.getfixturevalue("redis_url")))
    else:
        storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    yield storage
    await storage.close()


@pytest.fixture
async def raw(redis_url: str):
    """A plain client of the test server, to look at keys and change its settings."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def another(url: str, *, recover: bool = True) -> RedisStorage:
    """A second instance on the same prefix: another router process, as far as Redis can
    tell (its own owner token)."""
    storage = RedisStorage.from_url(url)
    await storage.open(recover=recover)
    return storage


# -- helpers ----------------------------------------------------------------------------------

def job(message_id: str, destination: str = "hook", user: str = "user-1", group: str = ""
        ) -> NewJob:
    return NewJob(destination, message_id, user, group, b'{"id": "%s"}' % message_id.encode())


def item(message_id: str, source: str = "web", destinations: tuple[str, ...] = ("hook",),
         user: str = "user-1", ordered: bool = False) -> Acceptance:
    return Acceptance(source, message_id, [dataclasses.replace(job(message_id, d, user),
                                                               ordered=ordered)
                                           for d in destinations])


async def accept(storage, *items, window=WINDOW, now=T0) -> list[bool]:
    return await storage.accept(list(items), window=window, now=now)


async def lease(storage, limit=10, *, destination="hook", now=T0, lease_for=LEASE_FOR,
                ordered=False, hold_attempts=None) -> list[Job]:
    return await storage.lease(destination, limit, now=now, lease_for=lease_for,
                               ordered=ordered, hold_attempts=hold_attempts)


async def pending(storage, destination: str = "hook") -> int:
    stats = await storage.stats(now=T0)
    queue = stats.queues.get(destination)
    return queue.pending if queue else 0


def ids(jobs: list[Job] | list[DeadLetter]) -> list[int | str]:
    return [each.id for each in jobs]


def tried(job_: Job, now: float) -> Job:
    """The job as a worker has it after an attempt."""
    job_.attempts += 1
    job_.first_attempt_at = job_.first_attempt_at or now
    return job_


async def index_faults(client: Any, storage: RedisStorage, destination: str = "hook",
                       users: Sequence[str] | None = None) -> list[str]:
    """How a Redis destination's index of users with ready jobs (``ready-users``, and each
    user's ``user-ready``) differs from what decides, the ready queue and each job's user:
    empty when it matches exactly. A destination never leased ordered has no index at all.
    ``users``: every user there may be (else the keys are found with SCAN)."""
    keys = storage.keys
    expected: dict[str, set[int]] = {}
    for member in await client.zrange(keys.ready(destination), 0, -1):
        user = await client.hget(keys.job(member.decode()), "user_key")
        expected.setdefault(user.decode(), set()).add(int(member))
    built = await client.hget(keys.ready_users_built, destination)
    if built is None:
        expected = {}
    elif built != b"built":
        return [f"the index is {built.decode()}, not built"]
    scores = {user.decode(): int(score) for user, score in await client.zrange(
        keys.ready_users(destination), 0, -1, withscores=True)}
    lowest = {user: min(job_ids) for user, job_ids in expected.items()}
    faults = [] if scores == lowest else [f"ready-users {scores}, lowest ready jobs {lowest}"]
    users_ready: dict[str, set[int]] = {}
    start = keys.user_ready(destination, "")
    if users is None:
        users = [key.decode()[len(start):] async for key in client.scan_iter(
            match=start + "*", count=1000)]
    for user in users:
        if job_ids := {int(m) for m in await client.zrange(start + user, 0, -1)}:
            users_ready[user] = job_ids
    if users_ready != expected:
        faults.append(f"user-ready {users_ready}, ready jobs by user {expected}")
    return faults


async def forget_the_index(client: Any, storage: RedisStorage) -> None:
    """The keys of a version before the index of users with ready jobs, as it left them:
    the index's keys deleted, everything else as it is."""
    async for key in client.scan_iter(match=f"{storage.prefix}:*", count=1000):
        name = key.decode()[len(storage.prefix) + 1:]
        if name.startswith(("ready-users", "user-ready:")):
            await client.delete(key)


# -- the URL ----------------------------------------------------------------------------------

def test_from_url_takes_the_prefix_and_keeps_the_rest():
    storage = RedisStorage.from_url("redis://:s3cret-pass@cache.example:6380/2?prefix=edge"
                                    "&socket_timeout=3")
    assert storage.prefix == "edge"
    assert storage.keys.ready("hook") == "edge:ready:hook"
    assert "prefix" not in storage._url and "socket_timeout=3" in storage._url
    assert "s3cret" not in repr(storage)
    assert RedisStorage.from_url("redis://localhost:6379/0").prefix == "router"
    with pytest.raises(ValueError, match="prefix"):
        RedisStorage.from_url("redis://localhost:6379/0?prefix=")


def test_storage_for_url_picks_the_redis_backend_without_connecting():
    storage = storage_for_url("redis://127.0.0.1:1/0?prefix=x")  # nothing listens on port 1
    assert isinstance(storage, RedisStorage)


async def test_each_instance_leases_under_its_own_token(url):
    first, second = RedisStorage.from_url(url), RedisStorage.from_url(url)
    assert first.token != second.token


# -- dedup ------------------------------------------------------------------------------------

async def test_first_message_id_wins_and_a_repeat_is_a_duplicate(store):
    assert await accept(store, item("m-1")) == [True]
    assert await accept(store, item("m-1"), now=T0 + 60) == [False]
    assert await accept(store, item("m-2"), now=T0 + 60) == [True]


async def test_a_duplicate_queues_nothing(store):
    await accept(store, item("m-1", destinations=("a", "b")))
    await accept(store, item("m-1", destinations=("a", "b")), now=T0 + 1)
    assert await pending(store, "a") == 1
    assert await pending(store, "b") == 1


async def test_repeat_within_one_batch_is_a_duplicate(store):
    assert await accept(store, item("m-1"), item("m-2"), item("m-1")) == [True, True, False]
    assert await pending(store) == 2


async def test_dedup_is_per_source(store):
    assert await accept(store, item("m-1", source="web")) == [True]
    assert await accept(store, item("m-1", source="ios"), now=T0 + 1) == [True]
    assert await accept(store, item("m-1", source="ios"), now=T0 + 2) == [False]
    assert await accept(store, item("m-1", source="web"), now=T0 + 3) == [False]
    # a colon in a source or a messageId cannot make two different pairs collide
    assert await accept(store, item("b:c", source="a"), item("c", source="a:b")) == [True, True]


async def test_seen_before_reads_the_dedup_window_and_takes_nothing(store, tmp_path):
    # For a dry run: it names the duplicates a real send would drop, yet changes nothing
    # (contract audit: a dry run said "send" for an event the storage had already taken).
    await accept(store, item("m-1", source="web"), item("m-2", source="web"))
    assert await store.seen_before("web", ["m-1", "m-3", "m-2"], now=T0 + 1) == {"m-1", "m-2"}
    assert await store.seen_before("ios", ["m-1"], now=T0 + 1) == set()
    assert await accept(store, item("m-3", source="web"), now=T0 + 2) == [True]
    # from another process's storage object, never opened (the dry run's)
    other = (SqliteStorage(tmp_path / "spool.db") if isinstance(store, SqliteStorage)
             else RedisStorage.from_url(store._url + f"?prefix={store.prefix}"))
    assert await other.seen_before("web", ["m-3", "m-4"], now=T0 + 3) == {"m-3"}


async def test_seen_before_reads_again_when_a_router_opens_the_spool_meanwhile(tmp_path):
    # An immutable read of a file a router had started writing said "database disk image
    # is malformed", or could see a torn state (review by experiment).
    spool = SqliteStorage(tmp_path / "spool.db")
    await spool.open()
    await accept(spool, item("m-1"), now=time.time())
    await spool.close()
    reader = SqliteStorage(tmp_path / "spool.db")
    writer = SqliteStorage(tmp_path / "spool.db")
    select = reader._select_seen
    modes: list[str] = []

    def a_router_starts_during_the_read(mode: str, *args: Any) -> set[str]:
        modes.append(mode)
        if mode == "immutable=1":
            asyncio.run_coroutine_threadsafe(writer.open(), loop).result()
            asyncio.run_coroutine_threadsafe(
                accept(writer, item("m-2"), now=time.time()), loop).result()
        return select(mode, *args)

    loop = asyncio.get_running_loop()
    reader._select_seen = a_router_starts_during_the_read  # type: ignore[method-assign]
    try:
        assert await reader.seen_before("web", ["m-1", "m-2"], now=time.time()) == {
            "m-1", "m-2"}
    finally:
        await writer.close()
    assert modes == ["immutable=1", "mode=ro"]


async def test_seen_before_leaves_out_what_the_window_has_let_go(tmp_path):
    memory = MemoryStorage()
    spool = SqliteStorage(tmp_path / "spool.db")
    await spool.open()
    try:
        for storage in (memory, spool):
            await accept(storage, item("m-1"), window=600.0, now=T0)
            assert await storage.seen_before("web", ["m-1"], now=T0 + 599) == {"m-1"}
            assert await storage.seen_before("web", ["m-1"], now=T0 + 601) == set()
    finally:
        await spool.close()
    assert await SqliteStorage(tmp_path / "absent.db").seen_before(
        "default", ["m-1"], now=T0) == set()
    assert not (tmp_path / "absent.db").exists()


async def test_message_ids_are_compared_exactly(store):
    assert await accept(store, item("abc"), item("ABC"), item("abc ")) == [True, True, True]


async def test_accepted_again_after_the_window_expires(store):
    window = 600.0
    assert await accept(store, item("m-1"), window=window, now=T0) == [True]
    assert await accept(store, item("m-1"), window=window, now=T0 + window - 1) == [False]
    assert await accept(store, item("m-1"), window=window, now=T0 + window + 1) == [True]
    # the new acceptance starts a new window, and queues the event again
    assert await accept(store, item("m-1"), window=window, now=T0 + window + 2) == [False]
    assert await pending(store) == 2


async def test_a_duplicate_does_not_extend_the_window(store):
    window = 600.0
    await accept(store, item("m-1"), window=window, now=T0)
    await accept(store, item("m-1"), window=window, now=T0 + 500)
    assert await accept(store, item("m-1"), window=window, now=T0 + window + 1) == [True]


async def test_concurrent_accepts_of_one_message_id_admit_exactly_one(store):
    results = await asyncio.gather(*(accept(store, item("m-race"), now=T0 + i / 1000)
                                     for i in range(20)))
    assert sorted(flag for (flag,) in results) == [False] * 19 + [True]
    assert await pending(store) == 1


async def test_redis_forgets_a_dedup_entry_when_its_window_ends(redis_store, raw):
    """The entry carries a real expiry (PX), so Redis frees it by itself: no purge job, and
    memory bounded by the traffic of one window."""
    now = time.time()
    assert await accept(redis_store, item("m-1"), window=0.4, now=now) == [True]
    key = redis_store.keys.seen("web", "m-1")
    assert 0 < await raw.pttl(key) <= 400
    assert await accept(redis_store, item("m-1"), window=0.4, now=time.time()) == [False]
    await asyncio.sleep(0.6)
    assert await raw.exists(key) == 0
    assert await accept(redis_store, item("m-1"), window=0.4, now=time.time()) == [True]


async def test_the_window_is_shared_by_every_instance(redis_store, url):
    other = await another(url)
    try:
        assert await accept(redis_store, item("m-1")) == [True]
        assert await accept(other, item("m-1"), now=T0 + 1) == [False]
        assert await accept(other, item("m-2"), now=T0 + 1) == [True]
        assert await accept(redis_store, item("m-2"), now=T0 + 2) == [False]
    finally:
        await other.close()


async def test_dedup_entries_are_counted_by_expiry_minute(redis_store):
    await accept(redis_store, item("m-1"), item("m-2"), item("m-3"), window=600.0)
    assert (await redis_store.stats(now=T0)).dedup_entries == 3
    # approximate: counted until the end of the minute their window ends in
    assert (await redis_store.stats(now=T0 + 600 + 60)).dedup_entries == 0


# -- the queue: the same contract as the SQLite backend ---------------------------------------

async def test_lease_takes_the_oldest_first_up_to_the_limit(store):
    await accept(store, *(item(f"m-{n}") for n in range(5)))
    first = await lease(store, 2)
    assert [j.message_id for j in first] == ["m-0", "m-1"]
    assert first[0].body == b'{"id": "m-0"}' and first[0].created_at == T0
    assert first[0].attempts == 0 and first[0].first_attempt_at is None
    assert [j.message_id for j in await lease(store, 10)] == ["m-2", "m-3", "m-4"]
    assert await lease(store, 10) == []
    assert isinstance(first[0].id, int) and first[0].id < first[1].id


async def test_jobs_keep_their_fields(store):
    await store.accept([Acceptance("web", "m-1", [NewJob("hook", "m-1", "anon:é", "batch-7",
                                                         b"\x00\xffbinary")])],
                       window=WINDOW, now=T0 + 0.123456789)
    (leased,) = await lease(store, now=T0 + 1)
    assert (leased.destination, leased.message_id, leased.user_key, leased.group, leased.body,
            leased.created_at) == ("hook", "m-1", "anon:é", "batch-7", b"\x00\xffbinary",
                                   T0 + 0.123456789)


async def test_a_leased_job_is_hidden_until_its_lease_lapses(redis_store):
    await accept(redis_store, item("m-1"))
    (leased,) = await lease(redis_store, now=T0)
    assert await lease(redis_store, now=T0 + LEASE_FOR - 1) == []
    (again,) = await lease(redis_store, now=T0 + LEASE_FOR)
    assert again.id == leased.id


async def test_each_destination_has_its_own_queue(store):
    await accept(store, item("m-1", destinations=("a", "b")))
    assert [j.destination for j in await lease(store, destination="a")] == ["a"]
    assert [j.destination for j in await lease(store, destination="b")] == ["b"]
    assert await lease(store, destination="c") == []


async def test_complete_forgets_the_jobs(store):
    await accept(store, item("m-1"), item("m-2"))
    jobs = await lease(store)
    await store.complete(jobs)
    assert await pending(store) == 0
    assert (await store.stats(now=T0)).queues == {}
    assert await lease(store, now=T0 + LEASE_FOR + 1) == []


async def test_a_retry_is_due_later_with_its_attempts(store):
    await accept(store, item("m-1"), item("m-2"))
    first, second = await lease(store)
    await store.retry([tried(first, T0)], not_before=[T0 + 60], now=T0,
                      failure=Failure("HTTP 503", 503))
    await store.complete([second])
    assert await pending(store) == 1
    assert await lease(store, now=T0 + 59) == []
    (again,) = await lease(store, now=T0 + 60)
    assert (again.id, again.attempts, again.first_attempt_at) == (first.id, 1, T0)
    await store.retry([tried(again, T0 + 60)], not_before=[T0 + 120], now=T0 + 60,
                      failure=Failure("HTTP 503", 503))
    (third,) = await lease(store, now=T0 + 120)
    assert (third.attempts, third.first_attempt_at) == (2, T0)


async def test_a_due_retry_goes_out_before_newer_jobs(store):
    await accept(store, item("m-1"))
    (old,) = await lease(store)
    await accept(store, item("m-2"), now=T0 + 1)
    await store.retry([tried(old, T0)], not_before=[T0 + 5], now=T0, failure=Failure("x"))
    assert [j.message_id for j in await lease(store, 1, now=T0 + 10)] == ["m-1"]


async def test_release_gives_jobs_back_due_at_once_and_untouched(store):
    await accept(store, item("m-1"), item("m-2"))
    jobs = await lease(store)
    for leased in jobs:
        tried(leased, T0)  # in flight: attempted, no outcome yet
    await store.release(ids(jobs))
    again = await lease(store, now=T0 + 1)
    assert ids(again) == ids(jobs)
    assert [j.attempts for j in again] == [0, 0]


async def test_dead_letter_keeps_why_and_replay_goes_to_its_own_destination_only(store):
    await accept(store, item("m-1", destinations=("good", "bad")))
    (good,) = await lease(store, destination="good")
    (bad,) = await lease(store, destination="bad")
    await store.complete([good])
    failure = Failure("HTTP 400", 400, {"method": "POST", "url": "https://x.example/in",
                                        "headers": {}}, '{"error": "nope"}')
    await store.dead_letter([tried(bad, T0)], now=T0 + 5, failure=failure)
    assert await pending(store, "bad") == 0

    (letter,) = await store.dead_letters(DeadLetterFilter())
    assert (letter.destination, letter.message_id, letter.user_key, letter.body) == \
        ("bad", "m-1", "user-1", b'{"id": "m-1"}')
    assert (letter.attempts, letter.created_at, letter.failed_at) == (1, T0, T0 + 5)
    assert letter.first_attempt_at == T0  # reliability.md R6: first and last attempt
    assert (letter.reason, letter.status, letter.request, letter.response) == \
        ("HTTP 400", 400, failure.request, '{"error": "nope"}')
    stats = await store.stats(now=T0)
    assert stats.queues["bad"].dead_letters == 1 and stats.queues["bad"].pending == 0

    assert await store.replay(DeadLetterFilter(destination="BAD"), now=T0 + 100) == 1
    assert await store.dead_letters(DeadLetterFilter()) == []
    assert await lease(store, destination="good", now=T0 + 100) == []
    (replayed,) = await lease(store, destination="bad", now=T0 + 100)
    assert (replayed.message_id, replayed.body, replayed.attempts, replayed.created_at,
            replayed.first_attempt_at) == ("m-1", b'{"id": "m-1"}', 0, T0 + 100, None)
    assert replayed.id != bad.id


async def test_a_failure_without_a_response_is_kept_as_such(store):
    await accept(store, item("m-1"))
    (leased,) = await lease(store)
    await store.dead_letter([leased], now=T0, failure=Failure("connection refused"))
    (letter,) = await store.dead_letters(DeadLetterFilter())
    assert (letter.status, letter.request, letter.response) == (None, None, None)
    assert letter.first_attempt_at is None  # never sent


async def test_a_dead_letter_keeps_the_first_attempt_of_a_job_retried_before(store):
    await accept(store, item("m-1"))
    (first,) = await lease(store)
    await store.retry([tried(first, T0 + 1)], not_before=[T0 + 2], now=T0 + 1,
                      failure=Failure("HTTP 503", 503))
    (again,) = await lease(store, now=T0 + 3)
    await store.dead_letter([tried(again, T0 + 3)], now=T0 + 3, failure=Failure("HTTP 400"))
    (letter,) = await store.dead_letters(DeadLetterFilter())
    assert (letter.attempts, letter.first_attempt_at, letter.failed_at) == (2, T0 + 1, T0 + 3)


async def dead_letters_at(store, specs: list[tuple[str, str, float]]) -> list[int | str]:
    """Dead-letter one job per (destination, reason, failed_at); their letter ids."""
    for n, (destination, _, _) in enumerate(specs):
        await accept(store, item(f"m-{n}", destinations=(destination,)))
    for destination, reason, failed_at in specs:
        (leased,) = await lease(store, 1, destination=destination)
        await store.dead_letter([leased], now=failed_at, failure=Failure(reason))
    return ids(await store.dead_letters(DeadLetterFilter()))


async def test_dead_letters_are_listed_in_order_with_filters_and_a_limit(store, monkeypatch):
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)  # Redis reads them over pages
    letters = await dead_letters_at(store, [("a", "HTTP 400", T0 + 1), ("b", "HTTP 500", T0 + 2),
                                            ("a", "gave up: HTTP 503", T0 + 3),
                                            ("A", "HTTP 500", T0 + 4)])
    assert len(letters) == 4 and letters == sorted(letters)

    async def listed(**where: Any) -> list[int | str]:
        limit = where.pop("limit", 100)
        return ids(await store.dead_letters(DeadLetterFilter(**where), limit=limit))

    assert await listed(destination="a") == [letters[0], letters[2], letters[3]]
    assert await listed(destination="B") == [letters[1]]
    assert await listed(destination="nowhere") == []
    assert await listed(reason="http 50") == [letters[1], letters[2], letters[3]]
    assert await listed(since=T0 + 2, until=T0 + 3) == [letters[1], letters[2]]
    assert await listed(ids=(letters[3], letters[0], 10**9)) == [letters[0], letters[3]]
    assert await listed(ids=()) == []
    assert await listed(destination="a", reason="500") == [letters[3]]
    # A limit keeps the newest, as an operator looking at a failure wants them
    assert await listed(limit=2) == letters[2:]
    assert await listed(limit=3, destination="a") == [letters[0], letters[2], letters[3]]
    assert await listed(limit=1, reason="http 50") == [letters[3]]
    assert await listed(limit=1, ids=(letters[0], letters[1])) == [letters[1]]


async def test_purge_removes_only_what_the_filter_selects(store):
    letters = await dead_letters_at(store, [("a", "HTTP 400", T0 + 1), ("b", "HTTP 500", T0 + 2),
                                            ("a", "HTTP 500", T0 + 3), ("a", "HTTP 404", T0 + 4),
                                            ("b", "HTTP 410", T0 + 5)])
    assert await store.purge(DeadLetterFilter(destination="A", reason="500")) == 1
    assert await store.purge(DeadLetterFilter(since=T0 + 4.5)) == 1
    assert await store.purge(DeadLetterFilter(ids=(letters[0],))) == 1
    assert await store.purge(DeadLetterFilter(until=T0 + 1.5)) == 0
    remaining = await store.dead_letters(DeadLetterFilter())
    assert ids(remaining) == [letters[1], letters[3]]
    assert await store.purge(DeadLetterFilter()) == 2
    stats = await store.stats(now=T0)
    assert all(queue.dead_letters == 0 for queue in stats.queues.values())


async def test_a_replay_of_one_destination_exactly_leaves_its_namesake_in_another_case(store):
    # `router dlq replay` replays each destination the config sends to by its very name:
    # compared without case, replaying "amp" took "Amp"'s letters too, to a queue no worker
    # sends from (review).
    await dead_letters_at(store, [("Amp", "HTTP 500", T0 + 1), ("amp", "HTTP 500", T0 + 2)])
    exact = DeadLetterFilter(destination="amp", exact_destination=True)
    assert await store.replay(exact, now=T0 + 5) == 1
    assert [letter.destination for letter in await store.dead_letters(DeadLetterFilter())] \
        == ["Amp"]
    assert len(await store.dead_letters(DeadLetterFilter(destination="AMP"))) == 1


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
async def test_concurrent_replays_queue_each_letter_once(backend, tmp_path, monkeypatch, request):
    # Both backends replay a page at a time (a replay of a million letters in one SQLite
    # transaction held every body in memory, and intake's write lock, for its whole work);
    # two replays at once (two shells) still queue each letter once.
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 3)
    monkeypatch.setattr(sqlite_letters, "REPLAY_PAGE", 3)
    if backend == "redis":
        url = unique_url(request.getfixturevalue("redis_url"))
        first, second = await another(url), await another(url, recover=False)
    else:
        first, second = SqliteStorage(tmp_path / "spool.db"), SqliteStorage(tmp_path / "spool.db")
        await first.open()
        await second.open(recover=False)
    try:
        await dead_letters_at(first, [("hook", "HTTP 500", T0 + n) for n in range(20)])
        counts = await asyncio.gather(first.replay(DeadLetterFilter(), now=T0 + 100),
                                      second.replay(DeadLetterFilter(), now=T0 + 100))
        assert sum(counts) == 20
        assert await first.dead_letters(DeadLetterFilter()) == []
        leased = await lease(first, 25, now=T0 + 100)
        assert sorted(job.message_id for job in leased) == sorted(f"m-{n}" for n in range(20))
    finally:
        await second.close()
        await first.close()


@pytest.fixture(params=["memory", "redis", "sqlite"])
async def every_store(request: pytest.FixtureRequest, tmp_path: Path):
    """The durable backends and the in-memory one, for what all three must do alike."""
    storage: MemoryStorage | RedisStorage | SqliteStorage = MemoryStorage()
    if request.param == "redis":
        storage = RedisStorage.from_url(unique_url(request.getfixturevalue("redis_url")))
    elif request.param == "sqlite":
        storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    yield storage
    await storage.close()


async def users_order(storage, *, now: float, destination: str = "hook") -> dict[str, list[str]]:
    """Each user's events as ordered leases hand them out, each round completed before the
    next lease: the order an ``ordered`` destination receives them in."""
    order: dict[str, list[str]] = {}
    while jobs := await lease(storage, destination=destination, now=now, ordered=True):
        for leased in jobs:
            order.setdefault(leased.user_key, []).append(leased.message_id)
        await storage.complete(jobs)
    return order


async def test_a_replay_queues_each_users_letters_in_the_order_they_were_accepted(
        every_store, monkeypatch):
    # On an ordered destination a user's events can be dead-lettered out of the order they
    # were accepted in (one went through more retries, past order_hold_attempts, or was
    # replayed and failed again): replayed in the order they failed, they went out in that
    # order. The pages of a replay (2 letters here) follow the order of acceptance too.
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    monkeypatch.setattr(sqlite_letters, "REPLAY_PAGE", 2)
    store = every_store
    accepted = ("a-1", "b-1", "a-2", "a-3", "b-2")
    await accept(store, *(item(message_id, destinations=("hook", "other"), user=message_id[0],
                               ordered=True) for message_id in accepted))
    failed = {"hook": ("a-3", "b-2", "a-1", "b-1", "a-2"),
              "other": ("b-2", "a-2", "a-1", "a-3", "b-1")}
    for destination, order in failed.items():
        jobs = {job.message_id: job for job in await lease(store, destination=destination)}
        for n, message_id in enumerate(order):
            await store.dead_letter([tried(jobs[message_id], T0)], now=T0 + n,
                                    failure=Failure("HTTP 500", 500))
    for destination, order in failed.items():
        letters = await store.dead_letters(DeadLetterFilter(destination=destination))
        assert tuple(letter.message_id for letter in letters) == order

    assert await store.replay(DeadLetterFilter(), now=T0 + 10) == 10
    for destination in failed:
        assert await users_order(store, now=T0 + 10, destination=destination) == {
            "a": ["a-1", "a-2", "a-3"], "b": ["b-1", "b-2"]}


async def test_a_letter_replayed_and_failing_again_keeps_its_place(every_store):
    # Dead-lettered again, a replayed job is a newer letter, with a newer job id: neither
    # is the order its event was accepted in, which the letter keeps (`accepted_id`).
    store = every_store
    await accept(store, item("a-1", user="a"), item("a-2", user="a"))
    first, second = await lease(store)
    await store.dead_letter([tried(first, T0)], now=T0, failure=Failure("HTTP 400: one"))
    await store.dead_letter([tried(second, T0)], now=T0 + 1, failure=Failure("HTTP 400: two"))
    assert await store.replay(DeadLetterFilter(reason="one"), now=T0 + 2) == 1
    (again,) = await lease(store, now=T0 + 2)
    assert again.message_id == "a-1" and again.id != first.id
    await store.dead_letter([tried(again, T0 + 2)], now=T0 + 3, failure=Failure("HTTP 400: one"))
    letters = await store.dead_letters(DeadLetterFilter())
    assert [letter.message_id for letter in letters] == ["a-2", "a-1"]

    assert await store.replay(DeadLetterFilter(), now=T0 + 4) == 2
    assert await users_order(store, now=T0 + 4) == {"a": ["a-1", "a-2"]}
    assert [letter.accepted_id for letter in letters] == [second.id, first.id]


async def test_a_replayed_letter_goes_behind_its_users_events_still_queued(every_store):
    # The choice docs/delivery.md states: a replay is new work, queued behind the jobs
    # already queued, the user's events accepted since included. Put before them, a letter
    # failing again would hold up the user's live events; and those of them already
    # delivered cannot be put back behind it anyway.
    store = every_store
    await accept(store, item("a-1", user="a", ordered=True), item("a-2", user="a", ordered=True))
    (first,) = await lease(store, ordered=True)
    await store.dead_letter([tried(first, T0)], now=T0, failure=Failure("HTTP 400"))
    assert await store.replay(DeadLetterFilter(), now=T0 + 1) == 1
    assert await users_order(store, now=T0 + 1) == {"a": ["a-2", "a-1"]}


async def test_redis_letters_written_before_they_kept_their_place_are_replayed_by_their_id(
        redis_store, raw):
    # A letter hash without `accepted_id` (written by an earlier version) is placed by its
    # own id, from the counter job ids come from: as if its event had been accepted when it
    # failed. Replayed and failing again, it keeps that place.
    await accept(redis_store, *(item(f"a-{n}", user="a") for n in (1, 2)))
    first, second = await lease(redis_store)
    await redis_store.dead_letter([second], now=T0, failure=Failure("HTTP 400"))
    await redis_store.dead_letter([first], now=T0 + 1, failure=Failure("HTTP 400"))
    old = await redis_store.dead_letters(DeadLetterFilter())
    for letter in old:  # as a version before `accepted_id` wrote them: in no index by place
        assert await raw.hdel(redis_store.keys.letter(letter.id), "accepted_id") == 1
        assert await raw.zrem(redis_store.keys.letters_placed("hook"), letter.id) == 1
    await accept(redis_store, item("a-3", user="a"), now=T0 + 2)
    (third,) = await lease(redis_store, now=T0 + 2)
    await redis_store.dead_letter([third], now=T0 + 2, failure=Failure("HTTP 400: three"))
    assert [letter.accepted_id for letter in await redis_store.dead_letters(
        DeadLetterFilter())] == [None, None, third.id]

    assert await redis_store.replay(DeadLetterFilter(ids=(old[0].id,)), now=T0 + 3) == 1
    (again,) = await lease(redis_store, now=T0 + 3)
    await redis_store.dead_letter([again], now=T0 + 3, failure=Failure("HTTP 400"))
    letters = await redis_store.dead_letters(DeadLetterFilter())
    assert [(letter.message_id, letter.accepted_id) for letter in letters] == [
        ("a-1", None), ("a-3", third.id), ("a-2", old[0].id)]
    assert await redis_store.replay(DeadLetterFilter(), now=T0 + 4) == 3
    assert await users_order(redis_store, now=T0 + 4) == {"a": ["a-2", "a-1", "a-3"]}


# -- Redis: the index of dead letters by place, which a replay walks ---------------------------

def without_the_index_by_place(script: str) -> str:
    """A script as the version before ``letters-placed`` ran it: the same, less its writes
    to that index (DEAD_LETTER's ZADD, and ``forget_letter``'s ZREM that REPLAY and PURGE
    call)."""
    older = script
    for line in ("    redis.call('ZADD', placed_key(d), f[6] or id, letter)\n",
                 "  redis.call('ZREM', placed_key(d), lid)\n"):
        older = older.replace(line, "")
    assert "ZREM', placed_key(d), lid)" not in older and older != script
    return older


async def older_router(url: str) -> RedisStorage:
    """A router of the version before the index of letters by place, as far as writing and
    purging dead letters goes: its letters are in no such index, and what it purges leaves
    its entry there (as its replay does)."""
    storage = await another(url, recover=False)
    for name, script in (("dead_letter", redis_scripts.DEAD_LETTER),
                         ("purge", redis_scripts.PURGE)):
        storage._scripts[name] = storage._client.register_script(
            without_the_index_by_place(script))
    return storage


async def placed(client: Any, storage: RedisStorage, destination: str = "hook"
                 ) -> dict[int, int]:
    """The destination's index of letters by place: letter id -> place."""
    return {int(member): int(score) for member, score in await client.zrange(
        storage.keys.letters_placed(destination), 0, -1, withscores=True)}


async def test_redis_a_replay_of_several_destinations_queues_them_in_the_order_of_acceptance(
        redis_store, raw, monkeypatch):
    # Each destination's letters are walked in their own index and the walks merged: the
    # new jobs take their ids in the order the events were accepted across destinations,
    # as when every place was read and sorted first (a page of 2 here, so that pages of
    # one destination end inside another's).
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    await accept(redis_store, *(item(f"m-{n}", destinations=("a", "b", "c")) for n in range(4)))
    first: dict[tuple[str, str], int] = {}
    for destination in "abc":
        jobs = await lease(redis_store, destination=destination)
        first.update({(job_.destination, job_.message_id): job_.id for job_ in jobs})
        random.Random(destination).shuffle(jobs)
        for n, job_ in enumerate(jobs):
            await redis_store.dead_letter([job_], now=T0 + n, failure=Failure("HTTP 500"))
    assert {letter_id: place for destination in "abc"
            for letter_id, place in (await placed(raw, redis_store, destination)).items()} == {
        letter.id: letter.accepted_id
        for letter in await redis_store.dead_letters(DeadLetterFilter())}

    assert await redis_store.replay(DeadLetterFilter(), now=T0 + 10) == 12
    replayed = sorted([(job_.id, first[job_.destination, job_.message_id])
                       for destination in "abc"
                       for job_ in await lease(redis_store, destination=destination, now=T0 + 10)])
    assert [accepted for _, accepted in replayed] == sorted(first.values())
    for destination in "abc":
        assert await placed(raw, redis_store, destination) == {}


async def test_a_replay_selects_by_destination_reason_and_failure_time(store):
    await dead_letters_at(store, [("a", "HTTP 400", T0 + 1), ("b", "HTTP 500", T0 + 2),
                                  ("a", "HTTP 500", T0 + 3), ("A", "HTTP 503", T0 + 4),
                                  ("b", "HTTP 502", T0 + 5), ("a", "HTTP 500", T0 + 6)])
    assert await store.replay(DeadLetterFilter(destination="a", reason="http 50",
                                               since=T0 + 2, until=T0 + 4), now=T0 + 9) == 2
    assert [(job_.destination, job_.message_id) for destination in ("a", "A", "b")
            for job_ in await lease(store, destination=destination, now=T0 + 9)] == [
        ("a", "m-2"), ("A", "m-3")]
    assert await store.replay(DeadLetterFilter(reason="502"), now=T0 + 9) == 1
    assert [letter.message_id for letter in await store.dead_letters(DeadLetterFilter())] == [
        "m-0", "m-1", "m-5"]


async def test_redis_letters_written_before_the_index_by_place_are_indexed_and_replayed_in_order(
        redis_store, url, raw, monkeypatch, caplog):
    # Letters a version without letters-placed wrote: the first replay indexes them,
    # PLACE_STEP letters a script, and queues them in the order of acceptance, as before.
    monkeypatch.setattr(redis_storage, "PLACE_STEP", 2)
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    older = await older_router(url)
    try:
        await accept(older, *(item(message_id, user=message_id[0], ordered=True)
                              for message_id in ("a-1", "b-1", "a-2", "a-3", "b-2")))
        jobs = {job_.message_id: job_ for job_ in await lease(older)}
        for n, message_id in enumerate(("a-3", "b-2", "a-1", "b-1", "a-2")):
            await older.dead_letter([jobs[message_id]], now=T0 + n, failure=Failure("HTTP 500"))
    finally:
        await older.close()
    assert await placed(raw, redis_store) == {}

    with caplog.at_level(logging.INFO, logger="router.storage.redis"):
        assert await redis_store.replay(DeadLetterFilter(), now=T0 + 9) == 5
    assert ("indexed the dead letters of 'hook' by the order their events were accepted, "
            "for replays (3 steps)") in caplog.text
    assert await users_order(redis_store, now=T0 + 9) == {"a": ["a-1", "a-2", "a-3"],
                                                         "b": ["b-1", "b-2"]}
    assert await raw.hget(redis_store.keys.letters_placed_built, "hook") == b"built"
    assert await placed(raw, redis_store) == {}


async def test_redis_a_replay_beside_routers_of_the_version_before_queues_every_letter_once(
        redis_store, url, raw, monkeypatch):
    # A rolling upgrade: a router of the version before letters-placed writes letters in no
    # such index after the index was built, and its purges (and replays) leave their
    # entries in it. A replay first indexes the letters written since the last one (letter
    # ids only grow: past the PLACE cursor), and drops the entries whose letters are gone.
    monkeypatch.setattr(redis_storage, "PLACE_STEP", 2)
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    older = await older_router(url)
    try:
        await accept(redis_store, *(item(m, user=m[0]) for m in ("a-1", "a-2", "a-3", "b-1")))
        mine = {job_.message_id: job_ for job_ in await lease(redis_store)}
        await accept(redis_store, *(item(m, user=m[0]) for m in ("a-4", "a-5", "a-6", "b-2")))
        theirs = {job_.message_id: job_ for job_ in await lease(older)}

        async def fail(storage: RedisStorage, jobs: dict[str, Job], *message_ids: str) -> None:
            for message_id in message_ids:
                await storage.dead_letter([jobs[message_id]], now=T0,
                                          failure=Failure(f"HTTP 500: {message_id}"))

        await fail(redis_store, mine, "a-3", "a-1")
        assert await redis_store.replay(DeadLetterFilter(reason="none"), now=T0) == 0  # built
        await fail(older, theirs, "a-5", "b-2", "a-4")
        assert await older.purge(DeadLetterFilter(reason="a-1")) == 1  # its entry left
        await fail(redis_store, mine, "a-2", "b-1")
        await fail(older, theirs, "a-6")
        # a-3, a-2, b-1 and the entry a-1's purge left; none of the older router's letters
        assert len(await placed(raw, redis_store)) == 4

        assert await redis_store.replay(DeadLetterFilter(), now=T0 + 1) == 7
    finally:
        await older.close()
    assert await users_order(redis_store, now=T0 + 1) == {"a": ["a-2", "a-3", "a-4", "a-5",
                                                                "a-6"], "b": ["b-1", "b-2"]}
    assert await redis_store.dead_letters(DeadLetterFilter()) == []
    assert await placed(raw, redis_store) == {}


async def test_redis_concurrent_replays_build_the_index_by_place_together_and_queue_once(
        url, raw, monkeypatch):
    # Two replays at once, of letters no index by place holds yet: both take steps of its
    # build, on one cursor, then walk it; each letter is queued once, in order.
    monkeypatch.setattr(redis_storage, "PLACE_STEP", 3)
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 3)
    older = await older_router(url)
    first, second = await another(url), await another(url, recover=False)
    try:
        await accept(older, *(item(f"m-{n:02}", destinations=("hook", "other"))
                              for n in range(20)))
        for destination in ("hook", "other"):
            jobs = await lease(older, 20, destination=destination)
            await older.dead_letter(jobs[::-1], now=T0, failure=Failure("HTTP 500"))
        counts = await asyncio.gather(first.replay(DeadLetterFilter(), now=T0 + 1),
                                      second.replay(DeadLetterFilter(), now=T0 + 1))
        assert sum(counts) == 40
        assert await first.dead_letters(DeadLetterFilter()) == []
        for destination in ("hook", "other"):
            leased = await lease(first, 40, destination=destination, now=T0 + 1)
            assert [job_.message_id for job_ in leased] == [f"m-{n:02}" for n in range(20)]
            assert await raw.hget(first.keys.letters_placed_built, destination) == b"built"
            assert await placed(raw, first, destination) == {}
    finally:
        for storage in (second, first, older):
            await storage.close()


async def test_redis_a_replay_leaves_the_letters_written_while_it_runs(redis_store,
                                                                      monkeypatch):
    # Only letters that exist when the replay starts: one written meanwhile whose place is
    # still ahead of the walk (an event accepted before the replayed ones' last, failing
    # now) is left for the next replay, as a replayed job failing again would be.
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 1)
    await accept(redis_store, *(item(f"m-{n}") for n in range(4)))
    jobs = await lease(redis_store)
    await redis_store.dead_letter([jobs[0], jobs[1], jobs[3]], now=T0, failure=Failure("x"))
    run, pages = redis_store._run, []

    async def failing_meanwhile(script: str, args: Any) -> Any:
        answer = await run(script, args)
        if script == "replay":
            pages.append(answer)
            if len(pages) == 1:  # m-2, accepted before m-3, fails after the first page
                await redis_store.dead_letter([jobs[2]], now=T0 + 1, failure=Failure("late"))
        return answer

    monkeypatch.setattr(redis_store, "_run", failing_meanwhile)
    assert await redis_store.replay(DeadLetterFilter(), now=T0 + 2) == 3
    assert [letter.message_id for letter in await redis_store.dead_letters(
        DeadLetterFilter())] == ["m-2"]
    assert [job_.message_id for job_ in await lease(redis_store, now=T0 + 2)] == [
        "m-0", "m-1", "m-3"]


async def test_redis_a_replay_walks_past_pages_of_letters_of_one_place(redis_store, raw,
                                                                       monkeypatch):
    # Letters of one place (only a Redis that lost writes, and gave ids out again, can hold
    # them): Redis orders them by id as text, and the walk goes on past a whole page of
    # them that the filter leaves, rather than reading that page for ever.
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    letters = await dead_letters_at(redis_store, [("hook", "HTTP 400", T0)] * 4
                                    + [("hook", "HTTP 500", T0)] * 2)
    await raw.zadd(redis_store.keys.letters_placed("hook"), {str(i): 7 for i in letters})
    assert await redis_store.replay(DeadLetterFilter(reason="500"), now=T0 + 1) == 2
    assert [letter.id for letter in await redis_store.dead_letters(DeadLetterFilter())] == \
        letters[:4]
    assert await redis_store.replay(DeadLetterFilter(), now=T0 + 1) == 4
    assert await placed(raw, redis_store) == {}


async def many_letters(storage: RedisStorage, count: int) -> None:
    """``count`` dead letters of ``hook``, written 1,000 a call."""
    for start in range(0, count, 1000):
        await accept(storage, *(item(f"m-{n}") for n in range(start, min(count, start + 1000))))
        await storage.dead_letter(await lease(storage, 1000), now=T0,
                                  failure=Failure("HTTP 500"))


async def replay_peak(url: str, count: int) -> int:
    """The most Python memory a replay of ``count`` letters held at once (tracemalloc)."""
    storage = await another(url)
    try:
        await many_letters(storage, count)
        gc.collect()
        tracemalloc.start()
        try:
            assert await storage.replay(DeadLetterFilter(), now=T0 + 1) == count
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        await storage.close()


async def test_redis_a_replay_holds_a_page_of_letters_however_many_there_are(
        redis_url, monkeypatch):
    # A replay read the place of every letter it selected before it queued any (about 130
    # bytes a letter): a replay of millions held them all. bench.replay measures the figure
    # for 50,000 letters (docs/storage.md).
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 100)
    few = await replay_peak(unique_url(redis_url), 1000)
    many = await replay_peak(unique_url(redis_url), 8000)
    assert many < 2 * few, (few, many)


async def test_stats_per_destination(store):
    await accept(store, item("m-1", destinations=("a", "b")), now=T0)
    await accept(store, item("m-2", destinations=("a",)), now=T0 + 10)
    (first,) = await lease(store, 1, destination="a", now=T0 + 10)
    await store.retry([tried(first, T0 + 10)], not_before=[T0 + 99], now=T0 + 10,
                      failure=Failure("x"))
    (other,) = await lease(store, 1, destination="b", now=T0 + 10)
    await store.dead_letter([other], now=T0 + 11, failure=Failure("x"))
    stats = await store.stats(now=T0 + 11)
    # a retry waiting for its time is still pending, and still the oldest
    assert (stats.queues["a"].pending, stats.queues["a"].oldest_created_at,
            stats.queues["a"].dead_letters) == (2, T0, 0)
    assert (stats.queues["b"].pending, stats.queues["b"].oldest_created_at,
            stats.queues["b"].dead_letters) == (0, None, 1)
    assert await store.ping()


async def test_prefixes_keep_routers_apart(redis_store, redis_url):
    elsewhere = await another(unique_url(redis_url))
    try:
        await accept(redis_store, item("m-1"))
        assert await accept(elsewhere, item("m-1")) == [True]
        assert len(await lease(elsewhere)) == 1
        assert len(await lease(redis_store)) == 1
    finally:
        await elsewhere.close()


# -- ordered leasing --------------------------------------------------------------------------

async def test_ordered_lease_holds_a_users_later_events_behind_a_retry(store):
    await accept(store, *(item(f"{user}-{n}", user=user, ordered=True)
                            for user, n in [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("c", 1)]))
    heads = await lease(store, ordered=True)
    assert [j.message_id for j in heads] == ["a-1", "b-1", "c-1"]
    a1, b1, c1 = heads
    await store.retry([tried(a1, T0)], not_before=[T0 + 60], now=T0, failure=Failure("x"))
    await store.complete([b1, c1])
    # b's next event goes on; a's waits for its first, which waits for its retry
    (b2,) = await lease(store, ordered=True, now=T0 + 1)
    assert b2.message_id == "b-2"
    await store.complete([b2])
    assert await lease(store, ordered=True, now=T0 + 59) == []
    (again,) = await lease(store, ordered=True, now=T0 + 60)
    assert again.message_id == "a-1"
    await store.complete([again])
    assert [j.message_id for j in await lease(store, ordered=True, now=T0 + 61)] == ["a-2"]


async def test_ordered_lease_lets_a_user_past_an_event_that_failed_hold_attempts(store):
    await accept(store, *(item(f"a-{n}", user="a", ordered=True) for n in (1, 2, 3)),
                 item("b-1", user="b", ordered=True))
    a1, b1 = await lease(store, ordered=True, hold_attempts=2)
    await store.complete([b1])
    await store.retry([tried(a1, T0)], not_before=[T0 + 10], now=T0, failure=Failure("x"))
    assert await lease(store, ordered=True, hold_attempts=2, now=T0 + 1) == []  # 1 < 2
    (a1,) = await lease(store, ordered=True, hold_attempts=2, now=T0 + 10)
    await store.retry([tried(a1, T0 + 10)], not_before=[T0 + 100], now=T0 + 10,
                      failure=Failure("x"))
    # a-1 failed twice: it steps out of a's line, and a's next goes; the one after waits
    assert await lease(store, ordered=True, now=T0 + 11) == []  # without the breaker
    (a2,) = await lease(store, ordered=True, hold_attempts=2, now=T0 + 11)
    assert a2.message_id == "a-2"
    await store.complete([a2])
    # a-1, due again, goes beside a-3: ordering is relaxed for what failed, not lost
    assert sorted(j.message_id for j in await lease(store, ordered=True, hold_attempts=2,
                                                     now=T0 + 100)) == ["a-1", "a-3"]


@pytest.mark.parametrize("hold_attempts", [1, 2, 5, 150])
async def test_a_lease_with_the_breaker_takes_each_users_jobs_no_earlier_job_holds(
        store, hold_attempts):
    # Random backlogs of retried jobs: a job goes when it is due and no earlier job of its
    # user, waiting or due, has failed fewer than hold_attempts attempts. SQLite answers
    # this through a partial index of its own per hold_attempts.
    rng = random.Random(hold_attempts)
    users = [f"u{n}" for n in range(6)]
    await accept(store, *(item(f"m-{n}", user=rng.choice(users), ordered=True)
                          for n in range(120)))
    queued = await lease(store, 200)
    state = {}  # job id -> (user, attempts, due)
    for job_ in queued:
        job_.attempts = rng.choice([0, 1, hold_attempts - 1, hold_attempts, hold_attempts + 3])
        due = rng.choice([T0, T0 + 1_000])
        state[job_.id] = (job_.user_key, job_.attempts, due)
        await store.retry([job_], not_before=[due], now=T0, failure=Failure("x"))

    def holds(earlier_id: Any, user: str) -> bool:
        return state[earlier_id][0] == user and state[earlier_id][1] < hold_attempts

    expected = sorted(job_id for job_id, (user, _, due) in state.items() if due <= T0 + 1
                      and not any(holds(other, user) for other in state if other < job_id))
    leased = await lease(store, 200, ordered=True, hold_attempts=hold_attempts, now=T0 + 1)
    assert sorted(ids(leased)) == expected and expected


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
async def test_a_lease_with_the_breaker_short_of_room_takes_the_oldest_jobs_that_may_go(
        store, limit):
    # With order_hold_attempts a user can have several jobs that may go, and Redis's lease,
    # which walks users by their oldest ready job, stops once no user further on can have an
    # older one than the `limit` it has found: the oldest that may go across users, as a look
    # at every job gives, not the first user's: u's retried jobs come first and third, v's
    # job second.
    hold = 1
    await accept(store, *(item(f"m-{n}", user=user, ordered=True)
                          for n, user in enumerate("uvuvuvuu")))
    queued = await lease(store, 100)
    retried = [job_ for job_ in queued if job_.user_key == "u"]
    for job_ in retried:
        await store.retry([tried(job_, T0)], not_before=[T0], now=T0, failure=Failure("x"))
    v_first, *v_rest = [job_ for job_ in queued if job_.user_key == "v"]
    await store.complete(v_rest)
    await store.retry([v_first], not_before=[T0], now=T0, failure=Failure("x"))  # no attempt
    may_go = sorted(ids([v_first, *retried]))  # none of u's holds u's line any more
    leased = await lease(store, limit, ordered=True, hold_attempts=hold, now=T0 + 1)
    assert sorted(ids(leased)) == may_go[:limit]


@pytest.mark.parametrize("hold_attempts", [None, 3])
async def test_one_users_backlog_past_the_scan_holds_back_no_other_user(
        store, monkeypatch, hold_attempts):
    # Redis's ordered lease looked at 5,000 ready jobs at most (ORDERED_SCAN_MAX): one user's
    # larger backlog, queued ahead of the others, hid every other user (ordering audit: 200
    # users got nothing through for 60 s behind one user's 6,000 jobs). The scan is bounded
    # in users now, and the backlog is one of them. Cut down here to keep the test quick.
    monkeypatch.setattr(redis_storage, "ORDERED_SCAN_MAX", 20)
    monkeypatch.setattr(redis_storage, "ORDERED_PAGE", 7)
    await accept(store, *(item(f"big-{n}", user="big", ordered=True) for n in range(60)))
    await accept(store, *(item(f"u{n}-1", user=f"u{n}", ordered=True) for n in range(12)))
    leased = await lease(store, 100, ordered=True, hold_attempts=hold_attempts)
    assert [j.message_id for j in leased] == ["big-0"] + [f"u{n}-1" for n in range(12)]
    # the backlog's head keeps failing: the backlog waits behind it, the others go on
    head, *others = leased
    await store.retry([tried(head, T0)], not_before=[T0 + 60], now=T0, failure=Failure("x"))
    await store.complete(others)
    await accept(store, *(item(f"u{n}-2", user=f"u{n}", ordered=True) for n in range(12)),
                 now=T0 + 1)
    leased = await lease(store, 100, ordered=True, hold_attempts=hold_attempts, now=T0 + 1)
    assert [j.message_id for j in leased] == [f"u{n}-2" for n in range(12)]
    await store.complete(leased)
    (again,) = await lease(store, 100, ordered=True, hold_attempts=hold_attempts, now=T0 + 60)
    assert again.message_id == "big-0"
    await store.complete([again])
    leased = await lease(store, 5, ordered=True, hold_attempts=hold_attempts, now=T0 + 61)
    assert [j.message_id for j in leased] == ["big-1"]


async def test_ordered_lease_holds_a_user_behind_a_leased_event(store):
    await accept(store, item("a-1", user="a", ordered=True), item("a-2", user="a", ordered=True))
    (first,) = await lease(store, 1, ordered=True)
    assert await lease(store, ordered=True) == []
    assert [j.message_id for j in await lease(store, ordered=False)] == ["a-2"]
    await store.complete([first])


async def test_ordered_lease_keeps_users_of_different_destinations_apart(store):
    # ('a:b', user 'c') and ('a', user 'b:c') must not be taken for one user
    await accept(store, Acceptance("web", "m-1", [NewJob("a:b", "m-1", "c", "", b"{}", True)]),
                 Acceptance("web", "m-2", [NewJob("a", "m-2", "b:c", "", b"{}", True)]))
    assert len(await lease(store, destination="a:b", ordered=True)) == 1
    assert len(await lease(store, destination="a", ordered=True)) == 1


# -- Redis: the index of users that ordered leases walk --------------------------------------

async def old_version_job(client: Any, storage: RedisStorage, message_id: str, user: str
                          ) -> None:
    """A job of destination ``hook`` queued as a router of the version before the index of
    users queues one (its ACCEPT, the dedup entry left out): in the ready queue, the pending
    index and its user's set, and in no index of users."""
    keys = storage.keys
    job_id = await client.incr(keys.ids)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.job(job_id), mapping={
            "destination": "hook", "message_id": message_id, "user_key": user, "group": "",
            "body": b"{}", "created_at": repr(T0), "attempts": 0})
        pipe.zadd(keys.ready("hook"), {job_id: job_id})
        pipe.zadd(keys.jobs("hook"), {job_id: T0})
        pipe.zadd(keys.user("hook", user), {job_id: job_id})
        pipe.sadd(keys.destinations, "hook")
        await pipe.execute()


async def old_version_delivers(client: Any, storage: RedisStorage, job_id: int) -> None:
    """A job leased and delivered by a router of the version before the index (its LEASE,
    unordered, then its COMPLETE): gone from every key it knew, its index entries left."""
    keys = storage.keys
    user = (await client.hget(keys.job(job_id), "user_key")).decode()
    async with client.pipeline(transaction=True) as pipe:
        for key in (keys.ready("hook"), keys.waiting("hook"), keys.leased("hook"),
                    keys.jobs("hook"), keys.user("hook", user)):
            pipe.zrem(key, job_id)
        pipe.delete(keys.job(job_id))
        await pipe.execute()


async def drain_ordered(storage: RedisStorage, rounds: int = 20, **options: Any
                        ) -> list[list[str]]:
    """Ordered leases, each round's jobs completed before the next, until one finds nothing
    and the queue is empty (or ``rounds``): the messageIds of each round."""
    leased_rounds: list[list[str]] = []
    for n in range(rounds):
        jobs = await lease(storage, 100, ordered=True, now=T0 + n, **options)
        await storage.complete(jobs)
        leased_rounds.append([job_.message_id for job_ in jobs])
        if not jobs and await pending(storage) == 0:
            break
    return leased_rounds


async def test_redis_a_queue_written_before_the_index_is_indexed_in_steps_and_kept_in_order(
        redis_store, raw, monkeypatch, caplog):
    # A Redis written by a version before the index of users: the destination's first
    # ordered lease builds it, INDEX_STEP ready jobs a script, and leases as before.
    monkeypatch.setattr(redis_storage, "INDEX_STEP", 4)
    await accept(redis_store, *(item(f"{user}-{n}", user=user, ordered=True)
                                for n in range(6) for user in ("a", "b", "c")))
    a0, b0 = await lease(redis_store, 2)  # unordered: no index is kept for it
    await redis_store.retry([tried(b0, T0)], not_before=[T0 + 60], now=T0, failure=Failure("x"))
    await forget_the_index(raw, redis_store)
    with caplog.at_level(logging.INFO, logger="router.storage.redis"):
        leased = await lease(redis_store, 10, ordered=True, now=T0 + 1)
    # a waits behind its leased head, b behind its retry
    assert [j.message_id for j in leased] == ["c-0"]
    assert "indexed the ready jobs of 'hook' by user for ordered leasing (5 steps)" in caplog.text
    assert await index_faults(raw, redis_store) == []
    await redis_store.complete([a0, *leased])
    assert [j.message_id for j in await lease(redis_store, 10, ordered=True, now=T0 + 2)
            ] == ["a-1", "c-1"]
    assert await index_faults(raw, redis_store) == []


async def test_redis_the_index_is_built_in_steps_while_another_router_works(
        redis_store, url, raw, monkeypatch):
    # Each step is one script: between two, another router queues, leases, retries and
    # completes, on keys the steps have read or have yet to read; the index comes out exact.
    monkeypatch.setattr(redis_storage, "INDEX_STEP", 3)
    await accept(redis_store, *(item(f"{user}-{n}", user=user, ordered=True)
                                for n in range(5) for user in ("a", "b", "c", "d")))
    other = await another(url)
    run, steps = redis_store._run, []

    async def with_the_other_at_work(script: str, args: Any) -> Any:
        answer = await run(script, args)
        if script == "index":
            steps.append(answer)
            step = len(steps)
            await accept(other, item(f"e-{step}", user="e", ordered=True), now=T0)
            (head,) = await lease(other, 1, now=T0)  # the oldest: its user's head
            if step % 2:
                await other.complete([head])
            else:
                await other.retry([tried(head, T0)], not_before=[T0], now=T0,
                                  failure=Failure("x"))
        return answer

    monkeypatch.setattr(redis_store, "_run", with_the_other_at_work)
    try:
        first = await lease(redis_store, 100, ordered=True, now=T0 + 1)
    finally:
        await other.close()
    assert len(steps) >= 5 and steps[-1] == 1
    assert await index_faults(raw, redis_store) == []
    rounds = [[j.message_id for j in first]]
    await redis_store.complete(first)
    rounds += await drain_ordered(redis_store)
    sent = [message_id for each in rounds for message_id in each]
    for user in "abcde":  # each user's events in the order they were queued
        theirs = [m for m in sent if m.startswith(f"{user}-")]
        assert theirs == sorted(theirs, key=lambda m: int(m.split("-")[1])) and theirs
    assert await pending(redis_store) == 0


async def test_redis_jobs_a_router_of_the_version_before_queues_go_out_and_in_order(
        redis_store, raw, monkeypatch):
    # A rolling upgrade: a router of the version before the index queues and delivers beside
    # one that keeps it. The jobs it queues are in no index, and those it delivers leave
    # their entries behind. The newer router's leases drop such entries when they meet them,
    # and find the missing jobs ORDERED_SWEEP ready jobs at a time when they come back short
    # (before, they would wait for ever); the user sets, which both versions keep, decide the
    # order.
    monkeypatch.setattr(redis_storage, "ORDERED_SWEEP", 2)
    await accept(redis_store, item("a-1", user="a", ordered=True),
                 item("b-1", user="b", ordered=True))
    await redis_store.complete(await lease(redis_store, 10, ordered=True))  # index built
    await accept(redis_store, item("a-2", user="a", ordered=True),
                 item("b-2", user="b", ordered=True))
    for message_id, user in [("c-1", "c"), ("c-2", "c"), ("a-3", "a"), ("d-1", "d"),
                             ("b-3", "b"), ("d-2", "d")]:
        await old_version_job(raw, redis_store, message_id, user)
    (b2,) = await raw.zrange(redis_store.keys.user("hook", "b"), 0, 0)
    await old_version_delivers(raw, redis_store, int(b2))  # b-2, in the index
    rounds = await drain_ordered(redis_store)
    sent = [message_id for each in rounds for message_id in each]
    assert sorted(sent) == ["a-2", "a-3", "b-3", "c-1", "c-2", "d-1", "d-2"]
    for user in "abcd":
        theirs = [m for m in sent if m.startswith(f"{user}-")]
        assert theirs == sorted(theirs)
    assert await index_faults(raw, redis_store) == []


# -- SQLite: the append-only queue and its cursor --------------------------------------------

@pytest.fixture
async def spool(tmp_path: Path):
    storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    yield storage
    await storage.close()


async def test_sqlite_reopened_gives_back_every_unfinished_job(spool, tmp_path):
    await accept(spool, *(item(f"m-{n}") for n in range(5)))
    jobs = await lease(spool, 5)
    await spool.complete([jobs[0]])
    await spool.retry([tried(jobs[1], T0)], not_before=[T0 + 60], now=T0, failure=Failure("x"))
    await spool.dead_letter([tried(jobs[2], T0)], now=T0, failure=Failure("HTTP 400", 400))
    await spool.close()  # m-3 and m-4 were leased, in flight: the process "died" with them

    reopened = SqliteStorage(tmp_path / "spool.db")
    await reopened.open()
    try:
        assert [j.message_id for j in await lease(reopened, now=T0 + 1)] == ["m-3", "m-4"]
        (retried,) = await lease(reopened, now=T0 + 60)
        assert (retried.message_id, retried.attempts, retried.id) == ("m-1", 1, jobs[1].id)
        assert await pending(reopened) == 3
    finally:
        await reopened.close()


def page_size(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        return connection.execute("PRAGMA page_size").fetchone()[0]


async def test_sqlite_a_new_spool_has_large_pages_and_an_older_file_keeps_its_own(tmp_path):
    """Bundles are large blobs, so new files take 16 KB pages; a spool made before (4 KB,
    SQLite's default) is opened as it is, and its work is all still there."""
    new = SqliteStorage(tmp_path / "new.db")
    await new.open()
    await new.close()
    assert page_size(tmp_path / "new.db") == 16384

    older = tmp_path / "older.db"
    with contextlib.closing(sqlite3.connect(older)) as connection, connection:
        connection.execute("PRAGMA page_size = 4096")
        connection.execute("CREATE TABLE made_before (x)")
    storage = SqliteStorage(older)
    await storage.open()
    await accept(storage, *(item(f"m-{n}") for n in range(3)))
    await storage.close()
    reopened = SqliteStorage(older)
    await reopened.open()
    try:
        assert [j.message_id for j in await lease(reopened)] == ["m-0", "m-1", "m-2"]
    finally:
        await reopened.close()
    assert page_size(older) == 4096


async def test_sqlite_keeps_its_dedup_index_beside_the_spool_and_removes_it(tmp_path):
    # In SQLite's temporary directory it took room that neither max_bytes nor min_free_bytes
    # saw: when that disk filled, every event was refused while /health said ok, and the
    # refusal named the spool's disk (disk audit).
    # Left by a process killed with kill -9, with this process's id: process 1 in a
    # container is process 1 again after a restart, and such files piled up (review).
    left_by_a_dead_process = tmp_path / f"spool.db.dedup-{os.getpid()}-0badc0de"
    left_by_a_dead_process.write_bytes(b"x" * 1000)
    other = SqliteStorage(tmp_path / "spool.db")  # another router on the file, still open
    await other.open()
    await accept(other, item("o-1"))  # the first intake makes its index
    storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    try:
        await accept(storage, *(item(f"m-{n}") for n in range(2000)))
        assert not left_by_a_dead_process.exists()
        indexes = sorted(tmp_path.glob(f"spool.db.dedup-{os.getpid()}-*"))
        assert len(indexes) == 2  # the other's is held, so kept
        assert max(index.stat().st_size for index in indexes) > 2000 * 16  # not in /var/tmp
        assert await accept(storage, item("m-7")) == [False]
        assert await accept(other, item("m-7")) == [False]  # its index still works
    finally:
        await storage.close()
        await other.close()
    assert not any(index.exists() for index in indexes)


async def test_sqlite_stats_are_read_beside_the_writer_not_on_it(tmp_path):
    # On the writer's connection, the counts behind /metrics held up every group commit
    # behind them: 31 ms with 500,000 jobs queued, at each scrape (stall audit). Here the
    # writer is kept busy until the stats are read: on it, they would never come.
    storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    try:
        await accept(storage, item("m-1"), item("m-2"))
        writer_free = threading.Event()
        busy = asyncio.ensure_future(storage._call(lambda _: writer_free.wait(20),
                                                   writes=False))
        try:
            stats = await asyncio.wait_for(storage.stats(now=time.time()), 15)
        finally:
            writer_free.set()
            await busy
        assert stats.queues["hook"].pending == 2 and stats.dedup_entries == 2
    finally:
        await storage.close()


async def test_sqlite_a_process_that_only_delivers_makes_no_dedup_index(tmp_path):
    # The delivery process made one it never used: on a disk where it could not, it failed
    # its start, and was started again and again, delivering nothing (I/O fault audit).
    storage = SqliteStorage(tmp_path / "spool.db")
    await storage.open()
    await storage.claim_delivery()
    assert await lease(storage) == []
    assert not list(tmp_path.glob("spool.db.dedup-*"))
    await storage.close()
    # Where it cannot be made, intake says so as the storage's error, naming the file: here
    # the process may open no more files (which a full disk or EIO would do as well)
    cramped = SqliteStorage(tmp_path / "spool.db")
    await cramped.open()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, limits[1]))
    try:
        with pytest.raises(StorageUnavailable, match=r"dedup index .*spool\.db\.dedup-.* "
                                                     r"cannot be made: Too many open files"):
            await accept(cramped, item("m-1"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert await accept(cramped, item("m-1")) == [True]  # made once it can be
    await cramped.close()


def test_sqlite_a_file_it_cannot_open_for_want_of_descriptors_is_not_called_a_disk_fault():
    # Under a flood of clients the process ran out of descriptors, and the 503s and the log
    # said "the spool's disk cannot be read or written": operators looked at their disks.
    cannot_open = sqlite3.OperationalError("unable to open database file")
    cannot_open.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # as SQLite sets it
    assert "disk cannot be read or written" in str(
        sqlite_errors._storage_error(cannot_open, Path("spool.db")))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, limits[1]))
    try:
        said = str(sqlite_errors._storage_error(cannot_open, Path("spool.db")))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert said.startswith("this process has no file descriptor left to open the spool's "
                           "files (Too many open files; its limit is 0): raise the limit")


async def test_sqlite_a_new_spool_is_readable_by_its_owner_only(tmp_path):
    # It holds the events (personal data among them) and the dead letters' requests and
    # answers: under the usual umask of 022 every file was readable by any local user
    # (security review). A spool made before keeps the permissions it has.
    previous = os.umask(0o022)
    try:
        storage = SqliteStorage(tmp_path / "var" / "spool.db")
        await storage.open()
        await storage.claim_delivery()
        await accept(storage, item("m-0"))
        files = sorted((tmp_path / "var").iterdir())
        modes = {path.name: path.stat().st_mode & 0o777 for path in files}
        await storage.close()
        older = tmp_path / "older.db"
        older.touch(mode=0o640)
        kept = SqliteStorage(older)
        await kept.open()
        await kept.close()
    finally:
        os.umask(previous)
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700
    index = f"spool.db.dedup-{os.getpid()}-"
    assert {name.split(index)[0] + (index if index in name else ""): mode
            for name, mode in modes.items()} == {
        "spool.db": 0o600, "spool.db-shm": 0o600, "spool.db-wal": 0o600,
        "spool.db.delivery-lock": 0o600, index: 0o600}
    assert older.stat().st_mode & 0o777 == 0o640


async def test_sqlite_never_reuses_a_job_id(spool):
    """The cursor is past every id it has leased: a new job must get a higher one even when
    every job before it is gone."""
    await accept(spool, item("m-1"), item("m-2"))
    first = await lease(spool)
    await spool.complete(first)
    await accept(spool, item("m-3"))
    (later,) = await lease(spool)
    assert later.message_id == "m-3" and later.id > max(ids(first))


async def test_sqlite_release_lets_the_jobs_be_read_again_but_not_those_in_flight(spool):
    await accept(spool, *(item(f"m-{n}") for n in range(4)))
    jobs = await lease(spool, 4)
    await spool.release([jobs[1].id, jobs[3].id])
    # the cursor moves back to m-1; m-2, still in flight, is not handed out a second time
    again = await lease(spool)
    assert [j.message_id for j in again] == ["m-1", "m-3"]
    await spool.complete([jobs[2]])
    assert await lease(spool) == []


async def test_sqlite_a_lease_may_stop_inside_a_bundle_and_the_next_goes_on_from_there(spool):
    await accept(spool, *(item(f"m-{n}", destinations=("hook", "other")) for n in range(5)))
    batches = [await lease(spool, 2) for _ in range(4)]
    assert [[j.message_id for j in batch] for batch in batches] == [
        ["m-0", "m-1"], ["m-2", "m-3"], ["m-4"], []]
    assert [j.message_id for j in await lease(spool, destination="other")] == [
        f"m-{n}" for n in range(5)]


async def test_sqlite_a_large_accept_is_spooled_in_several_bundles(spool, tmp_path, monkeypatch):
    monkeypatch.setattr("router.storage.sqlite.lanes.MAX_BUNDLE_JOBS", 3)
    await accept(spool, *(item(f"m-{n}") for n in range(8)))
    assert spool_rows(tmp_path / "spool.db")["bundles"] == 3
    leased = await lease(spool, 5)
    await spool.complete(leased)
    # the two jobs settled in the bundle still out are one run: one row
    assert spool_rows(tmp_path / "spool.db") == {"bundles": 2, "settled_runs": 1, "jobs": 0}
    assert [j.message_id for j in await lease(spool)] == ["m-5", "m-6", "m-7"]


@pytest.mark.parametrize("seed", range(6))
async def test_sqlite_leases_take_the_oldest_jobs_neither_held_nor_settled_whatever_came_before(
        spool, monkeypatch, seed):
    # Bundles of 7, leases of any size, and completions and releases of any held jobs in
    # between: a lease that runs through a bundle whole and one that steps over settled or
    # held jobs, or over a bundle's end, must each take exactly the oldest jobs to take.
    monkeypatch.setattr("router.storage.sqlite.lanes.MAX_BUNDLE_JOBS", 7)
    rng = random.Random(seed)
    names = [f"m-{n:03}" for n in range(60)]
    for start in range(0, len(names), 20):  # three accepts: bundles of 7, 7 and 6 each
        await accept(spool, *(item(name) for name in names[start:start + 20]))
    held: dict[str, Job] = {}
    settled: set[str] = set()
    for _ in range(40):
        size = rng.choice([1, 2, 5, 7, 9, 15, 30])
        expected = [name for name in names if name not in held and name not in settled][:size]
        leased = await lease(spool, size)
        assert [j.message_id for j in leased] == expected
        held.update((j.message_id, j) for j in leased)
        chosen = rng.sample(sorted(held), k=rng.randint(0, len(held)))
        done, back = chosen[:len(chosen) // 2], chosen[len(chosen) // 2:]
        await spool.complete([held.pop(name) for name in done])
        settled.update(done)
        await spool.release([held.pop(name).id for name in back])


def spool_rows(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        return {table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("bundles", "settled_runs", "jobs")}


async def test_sqlite_a_bundle_and_its_notes_go_once_every_job_of_it_is_settled(spool, tmp_path):
    await accept(spool, *(item(f"m-{n}") for n in range(4)))
    jobs = await lease(spool, 4)
    await spool.complete([jobs[0]])
    await spool.retry([tried(jobs[1], T0)], not_before=[T0 + 60], now=T0, failure=Failure("x"))
    assert spool_rows(tmp_path / "spool.db") == {"bundles": 1, "settled_runs": 2, "jobs": 1}
    assert await pending(spool) == 3
    await spool.dead_letter([tried(jobs[2], T0)], now=T0, failure=Failure("HTTP 400", 400))
    await spool.complete([jobs[3]])
    assert spool_rows(tmp_path / "spool.db") == {"bundles": 0, "settled_runs": 0, "jobs": 1}
    assert await pending(spool) == 1  # the retry


# -- a commit that fails in the dedup index only ---------------------------------------------

@contextlib.asynccontextmanager
async def commits_limited(storage: SqliteStorage, limit_at_commit: Callable[[], int | None]):
    """While the block runs, each COMMIT of ``storage``'s writer runs with no file of the
    process allowed to grow past ``limit_at_commit()`` bytes (None: no limit), as on a disk
    filled from outside. The spool's WAL is emptied first."""
    def trace(statement: str) -> None:
        limit = limit_at_commit() if statement == "COMMIT" else None
        resource.setrlimit(resource.RLIMIT_FSIZE, (
            resource.RLIM_INFINITY if limit is None else limit, resource.RLIM_INFINITY))

    def arm(connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        connection.set_trace_callback(trace)

    await storage._call(arm, writes=False)  # the tests' one reach into the writer
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,
                                                   resource.RLIM_INFINITY))
        await storage._call(lambda connection: connection.set_trace_callback(None),
                            writes=False)


@contextlib.asynccontextmanager
async def commit_failing_in_the_index(storage: SqliteStorage):
    """The next COMMIT of ``storage``'s writer fails in its dedup index only, as on a disk
    filled from outside: no file of the process may then grow past half the index file's
    size. The spool's WAL, emptied first, stays far below that, and SQLite commits it
    before the index (WAL mode commits attached databases one after another)."""
    limits = [storage._dedup_index[0].stat().st_size // 2]
    async with commits_limited(storage, lambda: limits.pop() if limits else None):
        yield
    assert not limits, "no COMMIT ran"


async def in_one_group_commit(storage: SqliteStorage, *calls):
    """Run ``calls`` (coroutines of ``storage``) in one group commit: queued while the writer
    is held up by a read."""
    held = asyncio.ensure_future(storage._call(lambda _: time.sleep(0.3), writes=False))
    await asyncio.sleep(0.05)
    results = await asyncio.gather(*calls, return_exceptions=True)
    await held
    return results


async def test_sqlite_a_group_commit_that_fails_in_the_dedup_index_only_stands(tmp_path):
    # Spool audit: the spool's part was committed, yet every operation was reported failed
    # and its bookkeeping undone: accepted events answered 503, and a completion that then
    # failed for good on its own settled_runs row, holding back the rest of its bundle.
    storage = SqliteStorage(tmp_path / "spool.db", min_free_bytes=0)
    await storage.open()
    try:
        for start in range(0, 40_000, 1000):  # a dedup index of some size
            await accept(storage, *(Acceptance("web", f"old-{n}", [])
                                    for n in range(start, start + 1000)))
        await accept(storage, *(item(f"m-{n}") for n in range(10)))
        delivered = await lease(storage, 5)
        async with commit_failing_in_the_index(storage):
            accepted, completed = await in_one_group_commit(
                storage, accept(storage, *(item(f"new-{n}") for n in range(500))),
                storage.complete(delivered))
        assert accepted == [True] * 500 and completed is None
        assert await accept(storage, item("new-0"), item("new-499")) == [False, False]
        rest = await lease(storage, 1000)
        assert [j.message_id for j in rest] == [f"m-{n}" for n in range(5, 10)] + [
            f"new-{n}" for n in range(500)]
        await storage.complete(rest)
        assert await pending(storage) == 0
    finally:
        await storage.close()


async def test_sqlite_a_batch_that_writes_the_dedup_index_alone_has_a_witness(tmp_path):
    # Only duplicates accepted, while the index takes another process's new ids (`router
    # send` beside `router serve`): no row of its own says whether the spool's part of a
    # failed commit stands, so the batch writes one.
    path = tmp_path / "spool.db"
    storage, other = SqliteStorage(path, min_free_bytes=0), SqliteStorage(path)
    await storage.open()
    await other.open(recover=False)
    try:
        for start in range(0, 40_000, 1000):
            await accept(storage, *(Acceptance("web", f"old-{n}", [])
                                    for n in range(start, start + 1000)))
        await accept(storage, *(item(f"m-{n}") for n in range(10)))
        delivered = await lease(storage, 5)
        await accept(other, *(Acceptance("web", f"sent-{n}", []) for n in range(2000)))
        async with commit_failing_in_the_index(storage):
            duplicate, completed = await in_one_group_commit(
                storage, accept(storage, item("m-0")), storage.complete(delivered))
        assert duplicate == [False] and completed is None
        assert await accept(storage, item("sent-7")) == [False]  # the index caught up
        assert [j.message_id for j in await lease(storage)] == [f"m-{n}" for n in range(5, 10)]
    finally:
        await other.close()
        await storage.close()


@contextlib.asynccontextmanager
async def commits_failing_in_the_spool(storage: SqliteStorage):
    """Every COMMIT of ``storage``'s writer fails, its WAL unwritable (no file of the process
    may grow past the WAL's size once it is emptied: SQLite reports a disk I/O error and
    rolls the transaction back whole), until the block ends."""
    wal = storage.path.with_name(storage.path.name + "-wal")
    async with commits_limited(storage, lambda: wal.stat().st_size):
        yield


async def test_sqlite_settling_or_releasing_jobs_that_could_not_be_written_leaves_them_held(
        spool):
    # A completion or a release rolled back (a disk error) is undone in memory too: its jobs
    # stay held, neither settled (their bundle kept) nor handed out again, until it is done
    # again; then each job goes exactly once. (A release of jobs of bundles writes nothing:
    # it fails with the completion it shares a group commit with.)
    await accept(spool, *(item(f"m-{n}") for n in range(10)))
    held = await lease(spool, 6)
    async with commits_failing_in_the_spool(spool):
        failures = await in_one_group_commit(
            spool, spool.complete(held[:3]), spool.release([job.id for job in held[3:5]]))
    assert [type(failure) for failure in failures] == [StorageUnavailable] * 2
    assert [job.message_id for job in await lease(spool, 10)] == [f"m-{n}" for n in range(6, 10)]
    await spool.release([job.id for job in held[3:5]])
    assert [job.message_id for job in await lease(spool, 10)] == ["m-3", "m-4"]
    await spool.complete(held[:3])
    assert await lease(spool, 10) == []
    assert await pending(spool) == 7


async def test_sqlite_settled_jobs_noted_one_row_each_by_an_earlier_version_stay_settled(
        tmp_path):
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path)
    await storage.open()
    await accept(storage, *(item(f"m-{n}") for n in range(6)))
    leased = await lease(storage, 6)
    await storage.complete([leased[0], leased[1], leased[3]])
    await storage.close()
    # as the version before runs wrote it
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        runs = connection.execute("SELECT first, last FROM settled_runs").fetchall()
        connection.execute("CREATE TABLE settled (id INTEGER PRIMARY KEY)")
        connection.executemany("INSERT INTO settled VALUES (?)",
                               [(n,) for first, last in runs for n in range(first, last + 1)])
        connection.execute("DROP TABLE settled_runs")
    storage = SqliteStorage(path)
    await storage.open()
    try:
        assert await pending(storage) == 3
        assert [j.message_id for j in await lease(storage)] == ["m-2", "m-4", "m-5"]
        assert spool_rows(path)["settled_runs"] == 3  # one a job, as they were
    finally:
        await storage.close()


def old_spool_with_a_queue(path: Path, count: int) -> None:
    """A spool as versions before bundles wrote it: a ``queue`` row a job (old-1, ...)."""
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.executescript("""
            CREATE TABLE lanes (destination TEXT PRIMARY KEY, number INTEGER NOT NULL UNIQUE,
                                last_seq INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE queue (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL,
                                user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL,
                                created_at REAL NOT NULL);
        """)
        connection.execute("INSERT INTO lanes VALUES ('hook', 1, ?)", (count,))
        connection.executemany(
            "INSERT INTO queue VALUES ((1 << 40) + ?, ?, 'u', '', X'7B7D', 1700000000.0)",
            [(n, f"old-{n}") for n in range(1, count + 1)])


async def test_sqlite_jobs_of_a_spool_written_before_bundles_are_delivered(tmp_path):
    path = tmp_path / "old.db"
    old_spool_with_a_queue(path, 2)
    storage = SqliteStorage(path)
    await storage.open()
    try:
        await accept(storage, item("new-1"))
        leased = await lease(storage, now=T0 + 1)
        assert [j.message_id for j in leased] == ["old-1", "old-2", "new-1"]
        assert leased[0].body == b"{}" and leased[2].id > leased[1].id
        await storage.complete(leased)
        assert await pending(storage) == 0
    finally:
        await storage.close()


def user_version(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        return connection.execute("PRAGMA user_version").fetchone()[0]


def tables(path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        return {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


async def test_sqlite_only_a_router_converts_a_spool_of_an_earlier_version(tmp_path):
    # `router dlq list` or `router check --storage` of the new version, run beside the old
    # router before the restart, once dropped the tables that router was still writing.
    path = tmp_path / "old.db"
    old_spool_with_a_queue(path, 1)
    cli = SqliteStorage(path)
    with pytest.raises(StorageMisconfigured, match="earlier version.*'queue'.*stop the router"):
        await cli.open(recover=False)
    assert "queue" in tables(path) and user_version(path) == 0
    router = SqliteStorage(path)
    await router.open()
    try:
        assert [job.message_id for job in await lease(router, now=T0)] == ["old-1"]
    finally:
        await router.close()
    assert "queue" not in tables(path) and user_version(path) == LAYOUT


async def test_sqlite_a_spool_of_a_later_layout_is_refused_untouched(tmp_path):
    # A rollback once read a newer spool as far as it understood it: it sent again what
    # the newer version had delivered, and missed what it had queued, without a word.
    path = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE future (x)")
        connection.execute(f"PRAGMA user_version={LAYOUT + 1}")
        connection.commit()
    gc.disable()  # a connection left open would be closed by the collector, unseen
    try:
        for recover in (True, False):
            with pytest.raises(StorageMisconfigured,
                               match=f"newer version.*layout {LAYOUT + 1}"):
                await SqliteStorage(path).open(recover=recover)
        # and closed again, not left holding the file until the garbage collector runs
        # (Python 3.13 warns of each: "unclosed database")
        assert not [fd for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve())]
    finally:
        gc.enable()
    assert tables(path) == {"future"}


async def test_sqlite_a_spool_of_layout_1_gains_the_dead_letters_first_attempt(tmp_path):
    # Layout 2 added dead_letters.first_attempt_at: a router adds it to a layout 1 file;
    # `router dlq` of the new version, which may run beside the old router, does not.
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path)
    await storage.open()
    await accept(storage, item("m-1"))
    (leased,) = await lease(storage)
    await storage.dead_letter([tried(leased, T0)], now=T0, failure=Failure("HTTP 400"))
    await storage.close()
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("ALTER TABLE dead_letters DROP COLUMN first_attempt_at")
        connection.execute("PRAGMA user_version = 1")
    with pytest.raises(StorageMisconfigured, match="not converted yet .*'dead_letters' has no "
                                                   "column 'first_attempt_at'"):
        await SqliteStorage(path).open(recover=False)
    router = SqliteStorage(path)
    await router.open()
    try:
        (letter,) = await router.dead_letters(DeadLetterFilter())
        assert (letter.message_id, letter.first_attempt_at) == ("m-1", None)
    finally:
        await router.close()
    assert user_version(path) == LAYOUT


LAYOUT_2_SCHEMA = """
CREATE TABLE seen (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, message_id TEXT NOT NULL,
    expires_at REAL NOT NULL);
CREATE TABLE lanes (
    destination TEXT PRIMARY KEY, number INTEGER NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE bundles (
    id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, created_at REAL NOT NULL,
    jobs BLOB NOT NULL);
CREATE TABLE settled_runs (last INTEGER PRIMARY KEY, first INTEGER NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY, destination TEXT NOT NULL, message_id TEXT NOT NULL,
    user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL,
    due_at REAL NOT NULL, leased INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, first_attempt_at REAL, last_error TEXT,
    body_crc INTEGER);
CREATE INDEX jobs_due ON jobs (destination, due_at, id);
CREATE INDEX jobs_user ON jobs (destination, user_key, id);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY, destination TEXT NOT NULL, message_id TEXT NOT NULL,
    user_key TEXT NOT NULL, grp TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL,
    created_at REAL NOT NULL, failed_at REAL NOT NULL, reason TEXT NOT NULL, status INTEGER,
    request TEXT, response TEXT, first_attempt_at REAL);
CREATE INDEX dead_letters_destination ON dead_letters (destination, failed_at);
PRAGMA user_version = 2;
"""
"""The spool's tables as layout 2 made them before letters kept the id their event was
accepted as."""


async def test_sqlite_letters_written_before_accepted_id_are_kept_and_replayed_first(tmp_path):
    # `accepted_id` was added to `dead_letters` and `jobs` within layout 2, so that a rollback
    # keeps the file. A letter written before
    # does not know it: a replay queues such letters first, in the order they were written
    # (the order every letter was replayed in before), then the others by acceptance.
    path = tmp_path / "spool.db"
    lane = 1 << 40
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.executescript(LAYOUT_2_SCHEMA)
        connection.execute("INSERT INTO lanes VALUES ('hook', 1, 5)")
        connection.executemany(  # a-1 went through more retries than a-2: it failed last
            "INSERT INTO dead_letters (destination, message_id, user_key, grp, body, attempts, "
            "created_at, failed_at, reason) VALUES ('hook', ?, 'a', '', ?, ?, ?, ?, 'HTTP 500')",
            [("a-2", b'{"id": "a-2"}', 1, T0, T0 + 5), ("a-1", b'{"id": "a-1"}', 5, T0, T0 + 9)])
        body = b'{"id": "a-3"}'
        connection.execute(  # a-3 waits for a retry
            "INSERT INTO jobs (id, destination, message_id, user_key, grp, body, created_at, "
            "due_at, attempts, body_crc) VALUES (?, 'hook', 'a-3', 'a', '', ?, ?, ?, 1, ?)",
            (lane + 3, body, T0, T0 + 10, zlib.crc32(body)))
    with pytest.raises(StorageMisconfigured, match="not converted yet .*'dead_letters' has no "
                                                   "column 'accepted_id'"):
        await SqliteStorage(path).open(recover=False)
    assert user_version(path) == 2

    router = SqliteStorage(path)
    await router.open()
    try:
        assert user_version(path) == LAYOUT == 2  # the previous version still opens it
        with contextlib.closing(sqlite3.connect(path)) as connection:
            assert connection.execute("SELECT 1 FROM sqlite_master WHERE name = "
                                      "'dead_letters_accepted'").fetchone()
        assert [(letter.message_id, letter.accepted_id) for letter in
                await router.dead_letters(DeadLetterFilter())] == [("a-2", None), ("a-1", None)]
        await accept(router, item("a-4", user="a"), now=T0 + 10)
        a4, a3 = sorted(await lease(router, now=T0 + 10), key=lambda job_: job_.message_id,
                        reverse=True)
        assert a3.id == lane + 3
        await router.dead_letter([tried(a4, T0 + 10)], now=T0 + 11, failure=Failure("HTTP 400"))
        await router.dead_letter([tried(a3, T0 + 10)], now=T0 + 12, failure=Failure("HTTP 400"))
        assert [(letter.message_id, letter.accepted_id) for letter in
                await router.dead_letters(DeadLetterFilter())] == [
            ("a-2", None), ("a-1", None), ("a-4", a4.id), ("a-3", lane + 3)]
        assert await router.replay(DeadLetterFilter(), now=T0 + 20) == 4
        assert await users_order(router, now=T0 + 20) == {"a": ["a-2", "a-1", "a-3", "a-4"]}
    finally:
        await router.close()


async def test_sqlite_every_row_of_jobs_carries_its_bodys_checksum(tmp_path):
    # Rows come to `jobs` three ways: an ordered destination's accept, a retry out of a
    # bundle, a replay; each must carry its CRC, or damage to it would go unseen.
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path)
    await storage.open()
    try:
        await accept(storage, item("bundled"), item("ordered", destinations=("keeps-order",),
                                                    ordered=True),
                     item("replayed", destinations=("other",)))
        (bundled,) = await lease(storage)
        await storage.retry([tried(bundled, T0)], not_before=[T0 + 60], now=T0,
                            failure=Failure("HTTP 503"))
        (replayed,) = await lease(storage, destination="other")
        await storage.dead_letter([tried(replayed, T0)], now=T0, failure=Failure("HTTP 400"))
        assert await storage.replay(DeadLetterFilter(), now=T0) == 1
    finally:
        await storage.close()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT message_id, body, body_crc FROM jobs").fetchall()
    assert sorted(message_id for message_id, _, _ in rows) == ["bundled", "ordered", "replayed"]
    assert all(crc == zlib.crc32(body) for _, body, crc in rows)


def test_bundles_of_one_accept_that_share_bodies_carry_each_bodys_own_checksum():
    # An accept computes a shared body's CRC once for all its bundles (by the body object,
    # and not at all for a job right after one with the same body): each body, shared or
    # not, in whatever order, still carries its own, and none reads as damaged.
    shared, other = b'{"shared":1}', b'{"other":2}'
    alike = b"".join([b'{"shared":', b"1}"])  # equal to `shared`, another object
    twin = b'{"shared":2}'  # as long as `shared`
    items = [Acceptance("s", "m1", [NewJob("a", "m1", "u", "g", shared),
                                    NewJob("b", "m1", "u", "g", shared),
                                    NewJob("c", "m1", "u", "g", other),
                                    NewJob("d", "m1", "u", "g", shared, ordered=True)]),
             Acceptance("s", "m2", [NewJob("c", "m2", "u", "g", alike),
                                    NewJob("a", "m2", "u", "g", other),
                                    NewJob("b", "m2", "u", "g", twin)])]
    lanes = {lane.destination: lane for lane in sqlite_lanes._lanes_of(items, 1.0)}
    for destination, bodies in (("a", [shared, other]), ("b", [shared, twin]),
                                ("c", [other, alike])):
        packed = lanes[destination].values(1)[3]
        assert bundle_format.unpack_bundle(packed, 2) == bundle_format.UnpackedBundle(
            ("m1", "m2"), ("u", "u"), ("g", "g"), bodies, {})
    assert lanes["d"].values(1)[5::9] == [shared]
    assert lanes["d"].values(1)[8::9] == [zlib.crc32(shared)]


def test_lanes_with_the_same_jobs_share_their_bundle_and_no_other_does():
    # An accept packs one bundle for lanes whose jobs are alike (the same body objects, the
    # same entries): a lane that differs in a group, a body or its count packs its own, and
    # each lane's rows keep ids of their own.
    first = b'{"n":1}'
    copy = b"".join([b'{"n":', b"1}"])  # equal to `first`, another object
    items = [Acceptance("s", f"m{n}", [NewJob(destination, f"m{n}", "u", group, body)
                                       for destination, group, body in (
                                           ("a", "g", first), ("b", "g", first),
                                           ("c", "h", first), ("d", "g", first))])
             for n in range(2)]
    items[1].jobs[3] = NewJob("d", "m1", "u", "g", copy)
    items[1].jobs[1] = NewJob("b", "m1", "u", "g", first)  # another NewJob, the same body
    lanes = {lane.destination: lane for lane in sqlite_lanes._lanes_of(items, 1.0)}
    packed = {destination: lane.values(1)[3] for destination, lane in lanes.items()}
    assert packed["a"] is packed["b"]
    assert packed["c"] is not packed["a"] and packed["d"] is not packed["a"]
    for destination, group, bodies in (("a", "g", [first, first]), ("c", "h", [first, first]),
                                       ("d", "g", [first, copy])):
        assert bundle_format.unpack_bundle(packed[destination], 2) == \
            bundle_format.UnpackedBundle(("m0", "m1"), ("u", "u"), (group, group), bodies, {})
    assert lanes["a"].values(7)[:2] == [8, 7] and lanes["b"].values(1)[:2] == [2, 1]


def _bundles_to_read() -> list[tuple[str, bytes, int]]:
    """Bundles as ``read_bundle`` may find them: sound ones of bodies of every size (empty,
    spanning many of SQLite's overflow pages, a run of 32 KB ones), and damaged ones of every
    kind, each with how many jobs it should hold."""
    large = 64 * 1024  # a body over many of SQLite's overflow pages
    generator = random.Random(7)

    def jobs(lengths: list[int]) -> list[NewJob]:
        return [NewJob("d", f"m-{n}", f"u-{n}", "g", bytes([n % 251]) * length)
                for n, length in enumerate(lengths)]

    def packed(lengths: list[int]) -> bytes:
        return bundle_format.pack_bundle(jobs(lengths))

    sizes = {"one": [10], "empty bodies": [0, 5, 0, 0], "a body of many overflow pages":
             [100, 3 * large + 1, 7], "a run of 32 KB bodies": [large // 2] * 9,
             "many": [generator.randrange(0, 4000) for _ in range(700)]}
    bundles = [(name, packed(lengths), len(lengths)) for name, lengths in sizes.items()]
    sound = packed(sizes["many"])
    header_end = 12 + int.from_bytes(sound[4:8], "big")
    flipped = bytearray(sound)
    flipped[header_end + 5000] ^= 1
    bad_header = bytearray(sound)
    bad_header[20] ^= 1
    layout_1_header = b'[["m-0","u-0","g",3],["m-1","u-1","g",2]]'
    bundles += [
        ("a body's byte changed", bytes(flipped), 700),
        ("the header changed", bytes(bad_header), 700),
        ("cut short", sound[:len(sound) - 3000], 700),
        ("cut within its header", sound[:header_end - 10], 700),
        ("fewer jobs than its ids", packed([5, 6]), 3),
        ("a negative length", bundle_format.pack_entries(
            [("m", "u", "g", -4, 0), ("n", "u", "g", 8, 0)], [b"x" * 20]), 2),
        ("a length that is not a number", bundle_format.pack_entries(
            [("m", "u", "g", "4", 0)], [b"x" * 4]), 1),
        ("layout 1", len(layout_1_header).to_bytes(4, "big") + layout_1_header + b"abcde", 2),
        ("not a bundle", b"\x00\x00", 1),
    ]
    return bundles


def test_a_bundle_read_body_by_body_is_the_bundle_read_whole(tmp_path):
    # The spool reads a leased bundle from its blob a body at a time (`read_bundle`); every
    # bundle, sound or damaged, must come out as `unpack_bundle` makes it of the whole.
    bundles = _bundles_to_read()
    with contextlib.closing(sqlite3.connect(tmp_path / "blobs.db")) as connection:
        connection.execute("CREATE TABLE bundles (id INTEGER PRIMARY KEY, jobs BLOB)")
        connection.executemany("INSERT INTO bundles (jobs) VALUES (?)",
                               [(packed,) for _, packed, _ in bundles])
        for row_id, (name, packed, count) in enumerate(bundles, start=1):
            with connection.blobopen("bundles", "jobs", row_id, readonly=True) as blob:
                assert bundle_format.read_bundle(blob, count) == \
                    bundle_format.unpack_bundle(packed, count), name


def test_a_bundles_groups_read_back_as_written_shared_or_mixed(tmp_path):
    # A bundle of one group reads it back as one string for all its jobs (the worker hashes
    # and compares it once); one of several groups keeps each job's own, in order. Read
    # whole (`unpack_bundle`) or from its blob in the spool's file (`read_bundle`, a lease's).
    one = [NewJob("a", f"m{n}", "u", group, b"{}") for n, group in enumerate(["seg\x1fg"] * 3)]
    mixed = [NewJob("a", f"m{n}", "u", group, b"{}") for n, group in enumerate("ghg")]
    with contextlib.closing(sqlite3.connect(tmp_path / "blobs.db")) as connection:
        connection.execute("CREATE TABLE bundles (id INTEGER PRIMARY KEY, jobs BLOB)")
        connection.executemany("INSERT INTO bundles (id, jobs) VALUES (?, ?)",
                               [(1, bundle_format.pack_bundle(one)),
                                (2, bundle_format.pack_bundle(mixed))])

        def read_both(row_id: int, count: int) -> list[bundle_format.UnpackedBundle]:
            packed = connection.execute("SELECT jobs FROM bundles WHERE id = ?",
                                        (row_id,)).fetchone()[0]
            with connection.blobopen("bundles", "jobs", row_id, readonly=True) as blob:
                return [bundle_format.unpack_bundle(packed, count),
                        bundle_format.read_bundle(blob, count)]

        for shared in read_both(1, 3):
            assert list(shared.groups) == ["seg\x1fg"] * 3 and not shared.damaged
            assert shared.groups[0] is shared.groups[1] is shared.groups[2]
        for apart in read_both(2, 3):
            assert list(apart.groups) == ["g", "h", "g"]
    assert list(bundle_format.unpack_bundle(bundle_format.pack_bundle([]), 0).groups) == []


async def test_sqlite_a_new_spool_is_stamped_with_its_layout(spool, tmp_path):
    assert user_version(tmp_path / "spool.db") == LAYOUT


async def test_sqlite_a_retry_the_full_disk_refused_is_not_lost(tmp_path):
    # The failed retry once left the job settled in memory and in no table: the next retry
    # wrote nothing, and the job was gone once the rest of its bundle was delivered.
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path)
    await storage.open()
    await accept(storage, *(Acceptance("web", f"m-{n}", [dataclasses.replace(
        job(f"m-{n}", "hook", "u"), body=b"x" * 100_000)]) for n in range(10)))
    first, *others = await lease(storage, now=T0)
    await fill_the_disk(storage, True)
    with pytest.raises(StorageFull):
        await storage.retry([first], not_before=[T0], now=T0, failure=Failure("HTTP 500"))
    await fill_the_disk(storage, False)
    await storage.complete(others)
    await storage.retry([first], not_before=[T0], now=T0, failure=Failure("HTTP 500"))
    await storage.close()
    reopened = SqliteStorage(path)
    await reopened.open()
    try:
        assert [job.message_id for job in await lease(reopened, now=T0 + 1)] == ["m-0"]
    finally:
        await reopened.close()


async def test_sqlite_intake_stops_while_the_disk_has_less_free_than_delivery_needs(tmp_path):
    storage = SqliteStorage(tmp_path / "spool.db", min_free_bytes=1 << 62)
    await storage.open()
    try:
        with pytest.raises(StorageFull, match="MB free, under the .* kept for delivery"):
            await accept(storage, item("m-1"))
    finally:
        await storage.close()


def checkpoint_growth(path) -> int:
    """What the next checkpoint adds to the spool file: the pages beyond its end."""
    with contextlib.closing(sqlite3.connect(path)) as reader:
        (pages,) = reader.execute("PRAGMA page_count").fetchone()
        (size,) = reader.execute("PRAGMA page_size").fetchone()
    return pages * size - path.stat().st_size


async def test_sqlite_intake_counts_what_a_long_read_keeps_from_the_spool_file(tmp_path):
    # A read held checkpoints off, the WAL grew to 194 MB beside 64 MB free, and the
    # checkpoint after it took the disk's last byte: delivery could record nothing again
    # (disk audit).
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path, min_free_bytes=0)
    await storage.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await accept(storage, item("m-0"))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM seen").fetchone()  # a snapshot, held
        body = os.urandom(200_000)  # does not compress: each accept adds 200 KB of pages
        for n in range(1, 60):
            await storage.accept([Acceptance("web", f"m-{n}", [NewJob(
                "hook", f"m-{n}", "user-1", "", body)])], window=WINDOW, now=T0)
        growth = checkpoint_growth(path)
        assert growth > 10_000_000
        # Room on the disk beyond the reserve, but not for the pages still in the WAL.
        storage.min_free_bytes = sqlite_budget._disk_free_bytes(path) - growth // 2
        with pytest.raises(StorageFull, match=r"less the \d+ MB its next checkpoint adds"):
            await accept(storage, item("m-refused"))
        reader.execute("COMMIT")
        reader.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert checkpoint_growth(path) == 0  # home: what the file took is the disk's now
        # (4 MB below the disk's free space: room for what the machine writes meanwhile)
        storage.min_free_bytes = sqlite_budget._disk_free_bytes(path) - 4 * 2**20
        assert await accept(storage, item("m-after")) == [True]
    finally:
        reader.close()
        await storage.close()


async def test_sqlite_intake_counts_the_room_delivery_freed_inside_the_spool(tmp_path):
    # Once a backlog had drained, its pages were free inside the file, which keeps its
    # size: the disk's free space did not change, and intake stayed refused with an empty
    # queue until a restart (soak).
    path = tmp_path / "spool.db"
    storage = SqliteStorage(path, min_free_bytes=0)
    await storage.open()
    try:
        body = os.urandom(200_000)
        for n in range(60):
            await storage.accept([Acceptance("web", f"m-{n}", [NewJob(
                "hook", f"m-{n}", "user-1", "", body)])], window=WINDOW, now=T0)
        while jobs := await lease(storage, 100):
            await storage.complete(jobs)
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            (free_pages,) = other.execute("PRAGMA freelist_count").fetchone()
        assert free_pages * 16384 > 10_000_000
        # Less free on the disk than the reserve, more once the spool's own room counts.
        storage.min_free_bytes = sqlite_budget._disk_free_bytes(path) + 5_000_000
        assert await accept(storage, item("m-after")) == [True]
        storage.min_free_bytes = sqlite_budget._disk_free_bytes(path) + 50_000_000
        with pytest.raises(StorageFull, match=r"MB free and \d+ MB inside the spool"):
            await accept(storage, item("m-refused"))
    finally:
        await storage.close()


async def test_sqlite_a_spool_another_process_keeps_locked_is_unavailable_not_an_error(
        spool, tmp_path, monkeypatch):
    # Intake answered 500 with a traceback, and delivery did not put the jobs back: the
    # raw "database is locked" was not one of the storage's errors.
    # The writer waits for the lock that long, and its error says so.
    monkeypatch.setattr(sqlite_writer, "LOCK_TIMEOUT", 0.2)
    monkeypatch.setattr(sqlite_errors, "LOCK_TIMEOUT", 0.2)
    other_process = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageUnavailable, match="held the spool locked for over 0.2 s"):
            await accept(spool, item("m-1"))
    finally:
        other_process.execute("ROLLBACK")
        other_process.close()
    assert await accept(spool, item("m-1")) == [True]


async def test_sqlite_a_replay_from_another_process_reaches_the_running_router(spool, tmp_path):
    await accept(spool, item("m-1"), item("m-2"))
    first, second = await lease(spool)
    await spool.complete([first])
    await spool.dead_letter([second], now=T0, failure=Failure("HTTP 400", 400))
    cli = SqliteStorage(tmp_path / "spool.db")  # `router dlq replay` while the router runs
    await cli.open(recover=False)
    try:
        assert await cli.replay(DeadLetterFilter(), now=T0 + 5) == 1
    finally:
        await cli.close()
    await accept(spool, item("m-3"))
    assert [j.message_id for j in await lease(spool, now=T0 + 5)] == ["m-2", "m-3"]


async def test_sqlite_one_accept_with_ordered_and_unordered_jobs_of_a_destination(spool):
    await accept(spool, item("a-1", user="a"), item("a-2", user="a", ordered=True),
                 item("b-1", user="b"))
    leased = await lease(spool, ordered=True)
    assert sorted(j.message_id for j in leased) == ["a-1", "b-1"]  # a-2 waits for a-1
    await spool.complete(leased)
    leased += await lease(spool, ordered=True)
    assert sorted(j.message_id for j in leased) == ["a-1", "a-2", "b-1"]
    assert len({j.id for j in leased}) == 3  # ids from one lane, never shared


@pytest.mark.parametrize("restart", [False, True])
async def test_store_a_destination_made_ordered_keeps_the_order_of_jobs_queued_before(
        store, tmp_path, restart, monkeypatch):
    # Jobs queued while the destination was unordered join the per-user order: on SQLite
    # they sat in bundles the per-user check did not see, and a user's event accepted
    # after the switch went out before the user's older ones (ordering audit).
    monkeypatch.setattr(sqlite_lanes, "BUNDLES_MOVED_AT_ONCE", 2)  # three bundles: 2 steps
    for queued in (item("a-1", user="a"), item("a-2", user="a"), item("b-1", user="b")):
        await accept(store, queued)
    await accept(store, item("a-3", user="a", ordered=True), item("b-2", user="b", ordered=True))
    if restart:  # the switch is a config change: a restart between the two is the usual way
        await store.close()
        await store.open()
        await store.claim_delivery()
    order: list[str] = []
    while jobs := await lease(store, ordered=True):
        assert len({job.user_key for job in jobs}) == len(jobs)  # a user's head at a time
        order += sorted(job.message_id for job in jobs)
        await store.complete(jobs)
    assert order == ["a-1", "b-1", "a-2", "b-2", "a-3"]


async def test_sqlite_on_a_full_disk_jobs_queued_before_ordered_still_go_out(spool):
    # Indexed rows take more room than bundles: on a full disk the move into the order
    # waits, and the bundles go out as before, since delivering them frees the disk.
    await accept(spool, *(item(f"a-{n}", user="a") for n in range(3000)))
    await fill_the_disk(spool, True)
    leased = await lease(spool, 5000, ordered=True)
    assert len(leased) == 3000
    await spool.complete(leased)
    await fill_the_disk(spool, False)
    await accept(spool, item("a-3000", user="a", ordered=True))
    assert [job.message_id for job in await lease(spool, ordered=True)] == ["a-3000"]


async def test_sqlite_a_bundle_partly_delivered_joins_the_order_without_its_delivered_jobs(
        tmp_path):
    # A bundle whose first jobs were delivered before a restart (noted in settled_runs)
    # moves into the per-user order with only the jobs still to deliver.
    spool = SqliteStorage(tmp_path / "spool.db")
    await spool.open()
    await spool.claim_delivery()
    await accept(spool, *(item(f"a-{n}", user="a") for n in range(4)))
    await spool.complete(await lease(spool, 2))
    await spool.close()
    await spool.open()
    await spool.claim_delivery()
    await accept(spool, item("a-4", user="a", ordered=True))
    order = []
    while jobs := await lease(spool, ordered=True):
        order += [job.message_id for job in jobs]
        await spool.complete(jobs)
    await spool.close()
    assert order == ["a-2", "a-3", "a-4"]


# -- several processes ------------------------------------------------------------------------

async def test_two_instances_share_the_work_and_never_lease_the_same_job(redis_store, url):
    await accept(redis_store, *(item(f"m-{n}", user=f"u-{n % 7}") for n in range(300)))
    other = await another(url)
    taken: dict[str, list[int | str]] = {"one": [], "two": []}

    async def work(name: str, storage: RedisStorage) -> None:
        while jobs := await lease(storage, 7):
            taken[name].extend(ids(jobs))
            await storage.complete(jobs)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(work("one", redis_store), work("two", other))
    finally:
        await other.close()
    assert taken["one"] and taken["two"]
    assert not set(taken["one"]) & set(taken["two"])
    assert len(taken["one"]) + len(taken["two"]) == 300
    assert await pending(redis_store) == 0


async def test_the_leases_of_a_dead_instance_are_taken_over_once_they_lapse(redis_store, url):
    await accept(redis_store, *(item(f"m-{n}") for n in range(5)))
    dead, survivor = await another(url), await another(url)  # two running processes
    held = await lease(dead, 3, now=T0)
    for leased in held:
        tried(leased, T0)
    try:
        rest = await lease(survivor, now=T0 + 1)
        assert [j.message_id for j in rest] == ["m-3", "m-4"]
        assert await lease(survivor, now=T0 + LEASE_FOR - 1) == []
        taken = await lease(survivor, now=T0 + LEASE_FOR)
        assert ids(taken) == ids(held)
        assert [j.attempts for j in taken] == [0, 0, 0]  # the lost attempts were never recorded

        # The dead instance wakes up late: its retry, dead letter and release are no-ops,
        # for the survivor holds those jobs now ...
        await dead.retry(held[:1], not_before=[T0], now=T0, failure=Failure("late"))
        await dead.dead_letter(held[1:2], now=T0, failure=Failure("late"))
        await dead.release(ids(held[2:]))
        assert await redis_store.dead_letters(DeadLetterFilter()) == []
        assert await lease(survivor, now=T0 + LEASE_FOR + 0.5) == []
        assert await pending(redis_store) == 5
        # ... but a late success still counts: the job was delivered, so it is forgotten
        # (the survivor's own completion of it is then a no-op).
        await dead.complete([held[0]])
        assert await pending(redis_store) == 4
        await survivor.retry([tried(taken[0], T0 + LEASE_FOR)], not_before=[T0],
                             now=T0 + LEASE_FOR, failure=Failure("x"))
        await survivor.complete(taken + rest)
        assert await pending(redis_store) == 0
    finally:
        await dead.close()
        await survivor.close()


async def test_open_takes_back_only_leases_that_lapsed(redis_store, url, raw):
    await accept(redis_store, *(item(f"m-{n}") for n in range(5)))
    now = time.time()
    live = await lease(redis_store, 3, now=now, lease_for=300)
    lapsed = await lease(redis_store, 2, now=now - 1000, lease_for=1)
    restarted = await another(url, recover=True)
    try:
        leased_key, ready_key = redis_store.keys.leased("hook"), redis_store.keys.ready("hook")
        assert sorted(int(i) for i in await raw.zrange(leased_key, 0, -1)) == ids(live)
        assert sorted(int(i) for i in await raw.zrange(ready_key, 0, -1)) == ids(lapsed)
        assert ids(await lease(restarted, now=time.time())) == ids(lapsed)
    finally:
        await restarted.close()


async def test_open_without_recover_takes_back_nothing(redis_store, url, raw):
    await accept(redis_store, item("m-1"))
    await lease(redis_store, now=time.time() - 1000, lease_for=1)
    tool = await another(url, recover=False)
    try:
        assert await raw.zcard(redis_store.keys.leased("hook")) == 1
        assert await tool.dead_letters(DeadLetterFilter()) == []
    finally:
        await tool.close()


async def test_a_renewed_lease_lapses_only_at_its_new_end(redis_store, url):
    await accept(redis_store, item("m-0"), item("m-1"))
    held = await lease(redis_store, now=T0, lease_for=30)
    other = await another(url, recover=False)  # recovery takes back by today's clock
    try:
        await redis_store.renew([job.id for job in held], now=T0 + 20, lease_for=30)
        await other.renew([job.id for job in held], now=T0 + 1000, lease_for=30)  # not its own
        assert await lease(other, now=T0 + 40) == []  # the first lease would have lapsed
        assert ids(await lease(other, now=T0 + 51)) == ids(held)
    finally:
        await other.close()


CHILD = """
import asyncio, sys, time
from router.storage.redis import RedisStorage
from router.storage.sqlite import SqliteStorage

async def main():
    storage = RedisStorage.from_url(sys.argv[1])
    await storage.open()
    jobs = await storage.lease("hook", 3, now=time.time(), lease_for=30.0)
    print(" ".join(str(job.id) for job in jobs), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_process_killed_with_sigkill_has_its_work_taken_over(redis_store, url):
    await accept(redis_store, *(item(f"m-{n}") for n in range(5)), now=time.time())
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, url, cwd=ROOT,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
    finally:
        child.kill()  # SIGKILL: it hands nothing back
        await child.wait()
    in_flight = [int(i) for i in line.split()]
    assert len(in_flight) == 3
    now = time.time()
    # the rest goes on at once; the dead process's jobs come back once its leases lapse
    assert len(await lease(redis_store, now=now, lease_for=300)) == 2
    assert await lease(redis_store, now=now + 29) == []
    assert ids(await lease(redis_store, now=now + 31)) == in_flight


# -- a full Redis -----------------------------------------------------------------------------

async def test_a_full_redis_still_records_retries_and_dead_letters(redis_store, raw):
    # Delivery must be able to record what became of the jobs it holds, or it sends them
    # again at once, for as long as Redis stays full (intake is refused meanwhile).
    await accept(redis_store, item("m-0"), item("m-1"))
    first, second = await lease(redis_store)
    first.attempts = second.attempts = 1
    await raw.config_set("maxmemory", "1")
    try:
        with pytest.raises(StorageFull):
            await accept(redis_store, item("m-2"))
        await redis_store.retry([first], not_before=[T0 + 60], now=T0,
                                failure=Failure("HTTP 503"))
        await redis_store.dead_letter([second], now=T0, failure=Failure("HTTP 400"))
    finally:
        await raw.config_set("maxmemory", "0")
    assert [letter.message_id for letter in await redis_store.dead_letters(
        DeadLetterFilter())] == ["m-1"]
    (retried,) = await lease(redis_store, now=T0 + 61)
    assert (retried.message_id, retried.attempts) == ("m-0", 1)


async def test_a_full_redis_still_builds_the_index_and_leases_in_order(redis_store, raw):
    # Delivery is what frees a full Redis: an ordered destination's first lease since the
    # upgrade (or since it was made ordered) must not wait for room to build its index.
    await accept(redis_store, *(item(f"{user}-{n}", user=user, ordered=True)
                                for n in (1, 2) for user in ("a", "b")))
    await raw.config_set("maxmemory", "1")
    try:
        with pytest.raises(StorageFull):
            await accept(redis_store, item("m-x"))
        leased = await lease(redis_store, 10, ordered=True)
    finally:
        await raw.config_set("maxmemory", "0")
    assert [j.message_id for j in leased] == ["a-1", "b-1"]
    assert await index_faults(raw, redis_store) == []


async def test_a_full_redis_still_renews_leases(redis_store, raw, url):
    # A destination that stays down fills Redis; the renewals of its live worker were
    # refused, its leases lapsed, and another router took its jobs and sent them twice.
    await accept(redis_store, item("m-0"))
    (held,) = await lease(redis_store, now=T0, lease_for=30)
    await raw.config_set("maxmemory", "1")
    try:
        with pytest.raises(StorageFull):
            await accept(redis_store, item("m-1"))
        await redis_store.renew([held.id], now=T0 + 20, lease_for=300)
    finally:
        await raw.config_set("maxmemory", "0")
    other = await another(url, recover=False)  # its clock is T0's, not today's
    try:
        assert await lease(other, now=T0 + 60) == []  # still held: its lease was renewed
        assert ids(await lease(other, now=T0 + 321)) == [held.id]  # then it lapses
    finally:
        await other.close()


@contextlib.asynccontextmanager
async def redis_user_refused(raw, url: str, *commands: str):
    """A Redis user allowed everything but ``commands`` (``"-hset"``, ...): its name and its
    URL. Deleted afterwards."""
    user = f"limited-{uuid.uuid4().hex[:8]}"
    await raw.acl_setuser(user, enabled=True, passwords=["+pw-12345678"], keys=["*"],
                          commands=["+@all", *commands])
    try:
        yield user, url.replace("redis://", f"redis://{user}:pw-12345678@", 1)
    finally:
        await raw.acl_deluser(user)


@contextlib.asynccontextmanager
async def storage_of_a_user_refused(raw, url: str, *commands: str):
    """A storage opened as a Redis user allowed everything but ``commands``."""
    async with redis_user_refused(raw, url, *commands) as (_, limited):
        storage = RedisStorage.from_url(limited)
        await storage.open()
        try:
            yield storage
        finally:
            await storage.close()


async def test_a_redis_user_without_scripts_is_refused_at_open(url, raw):
    # The router's every call is a script: such a user passed router check, /health and
    # start, and then every event was answered 500 ("a bug").
    async with redis_user_refused(raw, url, "-evalsha", "-eval") as (user, limited):
        with pytest.raises(StorageMisconfigured, match="refuses this user the router's "
                                                       "scripts.*needs \\+evalsha"):
            await RedisStorage.from_url(limited).open()
        # Taken away from a running router: intake is "try later" with why, not a 500.
        storage = RedisStorage.from_url(limited)
        await raw.acl_setuser(user, enabled=True, commands=["+evalsha", "+eval"])
        await storage.open()
        try:
            await raw.acl_setuser(user, enabled=True, commands=["-evalsha", "-eval"])
            with pytest.raises(StorageUnavailable, match="refuses this user a command"):
                await accept(storage, item("m-0"))
        finally:
            await storage.close()


async def test_a_redis_user_refused_a_command_inside_the_scripts_gets_503_with_why(url, raw):
    # Redis answers such a refusal in words of its own ("The user executing the script
    # can't run this command"), not NOPERM: intake answered 500, a bug.
    async with storage_of_a_user_refused(raw, url, "-hset") as storage:
        with pytest.raises(StorageUnavailable, match="refuses this user a command.*needs"):
            await accept(storage, item("m-0"))


async def test_a_redis_user_refused_what_stats_read_gets_storage_unavailable(url, raw):
    # Untranslated, the error reached router serve's start (which hung) and /metrics.
    async with storage_of_a_user_refused(raw, url, "-zcard") as storage:
        await accept(storage, item("m-0"))
        with pytest.raises(StorageUnavailable, match="refuses this user a command"):
            await storage.stats(now=T0)


@pytest.mark.parametrize(("reply", "refusal"), [
    # Redis 6.0 and 6.2 wrap what a command inside a script raised (recorded replies)
    ("Error running script (call to f_d21d823c05f839619c4ae7f43aa45cd66a0e12f4): "
     "@user_script:80: @user_script: 80: -OOM command not allowed when used memory > "
     "'maxmemory'.", StorageFull),
    ("Error running script (call to f_d21d823c05f839619c4ae7f43aa45cd66a0e12f4): "
     "@user_script:80: @user_script: 80: -MISCONF Redis is configured to save RDB snapshots, "
     "but it is currently not able to persist on disk.", StorageFull),
    ("Error running script (call to f_d21d823c05f839619c4ae7f43aa45cd66a0e12f4): "
     "@user_script:80: @user_script: 80: -READONLY You can't write against a read only "
     "replica.", StorageUnavailable),
    ("Error running script (call to f_d21d823c05f839619c4ae7f43aa45cd66a0e12f4): "
     "@user_script:76: @user_script: 76: The user executing the script can't access at "
     "least one of the keys mentioned in the command arguments", StorageUnavailable),
    # Valkey 8.1
    ("ACL failure in script: User nohset has no permissions to run the 'hset' command "
     "script: d21d823c05f839619c4ae7f43aa45cd66a0e12f4, on @user_script:20.",
     StorageUnavailable),
])
def test_refusals_inside_scripts_are_read_as_redis_6_and_valkey_word_them(reply, refusal):
    from redis.exceptions import ResponseError
    with pytest.raises(refusal):
        with redis_errors._translated_errors():
            raise ResponseError(reply)


async def test_a_redis_that_asks_for_a_password_the_url_lacks_says_so(url, raw):
    # redis-py's own message was "HELLO must be called with the client already
    # authenticated, otherwise the HELLO AUTH <user> <pass> option can be used...".
    await raw.config_set("requirepass", "pw-12345678")
    try:
        with pytest.raises(StorageMisconfigured, match="Redis asks for a password and the "
                                                       "storage URL gives none"):
            await RedisStorage.from_url(url).open()
    finally:
        await raw.config_set("requirepass", "")


async def test_health_says_a_redis_that_became_a_replica_refuses_intake(redis_store, raw):
    # After a failover the URL may name the old primary, now a replica: intake got 503
    # while /health said "ok", and a load balancer kept sending it every event.
    assert await redis_store.ping()
    await raw.replicaof("127.0.0.1", "1")  # nothing listens there: it stays a replica
    try:
        with pytest.raises(StorageUnavailable, match="Redis is a replica"):
            await redis_store.ping()
    finally:
        await raw.replicaof("NO", "ONE")
    assert await redis_store.ping()


async def test_redis_out_of_memory_is_storage_full(redis_store, raw):
    await accept(redis_store, item("m-0"))
    assert await redis_store.ping()
    await raw.config_set("maxmemory", "1")
    try:
        with pytest.raises(StorageFull, match="out of memory"):
            await accept(redis_store, item("m-1", destinations=("a", "b")))
        # /health says so too: it answered "ok" while intake refused every event
        with pytest.raises(StorageFull, match=r"out of memory \(\d+ [MK]B used of its "
                                              r"maxmemory 1 byte\)"):
            await redis_store.ping()
    finally:
        await raw.config_set("maxmemory", "0")
    assert await redis_store.ping()
    # nothing of the refused event was kept: accepting it again works
    assert await pending(redis_store, "a") == 0
    assert await accept(redis_store, item("m-1")) == [True]


async def test_a_redis_that_evicts_is_refused_unless_allowed(url, raw, caplog):
    # allkeys-lru dropped queued jobs under memory pressure; volatile-lru (a managed
    # Redis's usual default) dropped every dedup entry first: events lost or sent twice.
    await raw.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(StorageMisconfigured, match="maxmemory-policy is volatile-lru"):
            await RedisStorage.from_url(url).open()
        allowed = RedisStorage.from_url(url + "&eviction=allowed")
        with caplog.at_level(logging.WARNING, logger="router.storage"):
            await allowed.open()
        await allowed.close()
        assert "eviction is allowed" in caplog.text
    finally:
        await raw.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(ValueError, match="takes only `allowed`"):
        RedisStorage.from_url(url + "&eviction=yes")


def test_tls_options_are_refused_when_the_url_is_read_not_when_it_is_opened(url):
    # redis-py takes them for rediss:// only: ?ssl=true passed router check, then failed
    # to open with a TypeError.
    with pytest.raises(ValueError, match="TLS to Redis"):
        RedisStorage.from_url(url + "&ssl_cert_reqs=required")


async def test_completing_after_redis_lost_its_writes_spares_the_new_jobs(redis_store, raw):
    # Redis restarted without AOF: its id counter starts again, and the ids a router holds
    # for jobs it delivered before now name new jobs. Completing the old ones deleted the
    # new, accepted events, without a word.
    await accept(redis_store, item("old-1"), item("old-2"))
    delivered = await lease(redis_store)
    async for key in raw.scan_iter(f"{redis_store.prefix}:*"):  # the writes Redis lost
        await raw.delete(key)
    await accept(redis_store, item("new-1"), item("new-2"))
    await redis_store.complete(delivered)
    assert await pending(redis_store) == 2
    again = await lease(redis_store)
    assert ids(again) == ids(delivered)  # the same ids, handed out again
    assert [job.message_id for job in again] == ["new-1", "new-2"]


async def test_a_read_only_replica_is_unavailable_not_a_crash(redis_store, raw):
    # A URL that points at a replica after a failover: every write is refused with READONLY.
    await raw.execute_command("REPLICAOF", "127.0.0.1", "1")  # a primary that is not there
    try:
        with pytest.raises(StorageUnavailable, match="read-only replica"):
            await accept(redis_store, item("m-ro"))
    finally:
        await raw.execute_command("REPLICAOF", "NO", "ONE")
    assert await accept(redis_store, item("m-ro")) == [True]


async def test_a_primary_short_of_replicas_is_unavailable_and_health_says_so(redis_store, raw):
    # min-replicas-to-write with no replica: every event got 500 (a bug, with a traceback)
    # while /health said ok (Redis server faults audit).
    await raw.config_set("min-replicas-to-write", "1")
    try:
        with pytest.raises(StorageUnavailable, match="fewer replicas are connected"):
            await accept(redis_store, item("m-norep"))
        with pytest.raises(StorageUnavailable, match="fewer replicas are connected"):
            await redis_store.ping()
    finally:
        await raw.config_set("min-replicas-to-write", "0")
    assert await redis_store.ping()
    assert await accept(redis_store, item("m-norep")) == [True]


async def test_health_says_an_eviction_policy_set_since_the_start(redis_store, raw):
    # Refused at start, a policy set later went unnoticed while Redis could evict jobs.
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(StorageUnavailable, match="maxmemory-policy is allkeys-lru since"):
            await redis_store.ping()
    finally:
        await raw.config_set("maxmemory-policy", "noeviction")
    assert await redis_store.ping()


async def test_a_redis_busy_with_another_clients_script_is_unavailable(redis_store, raw):
    # Past its script time limit, Redis answers BUSY to everyone else: answered 500, a bug.
    # The other script spins until killed (30 s at most), so a slow test cannot see it end
    # before the accept is tried; it is past the limit once Redis answers BUSY to a PING.
    await raw.config_set("lua-time-limit", "50")
    spin = "local t = redis.call('TIME') local stop = t[1] + 30 " \
           "while tonumber(redis.call('TIME')[1]) < stop do end return 1"
    busy = asyncio.create_task(raw.eval(spin, 0))
    try:
        while True:
            try:
                await raw.ping()
            except redis_exceptions.ResponseError as error:
                if str(error).startswith("BUSY"):
                    break
                raise
            await asyncio.sleep(0.02)
        with pytest.raises(StorageUnavailable, match="busy running another client's script"):
            await accept(redis_store, item("m-busy"))
    finally:
        with contextlib.suppress(redis_exceptions.ResponseError):  # NOTBUSY: it had ended
            await raw.script_kill()
        await asyncio.gather(busy, return_exceptions=True)
        await raw.config_set("lua-time-limit", "5000")
    assert await accept(redis_store, item("m-busy")) == [True]


@pytest.mark.parametrize("reply", ["BUSY Redis is busy running a script. You can only call "
                                   "SCRIPT KILL or SHUTDOWN NOSAVE.",
                                   "NOREPLICAS Not enough good replicas to write."])
def test_redis_refusals_that_pass_are_unavailable(reply):
    from redis.exceptions import ResponseError
    with pytest.raises(StorageUnavailable):
        with redis_errors._translated_errors():
            raise ResponseError(reply)


# -- a model check: Redis against the in-memory backend ---------------------------------------

DESTINATIONS = ("a", "b")
USERS = ("u1", "u2", "u3")
MODEL_T0 = 1_000_000_000.0
"""Long past in real time: ``open(recover=True)`` (which reads the real clock) then finds
every lease lapsed, as the in-memory backend's recovery frees them all."""


def as_tuple(job_: Job) -> tuple[Any, ...]:
    return (job_.id, job_.destination, job_.message_id, job_.user_key, job_.group, job_.body,
            job_.created_at, job_.attempts, job_.first_attempt_at)


def letter_tuple(letter: DeadLetter) -> tuple[Any, ...]:
    return dataclasses.astuple(letter)


class RedisMatchesMemory(RuleBasedStateMachine):
    """Any sequence of enqueue / lease / complete / retry / dead letter / release / replay /
    purge / clock ticks / restarts leaves the Redis backend in the state the in-memory one
    is in: the same jobs leased, in the same order, the same stats and dead letters.

    Jobs whose lease lapsed are no longer acted on by the machine: there the backends differ
    on purpose (Redis ignores a stale holder's retry; memory has no holders)."""

    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefixed = unique_url(self.url)
        self.raw = aioredis.Redis.from_url(self.url)
        self.redis = self.run(self._open())
        self.memory = MemoryStorage()
        self.run(self.memory.open())
        self.now = MODEL_T0
        # job id -> (the Redis job, a copy of the memory job, lease expiry)
        self.held: dict[int | str, tuple[Job, Job, float]] = {}

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _open(self) -> RedisStorage:
        storage = RedisStorage.from_url(self.prefixed)
        await storage.open()
        return storage

    def teardown(self) -> None:
        self.run(self.redis.close())
        self.run(self.raw.aclose())
        self.loop.close()

    def both(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return (self.run(getattr(self.redis, method)(*args, **kwargs)),
                self.run(getattr(self.memory, method)(*args, **kwargs)))

    @rule(events=st.lists(st.tuples(st.sampled_from(("web", "ios")), st.integers(0, 30),
                                    st.sets(st.sampled_from(DESTINATIONS), min_size=1),
                                    st.sampled_from(USERS)), min_size=1, max_size=4))
    def enqueue(self, events: list[tuple[str, int, set[str], str]]) -> None:
        items = [Acceptance(source, f"m{n}", [NewJob(d, f"m{n}", user, "g" if d == "a" else "",
                                                     b'{"n": %d}' % n) for d in sorted(dests)])
                 for source, n, dests, user in events]
        on_redis, on_memory = self.both("accept", items, window=50.0, now=self.now)
        assert on_redis == on_memory

    @rule(destination=st.sampled_from(DESTINATIONS), limit=st.integers(1, 4),
          ordered=st.booleans(), hold_attempts=st.sampled_from((None, 1, 2)))
    def lease(self, destination: str, limit: int, ordered: bool, hold_attempts: int | None
              ) -> None:
        on_redis, on_memory = self.both("lease", destination, limit, now=self.now,
                                        lease_for=LEASE_FOR, ordered=ordered,
                                        hold_attempts=hold_attempts)
        assert [as_tuple(j) for j in on_redis] == [as_tuple(j) for j in on_memory]
        for redis_job, memory_job in zip(on_redis, on_memory):
            self.held[redis_job.id] = (redis_job, dataclasses.replace(memory_job),
                                       self.now + LEASE_FOR)

    def pick(self, data: st.DataObject, *, several: bool) -> list[int | str]:
        choices = sorted(self.held)
        if several:
            return data.draw(st.lists(st.sampled_from(choices), min_size=1, unique=True))
        return [data.draw(st.sampled_from(choices))]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        chosen = self.pick(data, several=True)
        self.run(self.redis.complete([self.held[job_id][0] for job_id in chosen]))
        self.run(self.memory.complete([self.held[job_id][1] for job_id in chosen]))
        for job_id in chosen:
            del self.held[job_id]

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delay=st.sampled_from((0.0, 5.0, 20.0, 45.0)))
    def retry(self, data: st.DataObject, delay: float) -> None:
        (job_id,) = self.pick(data, several=False)
        redis_job, memory_job, _ = self.held.pop(job_id)
        failure = Failure("HTTP 503", 503)
        self.run(self.redis.retry([tried(redis_job, self.now)], not_before=[self.now + delay],
                                  now=self.now, failure=failure))
        self.run(self.memory.retry([tried(memory_job, self.now)],
                                   not_before=[self.now + delay], now=self.now,
                                   failure=failure))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), reason=st.sampled_from(("HTTP 400", "HTTP 500", "gave up")),
          status=st.sampled_from((None, 400, 500)), with_response=st.booleans())
    def dead_letter(self, data: st.DataObject, reason: str, status: int | None,
                    with_response: bool) -> None:
        (job_id,) = self.pick(data, several=False)
        redis_job, memory_job, _ = self.held.pop(job_id)
        failure = Failure(reason, status, {"url": "https://x.example"} if status else None,
                          "{}" if with_response else None)
        self.run(self.redis.dead_letter([tried(redis_job, self.now)], now=self.now,
                                        failure=failure))
        self.run(self.memory.dead_letter([tried(memory_job, self.now)], now=self.now,
                                         failure=failure))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chosen = self.pick(data, several=True)
        self.both("release", chosen)
        for job_id in chosen:
            del self.held[job_id]

    filters = st.builds(DeadLetterFilter,
                        destination=st.sampled_from((None, "a", "B", "c")),
                        reason=st.sampled_from((None, "500", "http")))

    @precondition(lambda self: self.memory.letters)
    @rule(where=filters, purge=st.booleans())
    def replay_or_purge(self, where: DeadLetterFilter, purge: bool) -> None:
        if purge:
            on_redis, on_memory = self.both("purge", where)
        else:
            on_redis, on_memory = self.both("replay", where, now=self.now)
        assert on_redis == on_memory

    @rule(seconds=st.sampled_from((1.0, 5.0, 20.0, 31.0, 60.0)))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.held = {job_id: held for job_id, held in self.held.items() if held[2] > self.now}

    @rule()
    def crash_and_restart(self) -> None:
        """The process dies holding leases; a new one opens the storage and recovers."""
        self.run(self.redis.close())
        self.redis = self.run(self._open())
        self.run(self.memory.open(recover=True))
        self.held.clear()

    @rule()
    def upgrade_from_a_version_without_the_index(self) -> None:
        """The keys as a version before the index of users left them: the next ordered
        lease of each destination builds it again, in steps, and leases as before."""
        self.run(forget_the_index(self.raw, self.redis))

    @rule()
    def upgrade_from_a_version_without_the_index_by_place(self) -> None:
        """The keys as a version before the index of dead letters by place left them: the
        next replay of each destination builds it again, in steps, and replays as before."""
        keys = self.redis.keys
        self.run(self.raw.delete(keys.letters_placed_built, keys.letters_placed_cursor,
                                 *(keys.letters_placed(d) for d in DESTINATIONS)))

    @invariant()
    def the_index_by_place_matches_the_letters(self) -> None:
        """Each entry is a letter of its destination at its place; once built, every letter
        is in it (no router of an earlier version writes here)."""
        letters = self.run(self.redis.dead_letters(DeadLetterFilter(), limit=1000))
        for destination in DESTINATIONS:
            expected = {letter.id: letter.accepted_id for letter in letters
                        if letter.destination == destination}
            entries = self.run(placed(self.raw, self.redis, destination))
            assert entries.items() <= expected.items()
            if self.run(self.raw.hget(self.redis.keys.letters_placed_built,
                                      destination)) == b"built":
                assert entries == expected

    @invariant()
    def the_index_matches_the_queues(self) -> None:
        for destination in DESTINATIONS:
            assert self.run(index_faults(self.raw, self.redis, destination, USERS)) == []

    @invariant()
    def same_queues_and_dead_letters(self) -> None:
        on_redis, on_memory = self.both("stats", now=self.now)
        assert on_redis.queues == on_memory.queues
        on_redis, on_memory = self.both("dead_letters", DeadLetterFilter(), limit=1000)
        assert [letter_tuple(x) for x in on_redis] == [letter_tuple(x) for x in on_memory]


@pytest.mark.timeout(900)  # passing takes ~10 s; shrinking a failure takes minutes
def test_redis_behaves_like_the_in_memory_model(redis_url, monkeypatch):
    # Small steps, so that building the index, the walk over users and the look for jobs
    # the index lacks each take several.
    monkeypatch.setattr(redis_storage, "INDEX_STEP", 2)
    monkeypatch.setattr(redis_storage, "ORDERED_PAGE", 2)
    monkeypatch.setattr(redis_storage, "ORDERED_SWEEP", 2)
    monkeypatch.setattr(redis_storage, "PLACE_STEP", 2)
    monkeypatch.setattr(redis_storage, "LETTER_PAGE", 2)
    RedisMatchesMemory.url = redis_url
    run_state_machine_as_test(
        RedisMatchesMemory,
        settings=settings(max_examples=120, stateful_step_count=40, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow]))


# -- end to end: two routers, one Redis -------------------------------------------------------

async def test_two_routers_share_the_queue_and_the_dedup_window(tmp_path, url):
    async with FakeDestinationServer(default=Answer(200, delay=0.03)) as server:
        destinations = [webhook("hook", server.url, concurrency=1)]
        first = router_for(tmp_path, destinations, storage=url)
        second = router_for(tmp_path, destinations, storage=url)
        async with first, second:
            results = await first.route_many([track(n) for n in range(40)])
            assert not any(result.duplicate for result in results)
            # the other router knows these messageIds: the window is shared
            again = await second.route_many([track(n) for n in range(40)])
            assert all(result.duplicate for result in again)
            results = await second.route_many([track(n) for n in range(40, 50)])
            assert not any(result.duplicate for result in results)
            assert await first.drain(timeout=30)
            stats = await second.storage.stats(now=time.time())
        delivered = [request.json["messageId"] for request in server.requests
                     if request.status == 200]
        assert sorted(delivered) == sorted(f"m-{n}" for n in range(50))  # each exactly once
        by_first = first.delivery_metrics.delivered.get("hook")
        by_second = second.delivery_metrics.delivered.get("hook")
        assert by_first + by_second == 50
        assert by_first > 0 and by_second > 0  # both processes took part
        assert stats.queues == {}


async def two_routers_after_a_large_lease(tmp_path: Path, url: str, server: Any, *,
                                          lease_for: float, count: int) -> Router:
    """``count`` events routed by a first router whose worker leases them all at once for
    ``lease_for`` seconds, then delivered by it and a second router on the same Redis that
    starts right after; returns the second router."""
    destinations = [webhook("hook", server.url, concurrency=1)]
    first = router_for(tmp_path, destinations, storage=url)
    second = router_for(tmp_path, destinations, storage=url)
    async with first:
        lease_large_and_short(first, "hook", lease_for=lease_for)
        await first.route_many([track(n) for n in range(count)])
        async with second:
            assert await first.drain(timeout=30)
    return second


async def test_a_destination_slowing_down_never_lets_a_live_lease_lapse(tmp_path, url):
    """A worker that leased a large round while its destination was fast, which then answers
    slowly, completes what it delivers as it goes and gives back, once half its lease has
    passed, what it has not handed to a sender: another router on the same Redis then sends
    those, and no event is sent twice. (Before, the first router held the whole round, its
    deliveries uncompleted, past the lease; the second took the lapsed jobs and sent them
    again.) The lease is cut to 8 s here; it is 300 s at least in production."""
    async with FakeDestinationServer(default=Answer(200, delay=0.2)) as server:
        second = await two_routers_after_a_large_lease(tmp_path, url, server, lease_for=8.0,
                                                       count=50)
        sent = Counter(request.json["messageId"] for request in server.requests)
        assert sent == Counter(f"m-{n}" for n in range(50))  # each exactly once
        assert second.delivery_metrics.delivered.get("hook") > 0  # it got what was given back


async def test_a_throttled_worker_keeps_the_leases_of_what_it_holds(tmp_path, url):
    """A destination answers 429 with a Retry-After longer than the lease: the worker holds
    batches behind the pause (in its senders' hands and queue) and renews their leases, so
    the other router on the same Redis never takes them and sends them a second time. The
    lease is cut to 4 s here (renewed every second); it is 300 s at least in production."""
    async with FakeDestinationServer() as server:
        server.script([Answer(429, headers={"Retry-After": "6"})])
        await two_routers_after_a_large_lease(tmp_path, url, server, lease_for=4.0, count=20)
        delivered = Counter(request.json["messageId"] for request in server.requests
                            if request.status == 200)
        assert delivered == Counter(f"m-{n}" for n in range(20))  # each exactly once


def another_router_takes_over(url: str, destination: str) -> list[str]:
    """Block this thread, and with it the event loop of the caller (a stall, as of a router
    stopped or its VM paused), while another router, in a thread of its own, waits for the
    leases of ``destination`` to lapse, leases its jobs and delivers them; their ids."""
    async def take_over() -> list[str]:
        await asyncio.sleep(1.2)  # the first router's 1 s lease lapses
        other = await another(url)
        try:
            jobs = await other.lease(destination, 10, now=time.time(), lease_for=60)
            await other.complete(jobs)  # which it delivered
            return [job.message_id for job in jobs]
        finally:
            await other.close()

    taken: list[str] = []
    thread = threading.Thread(target=lambda: taken.extend(asyncio.run(take_over())))
    thread.start()
    thread.join(timeout=30)
    return taken


async def test_a_router_stalled_past_its_lease_does_not_send_what_another_took_over(
        tmp_path, url, caplog):
    """A router frozen past its lease (SIGSTOP, a paused VM) sent, once it ran again, the
    batch it had held, after the router that took it over had delivered it and the user's
    later events: out of order for an ordered destination (scale-out audit). The lease is
    cut to 1 s; it is 300 s at least in production."""
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [webhook("hook", server.url, rate_limit="1/s")],
                            storage=url)
        async with router:
            lease_large_and_short(router, "hook", lease_for=1.0)
            await router.route_many([track(0), track(1)])
            await server.wait_for(1)  # m-0 is sent; m-1 waits a second for the rate limit
            with caplog.at_level(logging.WARNING, logger="router.delivery"):
                taken = another_router_takes_over(url, "hook")  # the stall
                await asyncio.sleep(1.5)  # the first router runs again
    assert "m-1" in taken
    assert [request.json["messageId"] for request in server.requests] == ["m-0"]
    assert "held past their lease (this process stalled): not sent" in caplog.text


async def test_a_stall_while_a_batch_is_split_keeps_its_other_half_back(tmp_path, url, caplog):
    """The halves of a batch split after a 413 were trusted for ever: a router stalled while
    the first half was answered sent the second after another router had taken it (review)."""
    async with FakeDestinationServer() as server:
        server.script([Answer(413), Answer(200, delay=0.5)])  # the batch, then its first half
        router = router_for(tmp_path, [{
            "name": "seg", "plugin": "segment",
            "settings": {"write_key": "seg-key-0001", "base_url": server.url},
            "delivery": {"batch_wait": "200ms"}}], storage=url)
        async with router:
            lease_large_and_short(router, "seg", lease_for=1.0)
            await router.route_many([track(0), track(1)])
            await server.wait_for(2)  # the batch refused, its first half awaiting its answer
            with caplog.at_level(logging.WARNING, logger="router.delivery"):
                taken = another_router_takes_over(url, "seg")  # the stall
                await asyncio.sleep(1.5)  # the first router runs again
    assert sorted(taken) == ["m-0", "m-1"]
    sent = [[item["messageId"] for item in request.json["batch"]] for request in server.requests]
    assert sent == [["m-0", "m-1"], ["m-0"]]  # not m-1 after the other router had it
    assert "held past their lease (this process stalled): not sent" in caplog.text


async def test_redis_going_away_is_one_line_in_the_log_not_a_traceback_a_destination(
        tmp_path, caplog):
    # Each destination logged a 75-line traceback every 2 s for as long as Redis was down.
    (tmp_path / "redis").mkdir()
    process, port = start_redis_server(tmp_path / "redis")
    try:
        router = router_for(tmp_path, [webhook("a", "http://127.0.0.1:9/"),
                                       webhook("b", "http://127.0.0.1:9/")],
                            storage=f"redis://127.0.0.1:{port}/0")
        async with router:
            stop(process)
            with caplog.at_level(logging.WARNING, logger="router.delivery"):
                await asyncio.sleep(4.5)  # two more leases each, 2 s apart
            with pytest.raises(StorageUnavailable):
                # at once, not after the pool's 30 s (redis-py 5.0.1 deadlocked there)
                async with asyncio.timeout(5):
                    await router.storage.ping()  # what /health reports, with its reason
    finally:
        stop(process)
    lines = [record for record in caplog.records if "cannot lease work" in record.getMessage()]
    assert sorted(record.getMessage().split(":")[0] for record in lines) == \
        ["destination a", "destination b"]
    assert all(record.exc_info is None for record in lines)
    assert "until the storage answers: Redis cannot be reached" in lines[0].getMessage()


async def test_a_delivery_process_works_over_redis(tmp_path, url):
    """delivery.own_process with the shared storage: the router accepts, its delivery
    process (which opens the same Redis prefix) delivers, and the router sees the counts."""
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [webhook("hook", server.url)], storage=url,
                            delivery={"own_process": True})
        async with router:
            await router.route_many([track(n) for n in range(25)])
            await server.wait_for(25, timeout=20)
            assert await router.drain(timeout=10)
            for _ in range(100):
                if router.delivery_metrics.delivered.get("hook") == 25:
                    break
                await asyncio.sleep(0.05)
            assert router.delivery_metrics.delivered.get("hook") == 25
        assert sorted(r.json["messageId"] for r in server.requests) == \
            sorted(f"m-{n}" for n in range(25))


# -- a model check: the SQLite spool keeps every job until its fate is recorded ---------------

class SqliteSpoolKeepsEveryJob(RuleBasedStateMachine):
    """Any sequence of accept / lease / complete / retry / dead letter / release / clock
    ticks / restarts: a job is never leased twice at once, a lease takes every due job up
    to its limit (due retries first), and a job leaves the spool only when it is completed
    or dead-lettered, so after a restart whatever was unfinished comes back.

    SQLite is not compared with the in-memory backend as Redis is: it serves due retries
    before new jobs, where memory serves them in id order."""

    directory: ClassVar[Path] = Path()

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.path = self.directory / f"{uuid.uuid4().hex}.db"
        self.store = self.run(self._open())
        self.now = MODEL_T0
        self.serial = 0
        # (destination, message id) -> due time, for every job not completed or dead-lettered
        self.pending: dict[tuple[str, str], float] = {}
        self.held: dict[int | str, Job] = {}
        self.retried: set[tuple[str, str]] = set()
        """Jobs that went through ``retry`` (kept in SQLite's indexed table from then on)."""
        self.letters = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _open(self) -> SqliteStorage:
        storage = SqliteStorage(self.path)
        await storage.open()
        await storage.claim_delivery()  # as a delivering router does: it takes leases back
        return storage

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    @rule(destinations=st.lists(st.sets(st.sampled_from(DESTINATIONS), min_size=1),
                                min_size=1, max_size=4))
    def accept(self, destinations: list[set[str]]) -> None:
        items = []
        for dests in destinations:
            self.serial += 1
            message_id = f"m{self.serial}"
            items.append(Acceptance("web", message_id, [
                NewJob(d, message_id, USERS[self.serial % 3], "", b"{}") for d in sorted(dests)]))
            for d in dests:
                self.pending[(d, message_id)] = self.now
        assert self.run(self.store.accept(items, window=WINDOW, now=self.now)) == \
            [True] * len(items)

    @rule(destination=st.sampled_from(DESTINATIONS), limit=st.integers(1, 5))
    def lease(self, destination: str, limit: int) -> None:
        jobs = self.run(self.store.lease(destination, limit, now=self.now, lease_for=LEASE_FOR))
        keys = [(job.destination, job.message_id) for job in jobs]
        held = {(job.destination, job.message_id) for job in self.held.values()}
        assert all(job.destination == destination for job in jobs)
        assert not set(keys) & held, "a job leased twice at once"
        assert len(set(keys)) == len(keys)
        due = {key for key, at in self.pending.items()
               if key[0] == destination and at <= self.now and key not in held}
        assert set(keys) <= due
        assert len(keys) == min(limit, len(due)), "a due job was left behind"
        for job in jobs:
            self.held[job.id] = job

    def pick(self, data: st.DataObject) -> list[int | str]:
        return data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        chosen = self.pick(data)
        self.run(self.store.complete([self.held[job_id] for job_id in chosen]))
        for job_id in chosen:
            job = self.held.pop(job_id)
            del self.pending[(job.destination, job.message_id)]

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delay=st.sampled_from((0.0, 5.0, 40.0)))
    def retry(self, data: st.DataObject, delay: float) -> None:
        (job_id,) = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1,
                                       max_size=1))
        job = self.held.pop(job_id)
        self.run(self.store.retry([tried(job, self.now)], not_before=[self.now + delay],
                                  now=self.now, failure=Failure("HTTP 503", 503)))
        self.pending[(job.destination, job.message_id)] = self.now + delay
        self.retried.add((job.destination, job.message_id))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def dead_letter(self, data: st.DataObject) -> None:
        chosen = self.pick(data)
        jobs = [self.held.pop(job_id) for job_id in chosen]
        self.run(self.store.dead_letter(jobs, now=self.now, failure=Failure("HTTP 400", 400)))
        for job in jobs:
            del self.pending[(job.destination, job.message_id)]
        self.letters += len(jobs)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chosen = self.pick(data)
        released_at = time.time()  # release() takes no clock: a retried job is due from now
        self.run(self.store.release(chosen))
        for job_id in chosen:
            job = self.held.pop(job_id)
            key = (job.destination, job.message_id)
            # a new job is read again at once; a retried one is due at the real time of the
            # release, long after this model's clock (MODEL_T0 is in 2001)
            self.pending[key] = released_at if key in self.retried else \
                min(self.pending[key], self.now)

    @rule(seconds=st.sampled_from((1.0, 10.0, 60.0)))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def restart(self) -> None:
        """The process dies holding leases (closing without releasing is as good as a
        crash here: leases live in the process); a new one opens the file."""
        self.run(self.store.close())
        self.store = self.run(self._open())
        self.held.clear()

    @invariant()
    def the_spool_holds_exactly_the_unfinished_jobs(self) -> None:
        stats = self.run(self.store.stats(now=self.now))
        for destination in DESTINATIONS:
            queue = stats.queues.get(destination)
            expected = sum(1 for key in self.pending if key[0] == destination)
            assert (queue.pending if queue else 0) == expected
        assert sum(queue.dead_letters for queue in stats.queues.values()) == self.letters


def test_the_sqlite_spool_keeps_every_job_until_its_fate_is_recorded(tmp_path):
    SqliteSpoolKeepsEveryJob.directory = tmp_path
    run_state_machine_as_test(
        SqliteSpoolKeepsEveryJob,
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow]))


async def test_a_burst_of_calls_beyond_the_connection_pool_waits_instead_of_failing(
        redis_store):
    # Each call holds a connection for its script; past the pool they queue for one.
    results = await asyncio.gather(*(accept(redis_store, item(f"burst-{n}"))
                                     for n in range(400)))
    assert results == [[True]] * 400


async def test_redis_out_of_reach_is_storage_unavailable(tmp_path):
    process, port = start_redis_server(tmp_path)
    storage = RedisStorage.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        await storage.open()
        stop(process)
        with pytest.raises(StorageUnavailable, match="Redis cannot be reached"):
            await accept(storage, item("m-1"))
    finally:
        await storage.close()
        stop(process)


@pytest.mark.parametrize("size, shown", [(0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"),
                                         (1024, "1 KB"), (2**20 - 1, "1023 KB"),
                                         (64 * 2**20, "64 MB")])
def test_room_is_shown_in_a_unit_that_does_not_round_it_to_nothing(size, shown):
    # "the spool's disk has 0 MB free, under the 0 MB kept" for min_free_bytes=1
    assert amount_of_bytes(size) == shown


async def assert_accepts(storage: SqliteStorage) -> None:
    """``storage`` opens and accepts an event: its dedup index beside it could be made."""
    await storage.open()
    try:
        assert await storage.accept([Acceptance("web", "m-1", [])], window=WINDOW,
                                    now=time.time()) == [True]
    finally:
        await storage.close()


async def test_a_spool_name_its_dedup_index_could_not_have_is_refused_at_open(tmp_path):
    # A name of 236 bytes passed `router check --storage`, then every intake failed: the
    # dedup index beside it could not be made (deployment audit).
    storage = SqliteStorage(tmp_path / ("a" * 240 + ".db"))
    with pytest.raises(StorageUnavailable, match="the spool's name is too long: .* over "
                                                 "the 255 a file name may have"):
        await storage.open()
    await assert_accepts(SqliteStorage(tmp_path / ("a" * 200 + ".db")))  # index made at intake


async def test_the_longest_spool_name_its_dedup_index_can_have_is_taken(tmp_path):
    # The index adds ".dedup-", a pid of up to 7 digits, "-" and 8 hex digits: 23 bytes, so
    # 232 fit in 255 (mutation audit: a count 2 bytes short went unnoticed)
    assert os.pathconf(tmp_path, "PC_NAME_MAX") == 255
    with pytest.raises(StorageUnavailable, match="would have a name of 256 bytes"):
        await SqliteStorage(tmp_path / ("a" * 230 + ".db")).open()
    await assert_accepts(SqliteStorage(tmp_path / ("a" * 229 + ".db")))


def test_a_spool_this_user_may_not_write_is_said_so_not_as_a_disk_fault(tmp_path,
                                                                        monkeypatch):
    # SQLite answers READONLY when the spool's directory is not the service user's (it
    # cannot make -wal and -shm there): it was said as "the spool's disk cannot be read or
    # written" (deployment audit). Run as root here, where the kernel lets everything
    # through, os.access stands in for a user's rights.
    spool = tmp_path / "router.db"
    spool.touch()
    connection = sqlite3.connect(spool)
    try:
        connection.execute("PRAGMA query_only = ON")
        with pytest.raises(sqlite3.Error) as refused:
            connection.execute("CREATE TABLE t (x)")
    finally:
        connection.close()
    assert refused.value.sqlite_errorcode & 0xFF == sqlite3.SQLITE_READONLY
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    said = str(sqlite_errors._storage_error(refused.value, spool))
    assert said.startswith(f"this user (uid {os.geteuid()}) may not write the spool's "
                           f"directory {tmp_path}: SQLite writes the spool and its -wal")
    monkeypatch.undo()
    assert str(sqlite_errors._storage_error(refused.value, spool)).startswith(
        "the spool's disk cannot be read or written")
