"""A real Segment client library sends to the router unchanged.

segment-analytics-python (module ``segment.analytics``) is pointed at the router's HTTP API
with ``host``; whatever it sends must reach the destination with the messageIds the library
generated. The library is synchronous (requests), so it runs in a thread while the router
and the recording destination run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from segment.analytics.client import Client
from segment.analytics.request import APIError

from router.config import parse_config
from router.routing import Router
from router.server.app import create_app, create_runner

WRITE_KEY = "python-client-write-key"


@dataclass
class Recorder:
    received: list[dict[str, Any]] = field(default_factory=list)

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, \
                f"the destination got {len(self.received)} of {count} events"
            await asyncio.sleep(0.02)

    def by_message_id(self) -> dict[str, dict[str, Any]]:
        return {event["messageId"]: event for event in self.received}


@pytest.fixture
async def router_url() -> AsyncIterator[tuple[str, Recorder]]:
    """The router's API URL, with a webhook destination recording on 127.0.0.1."""
    recorder = Recorder()

    async def hook(request: web.Request) -> web.Response:
        recorder.received.append(await request.json())
        return web.json_response({"ok": True})

    sink = web.Application()
    sink.router.add_post("/hook", hook)
    sink_runner = web.AppRunner(sink, access_log=None)
    await sink_runner.setup()
    await web.TCPSite(sink_runner, "127.0.0.1", 0).start()
    sink_port = sink_runner.addresses[0][1]

    loaded = parse_config(
        "storage: memory://\n"
        f'sources:\n  - name: backend\n    write_keys: ["{WRITE_KEY}"]\n'
        "egress:\n  allow_private_addresses: true\n"
        "destinations:\n  - name: hook\n    plugin: webhook\n"
        f'    settings: {{url: "http://127.0.0.1:{sink_port}/hook"}}\n',
        file="test.yaml", env={})
    router = Router(loaded)
    await router.start()
    runner = create_runner(create_app(router))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", recorder
    finally:
        await runner.cleanup()
        await router.close()
        await sink_runner.cleanup()


def _every_call(client: Client) -> list[dict[str, Any]]:
    """One call of each type, as an application would make them; returns the messages."""
    sent = [
        client.identify("user-1", {"email": "ada@example.com", "plan": "pro"}),
        client.track("user-1", "Order Completed",
                     {"order_id": "o-1", "revenue": "19.99", "currency": "eur"}),
        client.page("user-1", "Docs", "Pricing", {"url": "https://example.com/pricing"}),
        client.screen("user-1", "App", "Settings"),
        client.group("user-1", "group-1", {"name": "Acme"}),
        client.alias("anon-1", "user-1"),
        client.track(anonymous_id="anon-2", event="Viewed", properties={"n": 1}),
    ]
    assert all(success for success, _ in sent)
    return [message for _, message in sent]


@pytest.mark.parametrize("use_gzip", [False, True], ids=["plain", "gzip"])
async def test_sync_mode_calls_arrive_with_their_message_ids(
        router_url: tuple[str, Recorder], use_gzip: bool) -> None:
    url, recorder = router_url
    client = Client(WRITE_KEY, host=url, sync_mode=True, gzip=use_gzip)
    messages = await asyncio.to_thread(_every_call, client)
    await recorder.wait_for(len(messages))
    delivered = recorder.by_message_id()
    assert set(delivered) == {message["messageId"] for message in messages}
    for message in messages:
        event = delivered[message["messageId"]]
        assert event["type"] == message["type"]
        assert event["context"]["library"]["name"] == "analytics-python"
    order = next(e for e in recorder.received if e.get("event") == "Order Completed")
    assert order["properties"]["revenue"] == 19.99
    assert order["properties"]["currency"] == "EUR"
    alias = next(e for e in recorder.received if e["type"] == "alias")
    assert (alias["previousId"], alias["userId"]) == ("anon-1", "user-1")


async def test_batching_consumer_thread_flushes_everything(
        router_url: tuple[str, Recorder]) -> None:
    url, recorder = router_url
    errors: list[Exception] = []
    client = Client(WRITE_KEY, host=url, upload_size=100, upload_interval=0.05,
                    on_error=lambda error, batch: errors.append(error))

    def send() -> list[str]:
        ids = [client.track(f"user-{n % 7}", "Clicked", {"n": n})[1]["messageId"]
               for n in range(250)]
        client.shutdown()  # flush, then stop the consumer thread
        return ids

    ids = await asyncio.to_thread(send)
    assert errors == []
    await recorder.wait_for(250)
    assert sorted(recorder.by_message_id()) == sorted(ids)


async def test_wrong_write_key_is_reported_by_the_library(
        router_url: tuple[str, Recorder]) -> None:
    url, recorder = router_url
    client = Client("not-the-key", host=url, sync_mode=True)
    with pytest.raises(APIError) as refused:
        await asyncio.to_thread(client.track, "user-1", "Clicked")
    assert refused.value.status == 401
    assert refused.value.code == "unauthorized"  # our error body is what the library reads
    await asyncio.sleep(0.2)
    assert recorder.received == []
