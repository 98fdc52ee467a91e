"""A router embedded in a service: one delivering router per SQLite spool, starts that fail
leave nothing running, and a router is started once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router import SpoolInUse
from router.config import parse_config
from router.routing import Router
from router.testing import FakeDestinationServer
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
    monkeypatch.setattr("router.storage.sqlite.CLAIM_WAIT", 0.3)
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
