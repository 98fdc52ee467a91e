"""A Redis ``router dlq replay`` of many dead letters: ``python -m bench.run replay``.

Starts a private redis-server (``tests.redis_helpers``: a free loopback port, no
persistence, stopped by its pid), writes ``count`` dead letters of one destination, and
replays them twice over: once timed, once under ``tracemalloc`` for the most Python memory
the replay held at once (a replay that reads every letter's place before it queues any
holds about 130 bytes a letter; one that walks the index by place, a page). Also Redis's
memory for the index by place (``MEMORY USAGE``), a byte figure per letter beside that of
the index by letter id, and how long building the index takes for letters written by a
version without it (the first replay's extra work). Figures recorded in docs/storage.md.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from router.storage.base import Acceptance, DeadLetterFilter, Failure, NewJob
from router.storage.redis import RedisStorage
from tests.redis_helpers import start_redis_server, stop

T0 = 1_700_000_000.0
CHUNK = 1000


async def _write_letters(storage: RedisStorage, count: int) -> None:
    """``count`` dead letters of ``hook``, each of its own event, ``CHUNK`` a call."""
    for start in range(0, count, CHUNK):
        items = [Acceptance("web", f"m-{n}", [NewJob("hook", f"m-{n}", f"user-{n % 100}", "",
                                                     b'{"event": "%d"}' % n)])
                 for n in range(start, min(count, start + CHUNK))]
        await storage.accept(items, window=3600.0, now=T0)
        jobs = await storage.lease("hook", CHUNK, now=T0, lease_for=60.0)
        await storage.dead_letter(jobs, now=T0, failure=Failure("HTTP 500", 500))


async def _memory_usage(client: Any, key: str) -> int:
    return int(await client.memory_usage(key, samples=0) or 0)


async def _replay(url: str, count: int, *, traced: bool) -> dict[str, float]:
    storage = RedisStorage.from_url(url)
    await storage.open()
    client = aioredis.Redis.from_url(url.split("?")[0])
    try:
        await _write_letters(storage, count)
        figures: dict[str, float] = {}
        placed = getattr(storage.keys, "letters_placed", None)  # none before the index
        if placed is not None and not traced:
            figures["index_by_place_bytes_per_letter"] = round(
                await _memory_usage(client, placed("hook")) / count, 1)
            figures["index_by_id_bytes_per_letter"] = round(
                await _memory_usage(client, storage.keys.letters("hook")) / count, 1)
            # As a version without the index left it: the first replay builds it.
            await client.delete(placed("hook"), storage.keys.letters_placed_built,
                                storage.keys.letters_placed_cursor)
            started = time.perf_counter()
            await storage._place_letters("hook", await storage._last_id())
            figures["index_build_seconds"] = round(time.perf_counter() - started, 3)
        gc.collect()
        if traced:
            tracemalloc.start()
        started = time.perf_counter()
        try:
            replayed = await storage.replay(DeadLetterFilter(), now=T0 + 1)
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
        finally:
            if traced:
                tracemalloc.stop()
        assert replayed == count, (replayed, count)
        if traced:
            figures["replay_python_peak_bytes"] = peak
        else:
            figures["replay_letters_per_second"] = round(
                count / (time.perf_counter() - started))
        return figures
    finally:
        await client.aclose()
        await storage.close()


async def _run(count: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as directory:
        process, port = start_redis_server(Path(directory))
        try:
            url = f"redis://127.0.0.1:{port}/0"
            timed = await _replay(f"{url}?prefix=timed", count, traced=False)
            traced = await _replay(f"{url}?prefix=traced", count, traced=True)
            return {"letters": count, **timed, **traced}
        finally:
            stop(process)


def run(count: int = 50_000) -> dict[str, object]:
    return asyncio.run(_run(count))
