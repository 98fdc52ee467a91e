"""The benchmarks keep working: each stage runs here on a few hundred events, so a change
that breaks ``make bench`` fails ``make test``. Speed is measured in bench/ and recorded in
docs/performance.md, never asserted here; what is checked is that every event got through."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import orjson
import pytest

from bench import core, ingest, replay
from bench.delivery import ROOT, in_child, median_round, start_sinks


@pytest.fixture(scope="module")
def sink_urls():
    sinks = start_sinks(3)
    try:
        yield [sink.url for sink in sinks]
    finally:
        for sink in sinks:
            sink.stop()


def test_the_core_benchmark_runs():
    figures = core.run(count=200)
    assert figures["events_per_second"] > 0 and figures["percent_of_reference"] > 0


def test_the_replay_benchmark_replays_every_letter_and_leaves_nothing_behind(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its Redis works
    figures = replay.run(count=300)
    assert figures["replay_python_peak_bytes"] > 0 and figures["index_build_seconds"] >= 0
    assert list(tmp_path.iterdir()) == []  # its Redis's directory went with it


def test_the_batching_figures_are_those_of_the_round_with_the_median_ratio():
    rounds = [{"cpu_ratio_to_inprocess_path": ratio, "round": n}
              for n, ratio in enumerate([3.1, 2.2, 2.6])]
    assert median_round(rounds)["round"] == 2
    assert median_round(rounds[:2])["round"] == 1  # of two, the lower


def test_the_delivery_phases_deliver_everything(sink_urls):
    batching = in_child("bench.delivery", "phase_batching", urls=sink_urls, count=600)
    assert batching["all_delivered"] and batching["jobs_left_in_spool"] == 0
    spool = in_child("bench.delivery", "phase_spool", count=300, destinations=3)
    assert spool["jobs_leased_and_completed"] == 900
    bare = in_child("bench.delivery", "phase_bare_spool", count=300, destinations=3)
    assert bare["body_bytes_per_event"] > 100 and bare["total_us_per_event"] > 0
    window = in_child("bench.delivery", "phase_dedup_window", remembered=1000, count=200)
    assert window["accept_cpu_us_per_event_1_a_call"] > 0
    assert window["accept_cpu_us_per_event_100_a_call"] > 0
    breaker = in_child("bench.delivery", "phase_ordering_breaker", stepped_out=20, behind=30)
    # The user's first event that has not stepped out leads; the rest wait behind it.
    assert (breaker["jobs_leased_with_breaker"], breaker["jobs_leased_without_breaker"]) == (1, 0)
    one = in_child("bench.delivery", "phase_one_per_request", urls=sink_urls, count=300,
                   warmup=0.1, window=0.5)
    assert one["requests"] > 0 and set(one["statuses"]) <= {"w0 200", "w1 200", "w2 200"}
    throttled = in_child("bench.delivery", "phase_throttled", limit=20, seconds=2)
    assert throttled["all_delivered"] and throttled["refused_429"] > 0


def test_the_ingest_benchmark_delivers_everything_and_stops_cleanly(monkeypatch):
    monkeypatch.setattr(ingest, "WARMUP", 0.2)
    monkeypatch.setattr(ingest, "WINDOW", 1.0)
    figures = ingest.run()
    assert figures["load"]["total_events_acknowledged"] > 0
    assert figures["delivery"]["all_delivered"]
    assert figures["shutdown"]["exit_code"] == 0


@pytest.mark.parametrize("part", ["route", "plan", "accept"])
def test_the_callgrind_route_driver_runs_each_part_outside_valgrind(part):
    # Outside valgrind the instrumentation calls are skipped: what runs is what is counted.
    # In a child, as the delivery phases: it sends the router's log to a file of its own.
    result = in_child("bench.callgrind_route", "count", events=600, part=part)
    assert result == {**result, "events": 600, "part": part, "jobs": 3 * 600}


@pytest.mark.parametrize("plugin", ["amplitude", "meta_capi"])
def test_the_callgrind_translate_driver_translates_every_event_outside_valgrind(plugin):
    # Its --inner run, as valgrind starts it: in a process of its own, since it tunes the
    # garbage collector as the router does.
    run = subprocess.run([sys.executable, "-m", "bench.callgrind_translate", "--plugin", plugin,
                          "--events", "300", "--inner"], cwd=ROOT, stdout=subprocess.PIPE,
                         check=True, timeout=120)
    result = orjson.loads(run.stdout.splitlines()[-1])
    assert sum(result["statuses"].values()) == 300 and result["statuses"].get("send", 0) > 200


@pytest.mark.parametrize("plugin, events, destinations", [("webhook", 100, 1),
                                                         ("segment", 300, 3)])
def test_the_callgrind_delivery_driver_delivers_every_job_outside_valgrind(plugin, events,
                                                                          destinations):
    run = subprocess.run([sys.executable, "-m", "bench.callgrind_one_per_request", "--plugin",
                          plugin, "--events", str(events), "--inner"], cwd=ROOT,
                         stdout=subprocess.PIPE, check=True, timeout=120)
    result = orjson.loads(run.stdout.splitlines()[-1])
    # Every job delivered (the driver waits for that): one a request, or batched.
    assert result["jobs"] == events * destinations
    if plugin == "webhook":
        assert result["requests"] == result["jobs"]
    else:
        assert result["jobs"] / 100 <= result["requests"] <= result["jobs"] / 10
