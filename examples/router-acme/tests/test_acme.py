"""Tests of the example plugin, as a plugin author would write them with ``router.testing``.

Annotated throughout, fixtures included, and checked with ``mypy --strict``
(``tests/test_plugin_typing.py`` in the router's repository) as the plugin itself is."""

from __future__ import annotations

from router import PermanentError, Router, SkipEvent, parse_config
from router.registry import create_registry
from router.testing import (Answer, DestinationHarness, FakeDestinationServer, HarnessFactory,
                            conformance_test, dead_letters, make_event)
from router_acme import Acme

pytest_plugins = ["router.testing.pytest_plugin"]

SETTINGS = {"api_key": "acme-key-0001"}


def test_discovered_through_its_entry_point() -> None:
    kind = create_registry().get("acme")
    assert kind.cls is Acme and kind.package == "router-acme"


def test_an_order_becomes_one_acme_event_with_revenue() -> None:
    harness = DestinationHarness(Acme, SETTINGS)
    (request,) = harness.requests({
        "type": "track", "event": "Order Completed", "userId": "user-1042",
        "messageId": "msg-1", "timestamp": "2026-11-20T14:03:11.120Z",
        "properties": {"order_id": "o-1", "revenue": "25.00", "currency": "eur"}})
    assert request.method == "POST"
    assert request.url == "https://api.acme.example/v1/events"
    assert request.headers["Authorization"] == "Bearer acme-key-0001"
    assert harness.request_json(request) == {"events": [{
        "id": "msg-1", "name": "Order Completed", "user": "user-1042", "ts": 1795183391120,
        "props": {"order_id": "o-1", "revenue": 25.0, "currency": "EUR"},
        "revenue": {"amount": 25.0, "currency": "EUR"}}]}


def test_pages_are_skipped_with_a_reason(destination_harness: HarnessFactory) -> None:
    harness = destination_harness(Acme, SETTINGS)  # the fixture: a DestinationHarness[Acme]
    try:
        harness.payloads({"type": "page", "anonymousId": "a-1", "name": "Home"})
    except SkipEvent as skip:
        assert "page" in skip.reason
    else:
        raise AssertionError("a page should be skipped")


def test_a_207_fails_only_the_events_acme_names() -> None:
    harness = DestinationHarness(Acme, SETTINGS)
    payloads = [p for n in range(3) for p in harness.payloads(
        {"type": "track", "event": "Played", "userId": "u-1", "messageId": f"m-{n}"})]
    outcomes = harness.outcomes(payloads, 207, {"errors": [{"index": 1, "error": "bad name"}]})
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentError) and "bad name" in outcomes[1].reason


async def test_an_event_acme_refuses_is_dead_lettered_with_its_answer(
        fake_destination: FakeDestinationServer) -> None:
    # Through the router's own delivery, against a real HTTP server standing in for Acme.
    fake_destination.script([Answer(400, body={"error": "unknown event name"})])
    config = f"""
    storage: memory://
    egress: {{allow_private_addresses: true}}
    destinations:
      - name: Acme
        plugin: acme
        settings: {{api_key: acme-key-0001, base_url: "{fake_destination.url}"}}
        delivery: {{batch_wait: 10ms}}
    """
    async with Router(parse_config(config)) as router:
        await router.route(make_event("track", messageId="m-1"))
        assert await router.drain(timeout=10)  # True for dead-lettered events too
        (letter,) = await dead_letters(router, "Acme")
    assert (letter.message_id, letter.status) == ("m-1", 400)
    assert letter.reason == "HTTP 400: unknown event name"
    assert letter.request is not None
    assert letter.request["headers"]["Authorization"] == "**REDACTED**"


test_conformance = conformance_test(Acme, settings=SETTINGS, examples=100)
