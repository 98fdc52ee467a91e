"""Instructions a request on the "one event a request" path, counted by callgrind.

Wall-clock rates on a shared 2-core machine move by ±10 % from run to run; callgrind counts
instructions, which do not depend on the load, so a change to the delivery path can be
weighed to a fraction of a percent:

    .venv/bin/python -m bench.callgrind_one_per_request [--events 2000] [--concurrency 1]
        [--out FILE]

runs this script again under ``valgrind --tool=callgrind --instr-atstart=no`` (``--inner``),
then prints, as JSON, the instructions callgrind counted and their number per request. The
file callgrind wrote (``--out``, ``callgrind.one_per_request.out`` by default) is kept, for
``callgrind_annotate --inclusive=yes FILE | head -80``. It takes about a minute for 2,000
events. Run it twice per tree, alone or two at a time at most: the count still holds some
work done by the clock (the worker's upkeep every second, the loop watchdog, the lease
sizes, which follow the rate), so it moves by about ±0.1 % on a quiet machine and by up to
±0.6 % when four runs share two cores.

What it does, in this one process (``delivery.own_process`` off, so the delivery is here):

1. starts a ``bench.sink`` (an aiohttp server answering ``200 {}``) in a process of its own,
   which callgrind does not follow (no ``--trace-children``), so its work is not counted;
2. fills a SQLite spool with ``--events`` events of ``bench.events.event_mix`` for one
   ``webhook`` destination pointing at the sink, with a router that does not deliver;
3. starts a router that delivers, from that spool, and tunes the garbage collector as
   ``router serve`` does; then switches callgrind's instrumentation on
   (``callgrind_control -i on`` for this pid) before the delivery tasks first run;
4. waits until every job is recorded delivered (the router's own metric) and completed in
   the spool, and switches instrumentation off, before the router closes.

The destination sends one request at a time by default (``--concurrency 1``). With
several in flight, how many answers each turn of the event loop finds waiting depends on
how fast the sink answers beside this process, so on the machine's load, and the count
moves more (``--concurrency 8``, the webhook's default, also works). The router's own work
a request is the same either way.

So what is counted is the delivery alone: the lease loop, the senders, aiohttp's client,
the SQLite spool's lease and complete (its writer thread included), metrics, the egress
guard. It prints the instructions counted by callgrind, read back from its file, divided by
the requests. ``--inner`` without valgrind runs too (the ``callgrind_control`` calls are
then skipped), which checks the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson

from bench.callgrind import UNDER_VALGRIND, instrumentation, under_callgrind
from bench.delivery import SinkProcess, chunks_of, delivered, quiet_router_logs, route_chunk
from bench.events import event_mix
from router.config import parse_config
from router.delivery import worker as delivery_worker
from router.registry import create_registry
from router.routing import Router
from router.runtime import tune_garbage_collector

DESTINATION = "w0"
SLOWDOWN = 50
"""About how much slower Python runs under callgrind. A worker leases as many jobs as it
delivers in ``LEASE_AHEAD`` seconds at the rate it sees (up to ``MAX_LEASE``): at the rate
callgrind allows, its leases would be this much smaller than at full speed, and their
number would follow the machine's load. Scaled back, it leases ``MAX_LEASE`` at a time, as
it does at full speed on this path, and the count repeats."""
POLL = 0.5
"""Seconds between two looks at whether every job is delivered."""


def make_router(directory: str, url: str, *, deliver: bool, concurrency: int) -> Router:
    config = {"storage": f"sqlite:///{Path(directory) / 'router.db'}",
              "egress": {"allow_private_addresses": True},
              "server": {"shutdown_grace": "2s"},
              "delivery": {"own_process": False},
              "destinations": [{"name": DESTINATION, "plugin": "webhook",
                                "settings": {"url": url},
                                "delivery": {"concurrency": concurrency}}]}
    loaded = parse_config(orjson.dumps(config).decode(), file="bench.yaml", env={})
    return Router(loaded, registry=create_registry(), deliver=deliver)


async def deliver_all(events: int, concurrency: int) -> dict[str, float]:
    sink = SinkProcess(count_only=True)
    try:
        sink.wait_ready()
        with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as directory:
            quiet_router_logs(directory)
            url = f"{sink.url}/w/{DESTINATION}"
            filler = make_router(directory, url, deliver=False, concurrency=concurrency)
            await filler.start()
            try:
                for chunk in chunks_of(event_mix(events, seed=14), 500):
                    await route_chunk(filler, chunk, {}, {})
            finally:
                await filler.close()
            router = make_router(directory, url, deliver=True, concurrency=concurrency)
            if UNDER_VALGRIND:
                delivery_worker.LEASE_AHEAD *= SLOWDOWN
            await router.start()  # the delivery tasks are made, not yet run
            tune_garbage_collector()
            instrumentation(True)
            started = time.perf_counter()
            try:
                worker = router._delivery.workers[DESTINATION]
                # Delivered, and told to the spool (``complete``, a round at a time).
                while delivered(router, [DESTINATION]) < events or worker.delivered:
                    # Seldom: each look is a turn of the event loop, counted, and how many
                    # there are follows the machine's load.
                    await asyncio.sleep(POLL)
            finally:
                instrumentation(False)
                seconds = time.perf_counter() - started
                await router.close(grace=2)
            requests = int(sum(router.delivery_metrics.requests.values.values()))
    finally:
        sink.stop()
    return {"events": events, "concurrency": concurrency, "requests": requests,
            "seconds": round(seconds, 1)}


def run_under_callgrind(events: int, concurrency: int, out: Path) -> dict[str, float]:
    """Run this script again under callgrind and read back what it counted."""
    result, instructions = under_callgrind(
        "bench.callgrind_one_per_request",
        ["--events", str(events), "--concurrency", str(concurrency)], out)
    return {**result, "instructions": instructions,
            "instructions_per_request": round(instructions / result["requests"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1,
                        help="the destination's requests in flight (see the module's doc)")
    parser.add_argument("--out", type=Path, default=Path("callgrind.one_per_request.out"),
                        help="callgrind's output file (kept for callgrind_annotate)")
    parser.add_argument("--inner", action="store_true",
                        help="deliver here (what the run under valgrind does)")
    args = parser.parse_args()
    if args.inner:
        result = asyncio.run(deliver_all(args.events, args.concurrency))
        print(orjson.dumps(result).decode(), flush=True)
    else:
        print(orjson.dumps(run_under_callgrind(args.events, args.concurrency,
                                                   args.out.resolve())).decode())


if __name__ == "__main__":
    main()
