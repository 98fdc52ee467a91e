"""Delivery in a process of its own (``delivery.own_process``): the same guarantees as in
one process, with the child's counters served by the parent, a child that dies replaced,
and a child that never outlives its router (see also test_durability's kill -9 test)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from router.config import parse_config
from router.delivery.process import MetricsSender
from router.errors import ConfigError
from router.routing import Router
from router.storage.memory import MemoryStorage
from router.testing.fake_server import Answer, FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook


def own_process_router(tmp_path: Path, *destinations: dict) -> Router:
    return router_for(tmp_path, list(destinations), delivery={"own_process": True})


def delivery_pid(router: Router) -> int:
    return router._delivery._process.pid  # the one private look: which process to kill


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


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
            os.kill(child, signal.SIGSTOP)
            try:
                async def route_one_at_a_time() -> None:
                    for n in range(3000):  # a wake-up each: far more than the socket holds
                        await router.route(track(n))
                await asyncio.wait_for(route_one_at_a_time(), timeout=120)
            finally:
                os.kill(child, signal.SIGCONT)
            assert await router.drain(timeout=60)
        assert {r.json["messageId"] for r in server.requests} == {f"m-{n}" for n in range(3000)}
