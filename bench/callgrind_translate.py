"""Instructions a built-in spends translating and serializing an event, counted by callgrind.

``bench.core``'s "translate_and_serialize_microseconds_by_plugin" is a wall-clock figure,
which moves by ±10 % on a shared machine; this counts the same work in instructions:

    .venv/bin/python -m bench.callgrind_translate --plugin amplitude [--events 2000]
        [--out FILE]

runs this script again under callgrind (``--inner``), with ``bench.core``'s destination
settings and ``bench.events.event_mix``: the events are parsed first, then one warm-up pass
(caches such as GA4's checked names fill), then the events parsed afresh and, with
instrumentation on, each routed through ``Router._decide`` for the plugin's one destination
(integrations map, ``translate``, serialization), as the benchmark's per-plugin figure does.
It prints, as JSON, the instructions counted and their number per event; the file is kept
(``callgrind.translate.<plugin>.out`` by default) for ``callgrind_annotate``. Switching
instrumentation on and off and reading the total are ``bench.callgrind``'s.
``--inner`` without valgrind runs too, which checks the driver.
"""

from __future__ import annotations

import argparse
import gc
from collections import Counter
from datetime import datetime, UTC
from pathlib import Path

import orjson

from bench.callgrind import instrumentation, under_callgrind
from bench.core import BENCH_DESTINATIONS, make_router
from bench.events import event_mix
from router.events import parse_event
from router.integrations import IntegrationsMap
from router.runtime import tune_garbage_collector


def translate_all(plugin: str, events: int) -> dict[str, object]:
    router = make_router([plugin])
    (destination,) = router.destinations
    integrations = IntegrationsMap(None)
    received = datetime(2026, 11, 20, 14, 3, 13, tzinfo=UTC)
    raw = event_mix(events, seed=14)
    for event in [parse_event(orjson.loads(r), received_at=received) for r in raw]:
        router._decide(destination, event, integrations)  # warm-up
    parsed = [parse_event(orjson.loads(r), received_at=received) for r in raw]
    tune_garbage_collector()
    gc.collect()
    instrumentation(True)
    results = [router._decide(destination, event, integrations) for event in parsed]
    instrumentation(False)
    return {"plugin": plugin, "events": events,
            "statuses": dict(Counter(str(result.status) for result in results))}


def run_under_callgrind(plugin: str, events: int, out: Path) -> dict[str, object]:
    result, instructions = under_callgrind(
        "bench.callgrind_translate", ["--plugin", plugin, "--events", str(events)], out)
    return {**result, "instructions": instructions,
            "instructions_per_event": round(instructions / events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugin", required=True, choices=sorted(BENCH_DESTINATIONS))
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="callgrind's output file "
                        "(default callgrind.translate.PLUGIN.out)")
    parser.add_argument("--inner", action="store_true",
                        help="translate here (what the run under valgrind does)")
    args = parser.parse_args()
    if args.inner:
        print(orjson.dumps(translate_all(args.plugin, args.events)).decode(), flush=True)
    else:
        out = args.out or Path(f"callgrind.translate.{args.plugin}.out")
        print(orjson.dumps(run_under_callgrind(args.plugin, args.events,
                                               out.resolve())).decode())


if __name__ == "__main__":
    main()
