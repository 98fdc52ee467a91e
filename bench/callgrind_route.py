"""Instructions an event on the intake path (``Router.route_many`` into a SQLite spool),
counted by callgrind:

    .venv/bin/python -m bench.callgrind_route [--events 5000]
        [--part route|plan|accept|lease]
        [--out FILE]

runs this script again under callgrind (``bench.callgrind``, ``--inner``) and prints, as
JSON, the instructions counted and their number per event. The file callgrind wrote
(``--out``, ``callgrind.route.out`` by default) is kept, for ``callgrind_annotate
--inclusive=yes FILE | head -80``. About a minute for 5,000 events; run it twice per tree,
two runs at a time at most.

What it does, in one process: a router that does not deliver (``deliver=False``: the path
``bench.delivery``'s ``batching_cpu_split`` times as "route only"), 3 ``segment``
destinations, a SQLite spool in a temporary directory; ``--events`` events of
``bench.events.event_mix``, parsed from bytes beforehand (the HTTP server's work, not
counted), in chunks of 500, with their sizes as the server gives them. One chunk of other
events is routed first, uncounted, so that what happens once (the lanes made, the dedup
index's first pages, the interpreter's specialisation) is left out. The garbage collector
is tuned as ``router serve`` tunes it. Then, with callgrind's instrumentation on (the
writer thread's work included, since callgrind counts every thread):

``--part route`` (the default)
    ``route_many`` of each chunk, one after the other, each its own group commit;
``--part plan``
    ``Router.plan`` of each event alone (the in-process path: parse, normalize,
    integrations, translate, serialize), no storage;
``--part accept``
    ``storage.accept`` of each chunk alone, the acceptances (the same jobs as ``route``'s)
    built beforehand, uncounted.

``--part lease``
    the other half of the spool's work: the events routed first, uncounted, then every
    destination's jobs leased 300 at a time and completed, as ``bench.delivery``'s
    ``spool`` phase does (no requests: what the spool costs a delivery).

``route`` less ``plan`` and ``accept`` is the glue between them. Under callgrind Python
runs about 50 times slower, so ``route_many``'s turn of the event loop every
``PLAN_TURN_AFTER`` seconds is scaled by as much, and comes as often an event as at full
speed (else its number followed the machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.callgrind import UNDER_VALGRIND, instrumentation, under_callgrind
from bench.delivery import chunks_of, make_router, quiet_router_logs, segment
from bench.events import event_mix
from router import routing
from router.routing import Router, _acceptances
from router.runtime import tune_garbage_collector
from router.storage.base import Acceptance

DESTINATIONS = 3
CHUNK = 500
LEASE = 300
"""Jobs a lease takes on ``--part lease``, as ``bench.delivery``'s spool phase."""
SLOWDOWN = 50
"""About how much slower Python runs under callgrind (see the module's doc)."""
BASE_URL = "http://127.0.0.1:9"
"""Nothing is delivered: the destinations' URL is never used."""


def parsed_chunks(count: int, seed: int) -> list[tuple[list[Any], list[int]]]:
    """Chunks of events parsed from bytes, each with its events' sizes."""
    return [([orjson.loads(raw) for raw in chunk], [len(raw) for raw in chunk])
            for chunk in chunks_of(event_mix(count, seed=seed), CHUNK)]


def acceptances_of(router: Router, events: Sequence[Any], sizes: Sequence[int]
                   ) -> list[Acceptance]:
    """What ``route_many`` would hand the storage for these events."""
    received = datetime.now(UTC)
    results = [router.plan(event, received_at=received, size=size)
               for event, size in zip(events, sizes)]
    return _acceptances([result for result in results if result.event is not None],
                        routing.DEFAULT_SOURCE, router._queued_as)


async def count(events: int, part: str) -> dict[str, Any]:
    if UNDER_VALGRIND:
        routing.PLAN_TURN_AFTER *= SLOWDOWN
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-route-") as directory:
        quiet_router_logs(directory)
        destinations = [segment(f"d{n}", f"{BASE_URL}/s/d{n}") for n in range(DESTINATIONS)]
        router = make_router(directory, destinations, deliver=False)
        await router.start()
        try:
            for chunk, sizes in parsed_chunks(CHUNK, seed=3):  # uncounted warm-up
                await router.route_many(chunk, sizes=sizes)
            chunks = parsed_chunks(events, seed=17)
            prepared = ([acceptances_of(router, chunk, sizes) for chunk, sizes in chunks]
                        if part == "accept" else [])
            if part == "lease":  # the warm-up's jobs leased uncounted, then these queued
                await run(router, "lease", [], [])
                for chunk, sizes in chunks:
                    await router.route_many(chunk, sizes=sizes)
            tune_garbage_collector()
            instrumentation(True)
            started = time.perf_counter()
            try:
                jobs = await run(router, part, chunks, prepared)
            finally:
                instrumentation(False)
                seconds = time.perf_counter() - started
        finally:
            await router.close()
    return {"events": events, "part": part, "jobs": jobs, "seconds": round(seconds, 1)}


async def run(router: Router, part: str, chunks: list[tuple[list[Any], list[int]]],
              prepared: list[list[Acceptance]]) -> int:
    """The counted work; returns the jobs it made (a check that each part made them all)."""
    jobs = 0
    if part == "route":
        for chunk, sizes in chunks:
            for result in await router.route_many(chunk, sizes=sizes):
                jobs += sum(len(item.bodies) for item in result.results)
    elif part == "plan":
        for chunk, sizes in chunks:
            received = datetime.now(UTC)  # one for the chunk, as route_many's
            for event, size in zip(chunk, sizes):
                result = router.plan(event, received_at=received, size=size)
                jobs += sum(len(item.bodies) for item in result.results)
    elif part == "accept":
        for acceptances in prepared:
            await router.storage.accept(acceptances, window=router.window, now=time.time())
            jobs += sum(len(acceptance.jobs) for acceptance in acceptances)
    elif part == "lease":
        for destination in router.destinations:
            while batch := await router.storage.lease(destination.name, LEASE, now=time.time(),
                                                      lease_for=300):
                await router.storage.complete(batch)
                jobs += len(batch)
    else:
        raise ValueError(f"unknown part {part!r}")
    return jobs


def run_under_callgrind(events: int, part: str, out: Path) -> dict[str, Any]:
    result, instructions = under_callgrind(
        "bench.callgrind_route", ["--events", str(events), "--part", part], out)
    return {**result, "instructions": instructions,
            "instructions_per_event": round(instructions / events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--part", choices=("route", "plan", "accept", "lease"), default="route",
                        help="what is counted (see the module's doc)")
    parser.add_argument("--out", type=Path, default=Path("callgrind.route.out"),
                        help="callgrind's output file (kept for callgrind_annotate)")
    parser.add_argument("--inner", action="store_true",
                        help="route here (what the run under valgrind does)")
    args = parser.parse_args()
    if args.inner:
        print(orjson.dumps(asyncio.run(count(args.events, args.part))).decode(), flush=True)
    else:
        print(orjson.dumps(run_under_callgrind(args.events, args.part,
                                               args.out.resolve())).decode())


if __name__ == "__main__":
    main()
