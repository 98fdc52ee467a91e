"""A router embedded in a service: one delivering router per SQLite spool, starts that fail
leave nothing running, and a router is started once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from router import SpoolInUse
from router.config import parse_config
from router.routing import Router
from router.testing import Answer, FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook

ROOT = Path(__file__).resolve().parents[1]


def _delivery_children() -> list[int]:
    """This process's delivery children, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"router.delivery.process" in command:
            children.append(int(entry.name))
    return children


async def test_a_second_delivering_router_on_one_spool_is_refused(tmp_path, monkeypatch):
    # Each would send the jobs the other has read: every event twice.
    monkeypatch.setattr("router.storage.sqlite.storage.CLAIM_WAIT", 0.3)
    async with FakeDestinationServer() as server:
        first = router_for(tmp_path, [webhook("hook", server.url)])
        second = router_for(tmp_path, [webhook("hook", server.url)])
        async with first:
            with pytest.raises(SpoolInUse, match="another router is delivering from"):
                await second.start()
            queue_only = Router(second.loaded, deliver=False)  # intake beside it is fine
            async with queue_only:
                await queue_only.route(track(1))
            assert await first.drain(timeout=10)
        async with second:  # the first closed: its claim went with it
            pass
    assert [request.json["messageId"] for request in server.requests] == ["m-1"]


async def test_a_router_beside_a_delivering_one_leaves_its_leases_alone(tmp_path, monkeypatch):
    # A refused second `router serve`, or `router send`, opened the spool as a router does
    # and took back the jobs the delivering router had leased: their retries, still under
    # way, were leased and sent a second time.
    monkeypatch.setattr("router.storage.sqlite.storage.CLAIM_WAIT", 0.1)
    async with FakeDestinationServer() as server:
        server.script([500, Answer(200, delay=1.5)])  # the retry is under way for 1.5 s
        hook = webhook("hook", server.url)
        async with router_for(tmp_path, [hook]) as delivering:
            await delivering.route(track(1))
            while len(server.requests) < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(SpoolInUse):
                await router_for(tmp_path, [hook]).start()
            async with router_for(tmp_path, [hook], deliver=False) as sending:
                await sending.route(track(2))
            assert await delivering.drain(timeout=10)
    assert [request.json["messageId"] for request in server.requests] == ["m-1", "m-1", "m-2"]


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
async def test_router_send_beside_a_delivering_router_queues_for_it(tmp_path, own_process):
    # The shipped config/router.yaml delivers from its own process: that child's refusal
    # reaches `router send` as the same SpoolInUse.
    async with FakeDestinationServer() as server:
        hook = webhook("hook", server.url)
        config = tmp_path / "router.json"
        config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                         "egress": {"allow_private_addresses": True},
                                         "delivery": {"own_process": own_process},
                                         "destinations": [hook]}))
        (tmp_path / "ev.json").write_bytes(orjson.dumps(track(7)))
        async with router_for(tmp_path, [hook]) as serving:
            completed = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "router", "send", "-c", str(config),
                                 str(tmp_path / "ev.json")],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert completed.returncode == 0, completed.stderr
            assert "queued for it" in completed.stderr
            assert await serving.drain(timeout=10)
        assert [request.json["messageId"] for request in server.requests] == ["m-7"]


async def test_a_delivery_process_that_cannot_start_leaves_nothing_running(tmp_path):
    text = orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                         "delivery": {"own_process": True},
                         "destinations": [{"name": "x", "plugin": "webhook",
                                           "settings": {"url": "https://hooks.example/x"}}]})
    router = Router(parse_config(text.decode(), env={}))
    async with router_for(tmp_path, []):  # holds the spool: the child's claim fails
        with pytest.raises(SpoolInUse, match="another router is delivering"):
            await router.start()
        await asyncio.sleep(2.5)  # longer than the delay before a replacement child
        assert _delivery_children() == []
    with pytest.raises(RuntimeError, match="storage is not open"):
        await router.storage.stats(now=0)  # closed again


async def test_a_router_is_started_once(tmp_path):
    router = router_for(tmp_path, [])
    async with router:
        with pytest.raises(RuntimeError, match="already started"):
            await router.start()


async def test_routing_before_start_or_after_close_says_so(tmp_path):
    router = router_for(tmp_path, [], storage="memory://")
    with pytest.raises(RuntimeError, match="not started"):
        await router.route(track(1))
    async with router:
        assert (await router.route(track(1))).results == []  # no destinations: accepted
    with pytest.raises(RuntimeError, match="not started"):
        await router.route(track(2))


# -- closing while others route, twice at once, cancelled; a start cancelled (embedding audit)

def _writer_threads() -> int:
    return sum(thread.name == "sqlite-writer" for thread in threading.enumerate())


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
async def test_routing_while_the_router_closes_raises_rather_than_hangs(tmp_path, own_process):
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [webhook("hook", server.url)],
                            delivery={"own_process": own_process})
        await router.start()

        async def keep_routing(task: int) -> int:
            routed = 0
            try:
                for n in range(1000):
                    await router.route(track(task * 1000 + n))
                    routed += 1
            except RuntimeError:
                return routed
            return routed

        routing = [asyncio.create_task(keep_routing(task)) for task in range(20)]
        await asyncio.sleep(0.2)
        await router.close(grace=1)
        routed = await asyncio.wait_for(asyncio.gather(*routing), timeout=10)
        # every event route() acknowledged is kept, and delivered by the next router
        async with router_for(tmp_path, [webhook("hook", server.url)]) as restarted:
            assert await restarted.drain(timeout=30)
    delivered = {request.json["messageId"] for request in server.requests}
    assert len(delivered) >= sum(routed) > 0


async def test_two_closes_at_once_leave_a_router_that_starts_and_routes_again(tmp_path):
    # A signal handler and an application's cleanup both closing: the second left a stop in
    # the writer's queue, and the restarted router's writer read it and quit at once.
    router = router_for(tmp_path, [])
    for _ in range(2):
        await router.start()
        await asyncio.gather(router.close(), router.close())
        assert _writer_threads() == 0
    async with router:
        await asyncio.wait_for(router.route(track(1)), timeout=10)


async def test_a_start_cancelled_while_the_spool_opens_can_be_tried_again(tmp_path):
    # The writer of the cancelled start went on, and the next start ran a second one on the
    # same queue: one of them crashed, and every route() after hung.
    router = router_for(tmp_path, [])
    for delay in (0, 0.001, 0.002, 0.005):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(router.start(), timeout=delay)
            await router.close()
    async with router:
        assert _writer_threads() == 1
        await asyncio.wait_for(asyncio.gather(*(router.route(track(n)) for n in range(50))),
                               timeout=10)
    assert _writer_threads() == 0


async def test_a_cancelled_close_still_closes(tmp_path):
    async with FakeDestinationServer(default=Answer(200, delay=60)) as server:
        router = router_for(tmp_path, [webhook("hook", server.url, timeout="120s")])
        await router.start()
        await router.route(track(1))
        await server.wait_for(1, timeout=20)  # in flight, and held
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(router.close(grace=60), timeout=0.5)
        with pytest.raises(RuntimeError, match="not started"):
            await router.route(track(2))
        await router.close()  # waits for the close under way, cut short
        assert _writer_threads() == 0
        async with router_for(tmp_path, [webhook("hook", server.url)]) as restarted:
            assert await restarted.storage.stats(now=0) is not None  # the spool is free


# -- the same on Redis, and a cancellation a library swallows (lifecycle audit) ----------------

@pytest.fixture
def redis_url(tmp_path):
    from tests.redis_helpers import start_redis_server, stop
    process, port = start_redis_server(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    stop(process)


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
async def test_route_raises_as_soon_as_close_is_called(tmp_path, storage):
    # close() scheduled its work, and a route() in the same turn was still accepted.
    router = router_for(tmp_path, [], deliver=False,
                        storage="memory://" if storage == "memory" else None)
    await router.start()
    closing = asyncio.ensure_future(router.close())
    await asyncio.sleep(0)  # close() has been called, its work not begun
    with pytest.raises(RuntimeError, match="not started"):
        await router.route(track(1))
    await closing


async def test_routes_waiting_for_redis_get_their_answer_when_the_router_closes(
        tmp_path, redis_url):
    # The Redis client was closed under the scripts in flight: StorageUnavailable for events
    # that had mostly been accepted.
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [webhook("hook", server.url)], storage=redis_url)
        await router.start()
        routing = [asyncio.ensure_future(router.route(track(n))) for n in range(200)]
        await asyncio.sleep(0)
        await asyncio.wait_for(router.close(grace=0), timeout=30)
        outcomes = await asyncio.gather(*routing, return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(isinstance(failure, RuntimeError) for failure in failures), failures[:3]


async def test_a_cancelled_close_gives_back_what_delivery_held_at_once_on_redis(
        tmp_path, redis_url):
    # The jobs in flight stayed leased for their whole lease (five minutes and more), and the
    # senders went on running after the router had closed.
    async with FakeDestinationServer(default=Answer(200, delay=60)) as server:
        router = router_for(tmp_path, [webhook("hook", server.url, timeout="120s")],
                            storage=redis_url)
        await router.start()
        await router.route_many([track(n) for n in range(5)])
        await server.wait_for(1, timeout=20)  # in flight, and held
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(router.close(grace=60), timeout=0.5)
        await router.close()
        assert not [task for task in asyncio.all_tasks() if task.get_name().startswith(
            ("send:", "lease:", "upkeep:"))]
        server.default = Answer(200)
        async with router_for(tmp_path, [webhook("hook", server.url)],
                              storage=redis_url) as restarted:
            assert await restarted.drain(timeout=20)


async def test_a_task_that_swallows_its_cancellation_is_still_ended():
    # redis-py's connection pool handed a connection to a task cancelled while it waited:
    # the dead-letter retention loop went on to sleep ten minutes, and close() with it.
    from router.delivery.service import ended

    async def swallows_one_cancellation() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(60)

    task = asyncio.create_task(swallows_one_cancellation())
    await asyncio.sleep(0)
    await asyncio.wait_for(ended([task]), timeout=10)
    assert task.cancelled()


async def test_a_start_right_after_a_cancelled_close_waits_for_it_and_starts(tmp_path):
    # It waited for the close cut short and raised that close's CancelledError as its own
    # (review).
    async with FakeDestinationServer(default=Answer(200, delay=60)) as server:
        router = router_for(tmp_path, [webhook("hook", server.url, timeout="120s")])
        await router.start()
        await router.route(track(1))
        await server.wait_for(1, timeout=20)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(router.close(grace=60), timeout=0.5)
        await asyncio.wait_for(router.start(), timeout=30)
        await router.close(grace=0)

