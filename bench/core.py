"""The in-process path, network left out: bytes in, every destination's request bodies out.

Stages: parse the bytes, validate and normalize, dedup, integrations map and filters,
translate for each destination, serialize each request body. Measured interleaved with a
reference on the same bytes (orjson.loads of the event plus orjson.dumps of each
destination's prebuilt body: the parse+serialize ceiling), because the machine is shared and
noisy: the ratio to the reference is the figure that travels. The router serializes a body
that several destinations share once, so for five webhooks the ratio is also given against a
reference that does the same.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Sequence
from datetime import datetime, UTC
from typing import Any

import orjson

from bench.delivery import peak_rss_mb
from bench.events import event_mix
from router.config import parse_config
from router.events import parse_event
from router.integrations import IntegrationsMap
from router.routing import Router, Status
from router.routing import _SERIALIZED as SERIALIZED, _serialize as serialize
from router.runtime import tune_garbage_collector
from router.storage.base import Acceptance
from router.storage.memory import MemoryStorage

# Settings for each destination used in the benchmark (fake keys; nothing is sent).
BENCH_DESTINATIONS: dict[str, dict] = {
    "webhook": {"url": "https://hooks.example.com/in"},
    "amplitude": {"api_key": "bench-amplitude-key"},
    "mixpanel": {"project_token": "bench-mixpanel-token"},
    "ga4": {"measurement_id": "G-BENCH123", "api_secret": "bench-ga4-secret"},
    "posthog": {"api_key": "phc_bench"},
    "meta_capi": {"pixel_id": "1234567890", "access_token": "bench-meta-token"},
    "customerio": {"site_id": "bench-site", "api_key": "bench-cio-key"},
    "braze": {"api_key": "bench-braze-key", "instance": "US-01"},
    "segment": {"write_key": "bench-segment-key"},
    "acme": {"api_key": "bench-acme-key"},
}
FIVE = ("webhook", "amplitude", "mixpanel", "ga4", "posthog")


def make_router(plugins: Sequence[str]) -> Router:
    """A router with one destination per plugin (repeats get numbered names)."""
    lines = ["storage: memory://", "destinations:"]
    for index, plugin in enumerate(plugins):
        settings = orjson.dumps(BENCH_DESTINATIONS[plugin]).decode()
        lines += [f"  - name: {plugin}-{index}", f"    plugin: {plugin}",
                  f"    settings: {settings}"]
    return Router(parse_config("\n".join(lines), env={}), deliver=False,
                  storage=MemoryStorage())


def full_path(router: Router, storage: MemoryStorage, window: float) -> Callable[[bytes], int]:
    """The whole path for one event; returns the bytes of request bodies produced."""
    destinations = router.destinations
    received = datetime.now(UTC)
    now = time.time()

    def run(raw: bytes) -> int:
        event = parse_event(orjson.loads(raw), received_at=received, size=len(raw))
        # dedup, as accept() does it for memory:// (no jobs: bodies are measured below)
        key = (router_source, event.messageId)
        if storage.seen.get(key, 0) > now:
            return 0
        storage.seen[key] = now + window
        integrations = IntegrationsMap(event.integrations)
        produced = 0
        for destination in destinations:
            result = router._decide(destination, event, integrations)
            produced += sum(map(len, result.bodies))  # serialized as they are spooled
        return produced

    router_source = "bench"
    return run


def direct_translators(router: Router) -> Callable[[bytes], int]:
    """The same work calling each adapter directly: what the plugin layer is compared to."""
    adapters = [destination.adapter for destination in router.destinations]
    received = datetime.now(UTC)

    def run(raw: bytes) -> int:
        event = parse_event(orjson.loads(raw), received_at=received, size=len(raw))
        produced = 0
        serialized: dict[int, Any] = event.shared(SERIALIZED, dict)  # once an event, as plan
        for adapter in adapters:
            try:
                payloads = adapter.translate(event, {})
            except Exception:  # noqa: BLE001 - skips and rejections count as no output
                continue
            produced += sum(len(serialize(payload.body, serialized)) for payload in payloads)
        return produced

    return run


def prebuilt_bodies(router: Router, sample: Sequence[bytes]) -> dict[bytes, list[Any]]:
    """Each event's finished bodies for every destination, built beforehand."""
    received = datetime.now(UTC)
    return {raw: [payload.body for result in router.plan(
                      parse_event(orjson.loads(raw), received_at=received)).results
                  for payload in result.payloads]
            for raw in sample}


def reference(router: Router, sample: Sequence[bytes], *, shared_once: bool = False
              ) -> Callable[[bytes], int]:
    """orjson.loads of the event plus orjson.dumps of each destination's prebuilt body (with
    ``shared_once``, of each distinct body: the router serializes a body that several
    destinations share once)."""
    prebuilt = prebuilt_bodies(router, sample)
    if shared_once:
        prebuilt = {raw: list({id(body): body for body in bodies}.values())
                    for raw, bodies in prebuilt.items()}

    def run(raw: bytes) -> int:
        orjson.loads(raw)
        return sum(len(orjson.dumps(body)) for body in prebuilt[raw])

    return run


def python_floor(router: Router, sample: Sequence[bytes]) -> Callable[[bytes], int]:
    """What no Python translator can go below: parsing and validating the event, allocating
    each destination's finished body (a dict and list display of constants, compiled from
    the body itself: no lookups, no decisions) and serializing it."""
    received = datetime.now(UTC)
    builders: dict[bytes, Callable[[], list[Any]]] = {
        raw: eval(f"lambda: {bodies!r}")  # noqa: S307 - our own benchmark's bodies
        for raw, bodies in prebuilt_bodies(router, sample).items()}

    def run(raw: bytes) -> int:
        parse_event(orjson.loads(raw), received_at=received, size=len(raw))
        return sum(len(orjson.dumps(body)) for body in builders[raw]())

    return run


def measure(function: Callable[[bytes], int], events: Sequence[bytes]) -> float:
    """Seconds per event for one pass over ``events``."""
    gc.collect()
    started = time.perf_counter()
    for raw in events:
        function(raw)
    return (time.perf_counter() - started) / len(events)


def interleaved(functions: dict[str, Callable[[bytes], int]], events: Sequence[bytes],
                rounds: int = 5) -> dict[str, float]:
    """Best seconds-per-event of each function over ``rounds`` interleaved passes."""
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            best[name] = min(best[name], measure(function, events))
    return best


def stage_costs(router: Router, events: Sequence[bytes]) -> dict[str, float]:
    """Microseconds per event spent in each stage of the path."""
    received = datetime.now(UTC)
    parsed = [orjson.loads(raw) for raw in events]
    normalized = [parse_event(item, received_at=received) for item in parsed]
    maps = [IntegrationsMap(event.integrations) for event in normalized]
    results = [[router._decide(d, e, m) for d in router.destinations]
               for e, m in zip(normalized, maps)]
    storage = MemoryStorage()
    timings: dict[str, Callable[[], object]] = {
        "parse bytes": lambda: [orjson.loads(raw) for raw in events],
        "validate+normalize": lambda: [parse_event(item, received_at=received) for item in parsed],
        "dedup": lambda: asyncio.run(storage.accept(
            [Acceptance("bench", e.messageId + str(time.perf_counter_ns()), ())
             for e in normalized],
            window=43200, now=time.time())),
        "integrations+filters": lambda: [[m.decide(d.name, default_on=d.default_on)
                                          for d in router.destinations] for m in maps],
        "translate": lambda: [[d.translate(e, {}) if r.status is Status.SEND else None
                               for d, r in zip(router.destinations, rs)]
                              for e, rs in zip(normalized, results)],
        "serialize bodies": lambda: [[orjson.dumps(body) for body in {
            id(p.body): p.body for r in rs for p in r.payloads}.values()] for rs in results],
    }
    costs = {}
    for name, run in timings.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        costs[name] = best / len(events) * 1e6
    return costs


def run(count: int = 20_000) -> dict[str, object]:
    # As `router serve` runs, and as docs/performance.md advises embedders.
    tune_garbage_collector()
    events = event_mix(count)
    figures: dict[str, object] = {}
    five = make_router(FIVE)
    storage = MemoryStorage()
    # Fresh messageIds each pass, so dedup never short-cuts the path.
    passes = [event_mix(count, seed=seed) for seed in range(100, 105)]
    path, direct = full_path(five, storage, 43200), direct_translators(five)
    best: dict[str, float] = {}
    for batch in passes:
        # The reference's and the floor's bodies are built for one pass at a time: the
        # floor's, compiled, take about 27 KB an event (2.7 GB for all five passes at once).
        functions = {"full path (5 destinations)": path, "direct translators (5)": direct,
                     "reference (orjson ceiling)": reference(five, batch),
                     "python floor": python_floor(five, batch)}
        best_round = interleaved(functions, batch, rounds=1)
        best = {name: min(best.get(name, float("inf")), best_round[name]) for name in functions}
        del functions, best_round
    full, direct, ceiling = (best["full path (5 destinations)"], best["direct translators (5)"],
                             best["reference (orjson ceiling)"])
    figures["events_per_second"] = round(1 / full)
    figures["reference_events_per_second"] = round(1 / ceiling)
    figures["percent_of_reference"] = round(100 * ceiling / full, 1)
    figures["plugin_layer_overhead_percent"] = round(100 * (full / direct - 1), 1)
    floor = best["python floor"]
    figures["python_floor"] = {
        "microseconds_per_event": round(floor * 1e6, 2),
        "percent_of_reference": round(100 * ceiling / floor, 1),
        "microseconds_per_event_at_15_percent_of_reference": round(ceiling / 0.15 * 1e6, 2)}

    # The same path with five webhook destinations (no template): the core issue's setup,
    # before the vendor destinations existed.
    webhooks = make_router(["webhook"] * 5)
    webhooks_path = full_path(webhooks, MemoryStorage(), 43200)
    best_webhooks: dict[str, float] = {}
    for batch in passes[:3]:
        paired = {"full": webhooks_path, "reference": reference(webhooks, batch),
                  "reference, shared bodies once": reference(webhooks, batch, shared_once=True)}
        measured = interleaved(paired, batch, rounds=1)
        best_webhooks = {name: min(best_webhooks.get(name, float("inf")), measured[name])
                         for name in paired}
        del paired, measured
    figures["five_webhooks_events_per_second"] = round(1 / best_webhooks["full"])
    figures["five_webhooks_percent_of_reference"] = round(
        100 * best_webhooks["reference"] / best_webhooks["full"], 1)
    figures["five_webhooks_percent_of_reference_serializing_shared_bodies_once"] = round(
        100 * best_webhooks["reference, shared bodies once"] / best_webhooks["full"], 1)
    # 5,000 events: each stage keeps its results for all of them (800 MB for 20,000).
    stages = stage_costs(five, events[:5000])
    figures["stage_microseconds"] = {k: round(v, 2) for k, v in stages.items()}

    scaling = {}
    for n in (1, 2, 5, 10):
        router = make_router([FIVE[i % len(FIVE)] for i in range(n)])
        per_event = min(measure(full_path(router, MemoryStorage(), 43200),
                                event_mix(5000, seed=200 + r))
                        for r in range(3))
        scaling[n] = round(per_event * 1e6, 2)
    figures["microseconds_by_destination_count"] = scaling

    window_costs = {}
    for remembered in (0, 1_000_000):
        storage = MemoryStorage()
        now = time.time()
        storage.seen.update({("bench", f"old-{i}"): now + 43200 for i in range(remembered)})
        per_event = min(measure(full_path(five, storage, 43200), event_mix(5000, seed=300 + r))
                        for r in range(3))
        window_costs[remembered] = round(per_event * 1e6, 2)
    figures["microseconds_by_dedup_window_size"] = window_costs

    translation = {}
    received = datetime.now(UTC)
    for plugin in BENCH_DESTINATIONS:
        try:
            router = make_router([plugin])
        except Exception:  # noqa: BLE001 - a plugin not installed is left out
            continue
        (destination,) = router.destinations
        integrations = IntegrationsMap(None)
        best = float("inf")
        for _ in range(3):
            # freshly parsed events: nothing cached on them by an earlier round
            parsed = [parse_event(orjson.loads(raw), received_at=received)
                      for raw in events[:5000]]
            started = time.perf_counter()
            for event in parsed:
                router._decide(destination, event, integrations)
            best = min(best, time.perf_counter() - started)
        translation[plugin] = round(best / len(parsed) * 1e6, 2)
    figures["translate_and_serialize_microseconds_by_plugin"] = translation
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return figures
