"""Delivery in a process of its own (``delivery.own_process``): the same guarantees as in
one process, with the child's counters served by the parent, a child that dies replaced,
and a child that never outlives its router (see also test_durability's kill -9 test)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import orjson
import pytest

from router.config import parse_config
from router.delivery.process import MetricsSender
from router.errors import ConfigError
from router.routing import Router
from router.storage.memory import MemoryStorage
from router.storage.sqlite import lock_delivery
from router.testing.fake_server import Answer, FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook

ROOT = Path(__file__).resolve().parents[1]
HELD = Answer(200, delay=60)
"""An answer held back for a minute: a delivery in flight for far longer than any test."""
LONG_GRACE = 60.0


def own_process_router(tmp_path: Path, *destinations: dict) -> Router:
    return router_for(tmp_path, list(destinations), delivery={"own_process": True})


def delivery_pid(router: Router) -> int:
    return router._delivery._process.pid  # the one private look: which process to kill


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs: exited (a zombie nobody has reaped yet) counts as not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def stops_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def freeze_outside_a_write(pid: int, spool: Path) -> None:
    """Stop ``pid`` (SIGSTOP) at a moment it holds no write lock on ``spool``. A process frozen
    inside a write transaction keeps every other writer out, and the router's intake then
    fails after its 10 s busy timeout, which is right for a spool both share but not what a
    test of the wake-up socket means to freeze. So stop it, check the lock is free, and if
    it is not, let it run a moment and try again."""
    for _ in range(1000):
        os.kill(pid, signal.SIGSTOP)
        probe = sqlite3.connect(spool, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.01)
        finally:
            probe.close()
    raise AssertionError(f"process {pid} held the spool's write lock at every look")


async def test_a_delivery_process_delivers_and_its_counters_reach_the_router(tmp_path):
    async with FakeDestinationServer() as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        async with router:
            assert delivery_pid(router) != os.getpid()
            await router.route_many([track(n) for n in range(30)])
            await server.wait_for(30, timeout=20)
            await wait_until(lambda: router.delivery_metrics.delivered.get("hook") == 30)
            assert router.delivery_metrics.requests.get("hook", "200") == 30
            assert await router.drain(timeout=10)
        assert sorted(r.json["messageId"] for r in server.requests) == \
            sorted(f"m-{n}" for n in range(30))


@pytest.mark.parametrize("status", [200, 400])
async def test_once_drained_the_counters_count_what_the_delivery_process_settled(tmp_path,
                                                                                 status):
    # drain() returned once the storage showed the jobs settled, and the child's counts
    # came with its next snapshot, up to 50 ms later: delivery_metrics counted short.
    # Drained with no timeout, over and over, drain() looks at the storage as often as it
    # can, so it meets the moment the jobs are settled and not yet counted.
    async with FakeDestinationServer(default=Answer(status)) as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        async with router:
            for round_ in range(3):
                await router.route_many([track(n) for n in range(20 * round_, 20 * round_ + 20)])
                deadline = time.monotonic() + 20
                while not await router.drain(timeout=0):
                    assert time.monotonic() < deadline, "timed out"
                counted = (router.delivery_metrics.delivered if status == 200
                           else router.delivery_metrics.dead_lettered)
                assert counted.get("hook") == 20 * round_ + 20


async def test_a_delivery_process_that_dies_is_replaced_and_nothing_is_lost(tmp_path):
    async with FakeDestinationServer(default=Answer(200, delay=0.02)) as server:
        router = own_process_router(tmp_path, webhook("hook", server.url, concurrency=1))
        async with router:
            await router.route_many([track(n) for n in range(100)])
            await server.wait_for(10, timeout=20)
            first = delivery_pid(router)
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: router._delivery._process is not None
                             and router._delivery._process.pid != first)
            await router.route_many([track(n) for n in range(100, 120)])
            assert await router.drain(timeout=30)
        delivered = {r.json["messageId"] for r in server.requests}
        assert delivered == {f"m-{n}" for n in range(120)}  # re-sends allowed, losses not


async def test_counters_carry_on_across_a_replaced_delivery_process(tmp_path):
    # The router's /metrics outlives its children: a replacement, which counts from zero,
    # once wiped what the one before it had counted.
    async with FakeDestinationServer() as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        async with router:
            await router.route_many([track(n) for n in range(10)])
            await wait_until(lambda: router.delivery_metrics.delivered.get("hook") == 10)
            first = delivery_pid(router)
            os.kill(first, signal.SIGKILL)
            await wait_until(lambda: router._delivery._process is not None
                             and router._delivery._process.pid != first)
            await router.route_many([track(n) for n in range(10, 13)])
            await wait_until(lambda: router.delivery_metrics.delivered.get("hook") == 13)
            assert router.delivery_metrics.requests.get("hook", "200") == 13
            assert router.delivery_metrics.latency.series[("hook",)][-1] == 13


async def test_closing_the_router_stops_its_delivery_process(tmp_path):
    async with FakeDestinationServer() as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        await router.start()
        pid = delivery_pid(router)
        await router.close(grace=1)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_delivery_process_needs_storage_both_processes_can_open(tmp_path):
    with pytest.raises(ConfigError, match="own_process.*memory://"):
        router_for(tmp_path, [webhook("hook", "http://127.0.0.1:9/")],
                   delivery={"own_process": True},
                   storage="memory://")


def test_a_storage_passed_in_cannot_be_shared_with_a_delivery_process(tmp_path):
    loaded = parse_config(f"storage: sqlite:///{tmp_path / 'r.db'}\n"
                          "delivery: {own_process: true}\n", file="t.yaml", env={})
    with pytest.raises(ValueError, match="own_process.*storage passed to Router"):
        Router(loaded, storage=MemoryStorage())
    Router(loaded, storage=MemoryStorage(), deliver=False)  # intake only: fine


def test_counters_never_hold_up_the_delivery_process_while_the_router_does_not_read():
    """The delivery process's counters go to the router over a socket. While the router is
    busy and does not read, the buffer fills; the delivery process must go on delivering
    (offering a snapshot never waits), and once the router reads, the latest one arrives."""
    ours, theirs = socket.socketpair()
    for end in (ours, theirs):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    router_end, child_end = Connection(ours.detach()), Connection(theirs.detach())
    sender = MetricsSender(child_end)
    padding = "x" * 20_000  # each snapshot alone is more than the buffer holds

    def offer_all() -> None:
        for number in range(200):
            sender.offer({"number": number, "padding": padding})

    offering = threading.Thread(target=offer_all, daemon=True)
    offering.start()
    offering.join(30)
    assert not offering.is_alive(), "offering a snapshot waited for the reader"

    received = []
    while not received or received[-1] != 199:
        assert router_end.poll(30), "the latest snapshot never arrived"
        kind, snapshot = router_end.recv()
        assert kind == "metrics"
        received.append(snapshot["number"])
    assert len(received) < 200, "snapshots not yet sent are replaced by newer ones"
    sender.close(timeout=5)
    router_end.close()
    child_end.close()


async def test_intake_goes_on_while_the_delivery_process_is_stopped(tmp_path):
    """Wake-ups are hints (the delivery process also polls), so the router never waits to
    send one: with the delivery process frozen (SIGSTOP) the socket between them fills, and
    routing must go on regardless. Once it runs again, everything is delivered."""
    async with FakeDestinationServer() as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        async with router:
            child = delivery_pid(router)
            await freeze_outside_a_write(child, tmp_path / "router.db")
            try:
                async def route_one_at_a_time() -> None:
                    for n in range(3000):  # a wake-up each: far more than the socket holds
                        await router.route(track(n))
                await asyncio.wait_for(route_one_at_a_time(), timeout=120)
            finally:
                os.kill(child, signal.SIGCONT)
            assert await router.drain(timeout=60)
        assert {r.json["messageId"] for r in server.requests} == {f"m-{n}" for n in range(3000)}


async def test_a_close_cancelled_midway_stops_the_delivery_process_at_once(tmp_path):
    """A second Ctrl-C during `router serve`'s graceful stop cancels what it waits for,
    Router.close() included (as does a timeout around close()). The delivery process must
    then stop at once as well, rather than go on for its whole grace behind a router that
    has given up on it; the request it abandons goes back to the queue."""
    async with FakeDestinationServer() as server:
        server.script([HELD])
        router = own_process_router(tmp_path, webhook("hook", server.url, timeout="120s"))
        await router.start()
        process = router._delivery._process
        try:
            await router.route(track(1))
            await server.wait_for(1, timeout=20)  # in flight, and held
            closing = asyncio.create_task(router.close(grace=LONG_GRACE))
            await asyncio.sleep(0.5)  # the delivery process is in its graceful stop
            closing.cancel()
            await asyncio.wait([closing], timeout=30)
            assert closing.cancelled()
            assert await stops_within(process.pid, timeout=5), \
                "the delivery process went on after its router's close was cancelled"
            assert process.poll() == 0  # it stopped by itself, not killed
        finally:
            if process.poll() is None:
                process.kill()
            await router.close(grace=0)
        async with own_process_router(tmp_path, webhook("hook", server.url)) as restarted:
            assert await restarted.drain(timeout=20)
        assert [r.json["messageId"] for r in server.requests] == ["m-1", "m-1"]
        assert server.requests[-1].status == 200


ROUTER_THAT_STOPS_ON_A_LINE = """
import asyncio, sys
from router.config import parse_config
from router.routing import Router

async def main():
    router = Router(parse_config(sys.argv[1], file="test.json", env={}))
    await router.start()
    print(router._delivery._process.pid, flush=True)
    await router.route({"type": "track", "event": "T", "userId": "u", "messageId": "m-1"})
    await asyncio.to_thread(sys.stdin.readline)
    print("stopping", flush=True)
    await router.close(grace=float(sys.argv[2]))

asyncio.run(main())
"""


async def test_a_delivery_process_stops_at_once_when_its_router_dies_while_stopping(tmp_path):
    """The router starts a graceful stop (a long grace, a delivery hanging) and is killed
    with -9 in the middle of it. Its delivery process sees the pipe close and must stop at
    once, not after the grace: a router restarted right away waits only 5 s for the spool."""
    async with FakeDestinationServer() as server:
        server.script([HELD])
        config = {"storage": f"sqlite:///{tmp_path / 'router.db'}",
                  "egress": {"allow_private_addresses": True},
                  "delivery": {"own_process": True},
                  "destinations": [webhook("hook", server.url, timeout="120s")]}
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ROUTER_THAT_STOPS_ON_A_LINE, orjson.dumps(config).decode(),
            str(LONG_GRACE), cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        child = None
        try:
            child = int(await asyncio.wait_for(parent.stdout.readline(), 60))
            await server.wait_for(1, timeout=20)  # in flight, and held
            parent.stdin.write(b"stop\n")
            assert await asyncio.wait_for(parent.stdout.readline(), 10) == b"stopping\n"
            await asyncio.sleep(1)  # the delivery process is in its graceful stop
            assert running(child)
            # Not waited for before looking at the child: parent.wait() also waits for the
            # parent's stdout to close, and the delivery process holds it open until it exits.
            parent.kill()
            assert await stops_within(child, timeout=5), \
                "the delivery process outlived its router by the rest of the grace"
        finally:
            if parent.returncode is None:
                parent.kill()
            if child is not None and running(child):
                os.kill(child, signal.SIGKILL)
            await asyncio.wait_for(parent.wait(), 30)
        async with own_process_router(tmp_path, webhook("hook", server.url)) as restarted:
            assert await restarted.drain(timeout=20)
        assert [r.json["messageId"] for r in server.requests] == ["m-1", "m-1"]
        assert server.requests[-1].status == 200


async def test_a_wake_up_too_long_for_one_datagram_wakes_every_destination(tmp_path, capfd):
    # Hundreds of destinations with long names once made a wake-up longer than the child
    # reads: it failed to parse, with a traceback on each, and delivery waited for its poll.
    async with FakeDestinationServer() as server:
        name = "d" * (70 * 1024)
        router = own_process_router(tmp_path, webhook(name, server.url))
        async with router:
            await router.route(track(1))
            await server.wait_for(1, timeout=20)
    assert "JSONDecodeError" not in capfd.readouterr().err


def delivery_child_of(pid: int) -> int | None:
    """The delivery process that ``pid`` started, once it runs (after its exec)."""
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if b"router.delivery.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    except OSError:  # one of them just exited
        pass
    return None


async def test_a_delivery_process_whose_router_dies_while_it_starts_stops_quietly(tmp_path):
    """The router killed with -9 while its delivery process starts (here, waiting for the
    spool's delivery lock, which a router that is just exiting still holds): the child
    watched the pipe only once started, so it went on starting, and died with
    BrokenPipeError tracebacks as it told the router it had failed (or was ready)."""
    spool = tmp_path / "router.db"
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{spool}",
                                     "egress": {"allow_private_addresses": True},
                                     "delivery": {"own_process": True},
                                     "destinations": [webhook("hook", "http://127.0.0.1:9/")]}))
    held = lock_delivery(spool)
    assert held is not None
    with open(tmp_path / "stderr", "wb") as stderr:
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "serve", "-c", str(config), "--port", "0",
            cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = None
    try:
        await wait_until(lambda: delivery_child_of(parent.pid) is not None, timeout=30)
        child = delivery_child_of(parent.pid)
        parent.kill()
        await parent.wait()
        assert child is not None and await stops_within(child, timeout=30), \
            "the delivery process outlived its router"
    finally:
        os.close(held)
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)
    said = (tmp_path / "stderr").read_text()
    assert "Traceback" not in said and "BrokenPipeError" not in said, said


async def test_a_replacement_delivery_process_that_cannot_start_exits_non_zero(
        tmp_path, monkeypatch, caplog):
    """A replacement that failed its start exited with 0, and the router's log said
    "delivery process exited (code 0); starting another" for a failure."""
    monkeypatch.setattr("router.delivery.process.RESTART_DELAY", 2.0)  # room to take the lock
    async with FakeDestinationServer() as server:
        router = own_process_router(tmp_path, webhook("hook", server.url))
        async with router:
            first = delivery_pid(router)
            os.kill(first, signal.SIGKILL)
            held = None
            deadline = time.monotonic() + 30
            while (held := lock_delivery(tmp_path / "router.db")) is None:  # until it died
                assert time.monotonic() < deadline, "the killed child's lock never went"
                await asyncio.sleep(0.01)
            try:  # the replacement waits 5 s for the lock, in vain, and exits
                await wait_until(lambda: caplog.text.count("delivery process exited") >= 2,
                                 timeout=60)
            finally:
                os.close(held)
            await wait_until(lambda: router.delivery_process.running_pid is not None, 60)
    exits = re.findall(r"delivery process exited \(code (-?\d+)\)", caplog.text)
    assert exits[:2] == [str(-signal.SIGKILL), "1"], caplog.text
