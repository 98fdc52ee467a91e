"""A router process for the crash and memory tests, run as ``python tests/durability_worker.py``.

``route CONFIG COUNT [CHUNK]``: accept COUNT events in chunks, printing ``accepted N`` after
each chunk is durable, while delivering; then keep delivering until killed. With
``SYNC_LOG`` set (``fixtures/count_wal_syncs.c``'s log), each ``accepted N`` is also appended
to that file, so that the syncs it logs and the acknowledgements are in one order.
``backlog CONFIG COUNT``: accept COUNT events for a destination that is down, then print the
peak resident memory in MB.
"""

from __future__ import annotations

import asyncio
import os
import sys

from bench.delivery import peak_rss_mb  # VmHWM: ru_maxrss would count the runner's size
from router.config import load_config
from router.routing import Router


def events(start: int, count: int) -> list[dict]:
    return [{"type": "track", "event": "Crash Tested", "userId": f"user-{n % 97}",
             "messageId": f"crash-{n}", "properties": {"n": n, "pad": "x" * 200}}
            for n in range(start, start + count)]


async def route(config: str, count: int, chunk: int) -> None:
    async with Router(load_config(config)) as router:
        for start in range(0, count, chunk):
            await router.route_many(events(start, min(chunk, count - start)))
            if os.environ.get("SYNC_LOG"):
                with open(os.environ["SYNC_LOG"], "a") as log:
                    log.write(f"accepted {start + chunk}\n")
            print(f"accepted {start + chunk}", flush=True)
        while True:
            await asyncio.sleep(3600)


async def backlog(config: str, count: int) -> None:
    async with Router(load_config(config)) as router:
        for start in range(0, count, 1000):
            await router.route_many(events(start, min(1000, count - start)))
        await asyncio.sleep(1)
        print(f"peak_rss_mb {peak_rss_mb():.1f}", flush=True)
        await router.close(grace=0.5)


if __name__ == "__main__":
    mode, config, count, *rest = sys.argv[1:]
    if mode == "route":
        asyncio.run(route(config, int(count), int(rest[0]) if rest else 100))
    else:
        asyncio.run(backlog(config, int(count)))
