"""HTTP ingest over loopback with delivery running: ``python -m bench.run ingest``.

``router serve -c FILE`` runs as a process of its own (SQLite spool in a temporary
directory, one source with a write key, 3 ``segment`` destinations batching 100 events a
request to 3 ``bench.sink`` processes, the vendor's 50 requests/s limit lifted). A load
generator, in another process, keeps a few keep-alive connections busy with ``POST
/v1/batch`` of 100 events from ``event_mix`` (each messageId unique), each connection sending
its next batch when the last was answered, for a fixed time after a warm-up.

Figures: events/s acknowledged (a 200 means the events are committed to the spool), p50/p99
request latency, the server's CPU per event (every thread, from ``/proc``), events/s the
sinks received during the same window, then how long the backlog took to reach every
destination after the load stopped, and the server's exit code after SIGTERM (0 expected).
Everything listens on 127.0.0.1 only; every wait is bounded; every process started is
stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.delivery import (
    BATCH_WAIT,
    COUNTING_SINKS,
    LOOPBACK,
    NO_RATE_LIMIT,
    ROOT,
    free_port,
    http_json,
    in_child,
    log,
    machine_load,
    percentile,
    process_tree_cpu_seconds,
    start_sinks,
)
from bench.events import event_mix

WRITE_KEY = "bench-write-key"
BATCH = 100
CONNECTIONS = 4
OWN_PROCESS = os.environ.get("BENCH_OWN_PROCESS", "1") == "1"
"""Deliver from a process of its own (the default here); BENCH_OWN_PROCESS=0 for one."""
WARMUP = 2.0
WINDOW = 15.0
DRAIN_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def sinks_received(urls: list[str]) -> int:
    return sum(sum(http_json(f"{url}/_stats")["events"].values()) for url in urls)


async def load(url: str, sink_urls: list[str], connections: int, warmup: float,
               window: float, seed: int = 21) -> dict[str, Any]:
    """The load generator (run in a process of its own): ``connections`` keep-alive
    connections, each POSTing its next batch of ``BATCH`` events when the last was answered.
    Counts only what is answered inside the window after ``warmup``."""
    import aiohttp

    # Each round through the pool makes its messageIds unique by their last 8 hex digits,
    # so they stay as random as a client's UUIDs.
    marker = b'"messageId":"'
    pool = []
    for raw in event_mix(100 * BATCH, seed=seed):
        start = raw.index(marker) + len(marker)
        pool.append((raw[:start + 28], raw[start + 36:]))
    headers = {"Content-Type": "application/json",
               "Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    state = {"sent_batches": 0, "counting": False}
    window_stats = {"events": 0, "requests": 0, "errors": 0, "rejected": 0}
    totals = {"events": 0, "requests": 0}
    latencies: list[float] = []
    stop_at = time.perf_counter() + warmup + window

    def next_body() -> bytes:
        number = state["sent_batches"]
        state["sent_batches"] += 1
        start = (number % 100) * BATCH
        round_mark = b"%08x" % (number // 100)
        return (b'{"batch":[' + b",".join(head + round_mark + tail
                                          for head, tail in pool[start:start + BATCH]) + b"]}")

    async def connection(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            body = next_body()
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/batch", data=body, headers=headers) as answer:
                    text = await answer.read()
                    status = answer.status
            except aiohttp.ClientError:
                status, text = 0, b""
            elapsed = time.perf_counter() - started
            accepted = 0
            if status == 200:
                rejected = orjson.loads(text).get("rejected") or []
                accepted = BATCH - len(rejected)
                window_stats["rejected"] += len(rejected) if state["counting"] else 0
                totals["events"] += accepted
                totals["requests"] += 1
            if state["counting"]:
                if status == 200:
                    window_stats["events"] += accepted
                    window_stats["requests"] += 1
                    latencies.append(elapsed)
                else:
                    window_stats["errors"] += 1

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(connection(session)) for _ in range(connections)]
        await asyncio.sleep(warmup)
        received0 = await asyncio.to_thread(sinks_received, sink_urls)
        state["counting"] = True
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.sleep(window)
        state["counting"] = False
        seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        received1 = await asyncio.to_thread(sinks_received, sink_urls)
        await asyncio.wait(tasks, timeout=35)
        for task in tasks:
            task.cancel()
    return {"events_acknowledged": window_stats["events"], "requests": window_stats["requests"],
            "errors": window_stats["errors"], "rejected_events": window_stats["rejected"],
            "seconds": round(seconds, 2),
            "events_per_second_acknowledged": round(window_stats["events"] / seconds),
            "request_latency_ms": {"p50": round(percentile(latencies, 0.5) * 1000, 1),
                                   "p99": round(percentile(latencies, 0.99) * 1000, 1),
                                   "max": round(max(latencies, default=float("nan")) * 1000, 1)},
            "delivered_events_per_second_per_destination_in_window": round(
                (received1 - received0) / len(sink_urls) / seconds),
            "load_generator_cpu_cores": round(cpu / seconds, 2),
            "total_events_acknowledged": totals["events"],
            "total_requests": totals["requests"]}


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"router serve exited with {process.returncode}")
        try:
            if http_json(f"{url}/health", timeout=2).get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("router serve did not become healthy")


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {"load_at_start": machine_load()}
    directory = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    sinks = start_sinks(3)
    figures["sinks"] = "counting" if COUNTING_SINKS else "parsing"
    server: subprocess.Popen[bytes] | None = None
    output = open(directory / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        sink_urls = [sink.url for sink in sinks]
        config = {
            "server": {"host": LOOPBACK, "port": port, "shutdown_grace": "5s"},
            "storage": f"sqlite:///{directory / 'router.db'}",
            "sources": [{"name": "bench", "write_keys": [WRITE_KEY]}],
            "egress": {"allow_private_addresses": True},
            "delivery": {"own_process": OWN_PROCESS},
            "destinations": [
                {"name": f"d{i}", "plugin": "segment",
                 "settings": {"write_key": "bench-key", "base_url": f"{sink_url}/ingest/d{i}"},
                 "delivery": {"rate_limit": NO_RATE_LIMIT, "batch_wait": BATCH_WAIT}}
                for i, sink_url in enumerate(sink_urls)],
        }
        config_path = directory / "router.yaml"
        config_path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))  # JSON is YAML
        server = subprocess.Popen([sys.executable, "-m", "router", "serve", "-c", str(config_path)],
                                  cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT)
        wait_healthy(url, server)
        log(f"ingest: router serve (pid {server.pid}) on port {port}; load for "
            f"{WARMUP:g}+{WINDOW:g} s over {CONNECTIONS} connections")

        cpu0, started = process_tree_cpu_seconds(server.pid), time.perf_counter()
        result = in_child("bench.ingest", "load", timeout=WARMUP + WINDOW + 60, url=url,
                          sink_urls=sink_urls, connections=CONNECTIONS, warmup=WARMUP,
                          window=WINDOW)
        load_seconds = time.perf_counter() - started
        cpu = process_tree_cpu_seconds(server.pid) - cpu0
        acknowledged = result["total_events_acknowledged"]
        figures["load"] = result
        figures["server_cpu_us_per_event_acknowledged"] = round(cpu / acknowledged * 1e6, 1) \
            if acknowledged else None
        figures["server_cpu_cores_under_load"] = round(cpu / load_seconds, 2)

        expected = acknowledged * len(sinks)
        received = sinks_received(sink_urls)
        backlog_at_end = expected - received
        drain_started = time.perf_counter()
        while received < expected and time.perf_counter() - drain_started < DRAIN_TIMEOUT:
            time.sleep(0.1)
            received = sinks_received(sink_urls)
        drained = time.perf_counter() - drain_started
        cpu_through_drain = process_tree_cpu_seconds(server.pid) - cpu0
        figures["server_cpu_us_per_event_ingested_and_delivered"] = round(
            cpu_through_drain / acknowledged * 1e6, 1) if acknowledged else None
        figures["delivery"] = {
            "events_per_destination": acknowledged,
            "jobs_queued_when_load_stopped": backlog_at_end,
            "all_delivered": received >= expected,
            "seconds_to_drain_after_load": round(drained, 2),
            "events_per_second_end_to_end": round(acknowledged / (load_seconds + drained)),
        }

        log("ingest: SIGTERM")
        stopping = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        figures["shutdown"] = {"exit_code": code,
                               "seconds": round(time.perf_counter() - stopping, 2)}
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        output.close()
        for sink in sinks:
            sink.stop()
        shutil.rmtree(directory, ignore_errors=True)
    figures["load_at_end"] = machine_load()
    figures["targets"] = {
        "events_per_second_acknowledged_at_least_15000":
            figures["load"]["events_per_second_acknowledged"] >= 15_000,
        "exit_code_0_after_sigterm": figures["shutdown"]["exit_code"] == 0,
    }
    return figures
