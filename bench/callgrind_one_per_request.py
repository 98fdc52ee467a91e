"""Instructions a request on the "one event a request" path, or an event on the batching
path (``--plugin segment``), counted by callgrind.

Wall-clock rates on a shared 2-core machine move by ±10 % from run to run; callgrind counts
instructions, which do not depend on the load, so a change to the delivery path can be
weighed to a fraction of a percent:

    .venv/bin/python -m bench.callgrind_one_per_request [--plugin webhook|segment]
        [--events N] [--destinations N] [--concurrency 1] [--out FILE]

runs this script again under ``valgrind --tool=callgrind --instr-atstart=no`` (``--inner``),
then prints, as JSON, the instructions callgrind counted and their number per request and
per event. The file callgrind wrote (``--out``; ``callgrind.one_per_request.out``, or
``callgrind.batching.out`` for ``segment``, by default) is kept, for
``callgrind_annotate --inclusive=yes FILE | head -80``. Run it twice per tree, alone or two
at a time at most: the count still holds some work done by the clock (the worker's upkeep
every second, the loop watchdog, the lease sizes, which follow the rate), so it moves by
about ±0.1 % on a quiet machine and by up to ±0.6 % when four runs share two cores.

Two paths (``--plugin``):

``webhook`` (the default)
    One event a request: 2,000 events (``--events``) to one ``webhook`` destination
    (``--destinations``), one request in flight (``--concurrency``); its figure is
    ``instructions_per_request``. About a minute.
``segment``
    The batching path of ``bench.delivery``'s batching phases: 5,000 events to 3 ``segment``
    destinations, as there, each with its own lease loop and senders (so the count holds
    their hand-offs beside one another, as a deployment's does), 100 events a request, the
    vendor's rate limit lifted and ``batch_wait`` 50 ms (``bench.delivery.segment``), the
    plugin's own concurrency (4 requests in flight each); its figure is
    ``instructions_per_event`` (an event is a job for each destination). About a minute.
    ``--destinations 1`` counts a single destination (the instructions a job, then).

What it does, in this one process (``delivery.own_process`` off, so the delivery is here):

1. starts a ``bench.sink`` (an aiohttp server answering ``200 {}``) in a process of its own,
   which callgrind does not follow (no ``--trace-children``), so its work is not counted;
   every destination sends to it, each on a path of its own;
2. fills a SQLite spool with ``--events`` events of ``bench.events.event_mix`` for the
   destinations, pointing at the sink, with a router that does not deliver;
3. starts a router that delivers, from that spool, and tunes the garbage collector as
   ``router serve`` does; then switches callgrind's instrumentation on
   (``callgrind_control -i on`` for this pid) before the delivery tasks first run;
4. waits until every job is recorded delivered (the router's own metric) and completed in
   the spool, and switches instrumentation off, before the router closes.

A ``webhook`` destination sends one request at a time by default (``--concurrency 1``). With
several in flight, how many answers each turn of the event loop finds waiting depends on
how fast the sink answers beside this process, so on the machine's load, and the count
moves more (``--concurrency 8``, the webhook's default, also works). The router's own work
a request is the same either way.

So what is counted is the delivery alone: the lease loop, the senders, aiohttp's client,
the SQLite spool's lease and complete (its writer thread included), metrics, the egress
guard; on the batching path also the cutting into batches and ``build_request``. It prints
the instructions counted by callgrind, read back from its file, divided by the requests and
by the events. ``--inner`` without valgrind runs too (the ``callgrind_control`` calls are
then skipped), which checks the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.callgrind import UNDER_VALGRIND, instrumentation, under_callgrind
from bench.delivery import (SinkProcess, chunks_of, delivered, quiet_router_logs, route_chunk,
                            segment)
from bench.events import event_mix
from router.config import parse_config
from router.delivery import worker as delivery_worker
from router.registry import create_registry
from router.routing import Router
from router.runtime import tune_garbage_collector

PLUGINS = {"webhook": {"events": 2000, "destinations": 1},
           "segment": {"events": 5000, "destinations": 3}}
"""Each path's defaults (see the module's doc)."""
SLOWDOWN = 50
"""About how much slower Python runs under callgrind. A worker leases as many jobs as it
delivers in ``LEASE_AHEAD`` seconds at the rate it sees (up to ``MAX_LEASE``): at the rate
callgrind allows, its leases would be this much smaller than at full speed, and their
number would follow the machine's load. Scaled back, it leases ``MAX_LEASE`` at a time, as
it does at full speed on this path, and the count repeats."""
POLL = 0.5
"""Seconds between two looks at whether every job is delivered."""


def destinations_of(plugin: str, count: int, sink_url: str, concurrency: int
                    ) -> list[dict[str, Any]]:
    """``count`` destinations of ``plugin``, each sending to its own path of the sink."""
    if plugin == "segment":  # as bench.delivery's batching phases have them
        return [segment(f"s{index}", f"{sink_url}/s/s{index}") for index in range(count)]
    return [{"name": f"w{index}", "plugin": "webhook",
             "settings": {"url": f"{sink_url}/w/w{index}"},
             "delivery": {"concurrency": concurrency}} for index in range(count)]


def make_router(directory: str, destinations: list[dict[str, Any]], *, deliver: bool
                ) -> Router:
    config = {"storage": f"sqlite:///{Path(directory) / 'router.db'}",
              "egress": {"allow_private_addresses": True},
              "server": {"shutdown_grace": "2s"},
              "delivery": {"own_process": False},
              "destinations": destinations}
    loaded = parse_config(orjson.dumps(config).decode(), file="bench.yaml", env={})
    return Router(loaded, registry=create_registry(), deliver=deliver)


async def deliver_all(plugin: str, events: int, destinations: int, concurrency: int
                      ) -> dict[str, Any]:
    sink = SinkProcess(count_only=True)
    try:
        sink.wait_ready()
        with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as directory:
            quiet_router_logs(directory)
            configs = destinations_of(plugin, destinations, sink.url, concurrency)
            names = [config["name"] for config in configs]
            filler = make_router(directory, configs, deliver=False)
            await filler.start()
            queued: dict[str, int] = {}
            try:
                for chunk in chunks_of(event_mix(events, seed=14), 500):
                    await route_chunk(filler, chunk, {}, queued)
            finally:
                await filler.close()
            jobs = sum(queued.values())
            router = make_router(directory, configs, deliver=True)
            if UNDER_VALGRIND:
                delivery_worker.LEASE_AHEAD *= SLOWDOWN
            await router.start()  # the delivery tasks are made, not yet run
            tune_garbage_collector()
            instrumentation(True)
            started = time.perf_counter()
            try:
                workers = [router._delivery.workers[name] for name in names]
                # Delivered, and told to the spool (``complete``, a round at a time).
                while delivered(router, names) < jobs or any(w.delivered for w in workers):
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
    return {"plugin": plugin, "events": events, "destinations": destinations, "jobs": jobs,
            "concurrency": concurrency if plugin == "webhook" else None,
            "requests": requests, "seconds": round(seconds, 1)}


def run_under_callgrind(plugin: str, events: int, destinations: int, concurrency: int,
                        out: Path) -> dict[str, Any]:
    """Run this script again under callgrind and read back what it counted."""
    result, instructions = under_callgrind(
        "bench.callgrind_one_per_request",
        ["--plugin", plugin, "--events", str(events), "--destinations", str(destinations),
         "--concurrency", str(concurrency)], out)
    return {**result, "instructions": instructions,
            "instructions_per_request": round(instructions / result["requests"]),
            "instructions_per_event": round(instructions / result["events"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugin", choices=sorted(PLUGINS), default="webhook",
                        help="webhook: one event a request; segment: batches of 100")
    parser.add_argument("--events", type=int, help="2,000 (webhook) or 5,000 (segment)")
    parser.add_argument("--destinations", type=int, help="1 (webhook) or 3 (segment)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="a webhook's requests in flight (see the module's doc); a "
                             "segment destination keeps the plugin's own")
    parser.add_argument("--out", type=Path,
                        help="callgrind's output file (kept for callgrind_annotate); "
                             "callgrind.one_per_request.out or callgrind.batching.out")
    parser.add_argument("--inner", action="store_true",
                        help="deliver here (what the run under valgrind does)")
    args = parser.parse_args()
    defaults = PLUGINS[args.plugin]
    events = args.events or defaults["events"]
    destinations = args.destinations or defaults["destinations"]
    if args.inner:
        result = asyncio.run(deliver_all(args.plugin, events, destinations, args.concurrency))
        print(orjson.dumps(result).decode(), flush=True)
    else:
        out = args.out or Path("callgrind.one_per_request.out" if args.plugin == "webhook"
                               else "callgrind.batching.out")
        print(orjson.dumps(run_under_callgrind(args.plugin, events, destinations,
                                               args.concurrency, out.resolve())).decode())


if __name__ == "__main__":
    main()
