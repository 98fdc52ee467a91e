"""The embedding API (contract, "What it is", user 1): ``async with Router(...)`` and
``await router.route(event)``, with ``memory://`` storage and delivery off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import textwrap
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from router import (Destination, EventRejected, HttpRequest, Payload, SkipEvent, hookimpl,
                    parse_event)
from router.config import parse_config
from router.delivery.batching import queued_group
from router.destination import checked_payloads
from router.errors import ConfigError
from router.registry import create_registry
from router import routing
from router.routing import Router, Status
from router.storage.base import Acceptance, NewJob

LOUD_SECRET = "sk_live_CANARY_1e0f"


class ProbeSettings(BaseModel):
    behaviour: str = "echo"
    token: SecretStr = SecretStr("")


class Probe(Destination[ProbeSettings]):
    """A test destination: echoes what it gets, or misbehaves as its settings say."""

    plugin_name = "probe"
    Settings = ProbeSettings

    def translate(self, event, options: Mapping[str, Any]) -> Sequence[Payload]:
        behaviour = self.settings.behaviour
        if behaviour == "crash" and event.event == "Crash Me":
            raise RuntimeError(f"unexpected failure with {LOUD_SECRET}")
        if behaviour == "crash" and event.event == "Leak":
            raise ValueError(f"GET https://api.example/?key={self.settings.token.get_secret_value()}")
        if behaviour == "crash" and event.event == "Key Error":
            raise KeyError("properties")
        if behaviour == "reject":
            raise EventRejected("the vendor refuses events named " + repr(event.event))
        if behaviour == "skip":
            raise SkipEvent("probe has no meaning for this event")
        if behaviour == "nothing":
            return []
        if behaviour == "pair":  # two payloads, in groups of their own
            return [Payload({"import": event.messageId}, "import"),
                    Payload({"engage": event.messageId}, "engage")]
        if behaviour == "decimal" and event.event == "Decimal":
            return [Payload({"revenue": Decimal("19.99")})]  # a plugin bug: not JSON data
        return [Payload({"event": event.event, "type": event.type,
                         "properties": dict(event.properties), "options": dict(options),
                         "messageId": event.messageId})]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        return HttpRequest.json("POST", "https://probe.example/in", [p.body for p in payloads])


class ProbePlugin:
    @hookimpl
    def router_register_destinations(self, register):
        register(Probe)


@pytest.fixture(autouse=True)
def _quiet_plugin_warnings():
    logging.getLogger("router.plugins").setLevel(logging.ERROR)
    yield
    logging.getLogger("router.plugins").setLevel(logging.NOTSET)


def make_router(destinations: str, *, storage: str = "memory://", dedup: str = "") -> Router:
    text = f"storage: {storage}\n{dedup}destinations:\n" + textwrap.indent(
        textwrap.dedent(destinations).strip("\n"), "  ") + "\n"
    registry = create_registry(extra_plugins=(ProbePlugin(),))
    return Router(parse_config(text, env={}), registry=registry, deliver=False)


STANDARD = """
    - name: Hook
      plugin: webhook
      settings: {url: "https://hooks.example/all"}
    - name: Orders
      plugin: webhook
      filter:
        types: [track]
        events: ["Order *"]
      settings: {url: "https://hooks.example/orders"}
    - name: Audit
      plugin: probe
      default_on: false
    - name: Identities
      plugin: probe
      filter:
        types: [identify, alias]
    - name: Muted
      plugin: probe
      enabled: false
"""


def track(name: str = "Signed Up", **extra) -> dict:
    return {"type": "track", "event": name, "userId": "u-1", **extra}


def statuses(result) -> dict[str, str]:
    return {r.destination: str(r.status) for r in result.results}


async def pending(router: Router) -> dict[str, int]:
    stats = await router.storage.stats(now=time.time())
    return {name: queue.pending for name, queue in stats.queues.items() if queue.pending}


# -- per-destination decisions ---------------------------------------------------------------------

async def test_route_reports_every_enabled_destination():
    async with make_router(STANDARD) as router:
        result = await router.route(track("Signed Up", messageId="m-1"))
    assert result.message_id == "m-1"
    assert not result.invalid and not result.duplicate
    assert statuses(result) == {"Hook": "send", "Orders": "skipped", "Audit": "skipped",
                                "Identities": "skipped"}
    assert "Signed Up" in result.status_of("Orders").reason          # filter reason
    assert "default" in result.status_of("Audit").reason             # off by default
    assert "identify" in result.status_of("Identities").reason      # filter on call type


async def test_a_body_several_destinations_share_is_serialized_once():
    async with make_router("""
        - {name: one, plugin: webhook, settings: {url: "https://hooks.example/1"}}
        - {name: two, plugin: webhook, settings: {url: "https://hooks.example/2"}}
        - {name: templated, plugin: webhook,
           settings: {url: "https://hooks.example/3", body: '{"n": 1}'}}
        - {name: next-hop, plugin: segment, settings: {write_key: k-1}}
        - {name: other-hop, plugin: segment, settings: {write_key: k-2}}
    """) as router:
        result = await router.route(track(messageId="m-1", sentAt="2024-01-01T00:00:01Z",
                                          timestamp="2024-01-01T00:00:00Z"))
    bodies = {r.destination: r.bodies[0] for r in result.results}
    assert bodies["one"] is bodies["two"]
    assert json.loads(bodies["one"])["sentAt"] == "2024-01-01T00:00:01.000Z"
    assert json.loads(bodies["templated"]) == '{"n": 1}'  # its own: the rendered text
    assert bodies["next-hop"] is bodies["other-hop"]
    assert "sentAt" not in json.loads(bodies["next-hop"])  # its own body, not the webhooks'


async def test_filter_passes_matching_events():
    async with make_router(STANDARD) as router:
        result = await router.route(track("Order Completed", properties={"revenue": 5}))
        identify = await router.route({"type": "identify", "userId": "u-1"})
    assert statuses(result)["Orders"] == "send"
    assert statuses(identify) == {"Hook": "send", "Orders": "skipped", "Audit": "skipped",
                                  "Identities": "send"}


async def test_a_filter_of_event_names_alone_takes_every_other_call_type():
    async with make_router("""
        - name: Orders
          plugin: probe
          filter: {events: ["Order *", "Checkout Started"]}
    """) as router:
        results = {name: statuses(await router.route(track(name)))["Orders"]
                   for name in ("Order Completed", "Checkout Started", "Signed Up")}
        identify = await router.route({"type": "identify", "userId": "u-1"})
    # Every pattern of the list counts, not only the last.
    assert results == {"Order Completed": "send", "Checkout Started": "send",
                       "Signed Up": "skipped"}
    assert statuses(identify)["Orders"] == "send"  # the names filter only track calls


async def test_exclude_events_skips_the_events_it_names_and_only_those():
    async with make_router("""
        - name: Quiet
          plugin: probe
          filter: {exclude_events: ["Debug *", "Heartbeat"]}
    """) as router:
        results = {name: await router.route(track(name))
                   for name in ("Debug Tick", "Heartbeat", "Order Completed")}
        page = await router.route({"type": "page", "userId": "u-1", "name": "Heartbeat"})
    assert {name: statuses(result)["Quiet"] for name, result in results.items()} == {
        "Debug Tick": "skipped", "Heartbeat": "skipped", "Order Completed": "send"}
    assert results["Heartbeat"].status_of("Quiet").reason == \
        "filter excludes the event 'Heartbeat'"
    assert statuses(page)["Quiet"] == "send"  # event names are those of track calls


async def test_empty_lists_in_a_filter_take_no_track_event_and_exclude_none():
    async with make_router("""
        - name: NoTracks
          plugin: probe
          filter: {events: []}
        - name: ExcludesNothing
          plugin: probe
          filter: {exclude_events: []}
    """) as router:
        result = await router.route(track("Order Completed"))
    assert statuses(result) == {"NoTracks": "skipped", "ExcludesNothing": "send"}


async def test_integrations_map_decides_with_a_reason():
    async with make_router(STANDARD) as router:
        result = await router.route(track("Order Completed",
                                          integrations={"All": False, "audit": {"tier": 2}}))
        named_off = await router.route(track("Order Completed", integrations={"HOOK": False}))
    assert statuses(result) == {"Hook": "skipped", "Orders": "skipped", "Audit": "send",
                                "Identities": "skipped"}
    assert "All" in result.status_of("Hook").reason
    assert result.status_of("Audit").payloads[0].body["options"] == {"tier": 2}
    assert statuses(named_off)["Hook"] == "skipped"
    assert "integrations" in named_off.status_of("Hook").reason
    assert statuses(named_off)["Orders"] == "send"


async def test_default_on_false_needs_the_event_to_name_it():
    async with make_router(STANDARD) as router:
        assert statuses(await router.route(track(integrations={"All": True})))["Audit"] == \
            "skipped"
        assert statuses(await router.route(track(integrations={"Audit": True})))["Audit"] == \
            "send"
        assert statuses(await router.route(track(integrations={"Audit": False})))["Audit"] == \
            "skipped"


async def test_disabled_destination_gets_nothing():
    async with make_router(STANDARD) as router:
        result = await router.route(track(integrations={"Muted": True}))
    assert "Muted" not in statuses(result)


async def test_route_accepts_an_already_parsed_event():
    async with make_router(STANDARD) as router:
        result = await router.route(parse_event(track(messageId="pre-1")))
    assert result.message_id == "pre-1"
    assert statuses(result)["Hook"] == "send"


# -- invalid and duplicate -------------------------------------------------------------------------

async def test_invalid_event_is_reported_with_its_reason():
    async with make_router(STANDARD) as router:
        result = await router.route({"type": "track", "userId": "u-1", "messageId": "bad-1"})
        assert await pending(router) == {}
    assert result.invalid
    assert result.message_id == "bad-1"
    (only,) = result.results
    assert only.destination is None and only.status is Status.INVALID
    assert "event" in only.reason


async def test_event_over_32_kb_is_invalid_through_route():
    async with make_router(STANDARD) as router:
        result = await router.route(track(properties={"blob": "x" * (33 * 1024)}))
    assert result.invalid
    assert "32 KB" in result.results[0].reason


async def test_repeated_message_id_is_a_duplicate_for_every_destination():
    async with make_router(STANDARD) as router:
        first = await router.route(track("Order Completed", messageId="m-dup"))
        queued = await pending(router)
        second = await router.route(track("Order Completed", messageId="m-dup"))
        other_source = await router.route(track("Order Completed", messageId="m-dup"),
                                          source="ios")
        assert await pending(router) == {name: 2 * count for name, count in queued.items()}
    assert statuses(first)["Hook"] == "send"
    assert second.duplicate
    assert statuses(second) == {name: "duplicate" for name in statuses(first)}  # each one
    assert second.status_of("Hook").status == "duplicate"
    assert "m-dup" in second.results[0].reason
    assert statuses(other_source)["Hook"] == "send"


async def test_duplicate_after_restart_with_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    async with make_router(STANDARD, storage=url) as router:
        assert statuses(await router.route(track(messageId="m-keep")))["Hook"] == "send"
    async with make_router(STANDARD, storage=url) as router:
        again = await router.route(track(messageId="m-keep"))
        assert again.duplicate
        assert (await pending(router))["Hook"] == 1


async def test_a_restarted_router_has_its_dedup_index_built_before_it_takes_an_event(tmp_path):
    # The first accept after a restart rebuilt it, holding that request and every one behind
    # it: 2 s for 900,000 ids, while /health already said ok (soak audit). start() builds it,
    # and `router serve` listens only after start().
    url = f"sqlite:///{tmp_path / 'router.db'}"
    async with make_router(STANDARD, storage=url) as router:
        await router.route_many([track(messageId=f"m-{n}") for n in range(50)])
    async with make_router(STANDARD, storage=url) as router:
        indexed = await router.storage._call(lambda connection: connection.execute(
            "SELECT count(*) FROM dedup_index.keys").fetchone()[0], writes=False)
        assert indexed == 50
        assert (await router.route(track(messageId="m-7"))).duplicate


async def test_dedup_window_from_the_config_is_used():
    async with make_router(STANDARD, dedup="dedup:\n  window: 1ms\n") as router:
        assert router.window == pytest.approx(0.001)
        await router.route(track(messageId="m-short"))
        await asyncio.sleep(0.01)
        again = await router.route(track(messageId="m-short"))
    assert not again.duplicate


async def test_route_many_keeps_neighbours_of_an_invalid_event():
    events = [track("Order Completed", messageId="a"),
              {"type": "track", "userId": "u-1", "messageId": "b"},          # no event name
              {"type": "identify", "userId": "u-2", "messageId": "c"},
              track("Order Completed", messageId="a")]                       # repeat of the first
    async with make_router(STANDARD) as router:
        results = await router.route_many(events)
        queued = await pending(router)
    assert [r.message_id for r in results] == ["a", "b", "c", "a"]
    assert [r.invalid for r in results] == [False, True, False, False]
    assert statuses(results[0]) == {"Hook": "send", "Orders": "send", "Audit": "skipped",
                                    "Identities": "skipped"}
    assert results[1].results[0].status is Status.INVALID
    assert statuses(results[2])["Identities"] == "send"
    assert results[3].duplicate
    assert queued == {"Hook": 2, "Orders": 1, "Identities": 1}


async def test_a_large_batch_lets_other_calls_through_while_it_is_planned(monkeypatch):
    # A batch of 2,500 events held the event loop for its whole translation (250 ms): every
    # other request and /health waited behind it (stall audit).
    monkeypatch.setattr(routing, "PLAN_TURN_AFTER", 0.0)  # a turn after each event
    many = [track(messageId=f"big-{n}") for n in range(1000)]
    async with make_router(STANDARD) as router:
        big = asyncio.create_task(router.route_many(many))
        await asyncio.sleep(0)  # it starts planning
        (small,) = await router.route_many([track(messageId="small")])
        assert not small.invalid and not big.done()
        results = await big
        assert [r.message_id for r in results] == [event["messageId"] for event in many]
        # A close while a batch is being planned waits for its answers
        again = asyncio.create_task(router.route_many(
            [track(messageId=f"late-{n}") for n in range(250)]))
        await asyncio.sleep(0)
    assert all(not r.invalid and not r.duplicate for r in await again)


async def test_events_whose_templates_are_slow_let_other_calls_through(tmp_path):
    # The loop turned every 50 events: 50 events whose body template took its whole second
    # each held intake and /health for 50 s (templates audit). It turns every 10 ms now.
    from tests.delivery_helpers import router_for
    slow = {"name": "slow", "plugin": "webhook",
            "settings": {"url": "https://hooks.example/a",
                         "body": "{% for i in range(30000) %}{% endfor %}{{ event.event }}"}}
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async with router_for(tmp_path, [slow], storage="memory://", deliver=False) as router:
        counting = asyncio.create_task(count_turns())
        await asyncio.sleep(0)
        before = turns
        results = await router.route_many([track(messageId=f"s-{n}") for n in range(20)])
        during = turns - before
        counting.cancel()
    assert all(r.status_of("slow").status == "send" for r in results)
    assert during >= 5  # at least one turn for every 4 events (each takes over 2.5 ms)


async def test_route_many_with_a_non_object_in_the_middle():
    async with make_router(STANDARD) as router:
        results = await router.route_many([track(messageId="x1"), "not an event",
                                           track(messageId="x2")])
        assert (await pending(router))["Hook"] == 2
    assert [r.invalid for r in results] == [False, True, False]


async def test_route_many_with_a_time_out_of_range_in_the_middle():
    # Go's zero time.Time, corrected for a client clock a second fast, falls before year 1:
    # that event is invalid, its neighbours go through (they were once lost with a 500).
    zero_time = track(messageId="zero", timestamp="0001-01-01T00:00:00Z",
                      sentAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat())
    async with make_router(STANDARD) as router:
        results = await router.route_many([track(messageId="y1"), zero_time,
                                           track(messageId="y2")])
        assert (await pending(router))["Hook"] == 2
    assert [r.invalid for r in results] == [False, True, False]
    assert "out of range" in results[1].results[0].reason


async def test_a_bug_reading_one_event_costs_only_that_event(monkeypatch, caplog):
    real_parse = routing.parse_event

    def parse_with_a_bug(raw, **options):
        if raw.get("messageId") == "buggy":
            raise RuntimeError("a bug")
        return real_parse(raw, **options)

    monkeypatch.setattr(routing, "parse_event", parse_with_a_bug)
    async with make_router(STANDARD) as router:
        results = await router.route_many([track(messageId="z1"), track(messageId="buggy"),
                                           track(messageId="z2")])
        assert (await pending(router))["Hook"] == 2
    assert [r.invalid for r in results] == [False, True, False]
    assert "internal error" in results[1].results[0].reason
    assert "reading an event failed" in caplog.text


# -- misbehaving destinations ----------------------------------------------------------------------

MISBEHAVING = """
    - name: Hook
      plugin: webhook
      settings: {url: "https://hooks.example/all"}
    - name: Crashy
      plugin: probe
      settings: {behaviour: crash}
    - name: Picky
      plugin: probe
      settings: {behaviour: reject}
    - name: Bored
      plugin: probe
      settings: {behaviour: skip}
    - name: Quiet
      plugin: probe
      settings: {behaviour: nothing}
"""


async def test_plugin_crash_in_translate_is_invalid_for_that_destination_only():
    async with make_router(MISBEHAVING) as router:
        crash = await router.route(track("Crash Me", messageId="c-1"))
        key_error = await router.route(track("Key Error", messageId="c-2"))
        fine = await router.route(track("Fine", messageId="c-3"))
        queued = await pending(router)
    assert statuses(crash) == {"Hook": "send", "Crashy": "invalid", "Picky": "invalid",
                               "Bored": "skipped", "Quiet": "skipped"}
    reason = crash.status_of("Crashy").reason
    assert "probe" in reason and "RuntimeError" in reason
    assert LOUD_SECRET not in reason
    assert statuses(key_error)["Crashy"] == "invalid"
    assert statuses(fine)["Crashy"] == "send"
    assert queued == {"Hook": 3, "Crashy": 1}


async def test_amounts_that_are_no_numbers_cost_only_the_destinations_that_read_them():
    # Refused whole, an event with revenue "$25.00" reached no destination, a webhook that
    # forwards it as it came included; Segment's API takes it (client libraries audit).
    async with make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/all"}
        - name: Templated
          plugin: webhook
          settings:
            url: "https://hooks.example/t"
            body: '{"cents": {{ event.properties.revenue * 100 }}}'
        - name: Forward
          plugin: segment
          settings: {write_key: abcdefgh12345678}
        - name: Amp
          plugin: amplitude
          settings: {api_key: abcdefgh12345678}
        - name: Probe
          plugin: probe
    """) as router:
        odd = await router.route(track("Order Completed", messageId="m-1", userId="user-1",
                                       properties={"revenue": "$25.00", "currency": "dollars",
                                                   "order_id": "o-1"}))
        fine = await router.route(track("Order Completed", messageId="m-2", userId="user-1",
                                        properties={"revenue": "25.00"}))
        queued = await pending(router)
    assert statuses(odd) == {"Hook": "send", "Forward": "send", "Templated": "invalid",
                             "Amp": "invalid", "Probe": "invalid"}
    reason = odd.status_of("Amp").reason
    assert reason == ("properties.revenue: expected a number or a numeric string; "
                      "properties.currency: expected an ISO 4217 currency code such as USD "
                      "or EUR")
    assert "$25.00" not in reason
    (hook,) = odd.status_of("Hook").payloads
    assert hook.body["properties"] == {"revenue": "$25.00", "currency": "dollars",
                                       "order_id": "o-1"}  # as it came
    assert set(statuses(fine).values()) == {"send"}
    assert queued == {"Hook": 2, "Forward": 2, "Templated": 1, "Amp": 1, "Probe": 1}


def test_an_operators_mapping_keeps_what_is_wrong_with_the_amounts():
    # The mapped copy started without it, so a destination with reads_amounts off could not
    # see why the amounts were left as sent (review).
    router = make_router("""
        - name: Forward
          plugin: segment
          settings: {write_key: abcdefgh12345678}
          mapping:
            event_names: {Order Completed: purchase}
    """)
    (forward,) = router.destinations
    event = parse_event(track("Order Completed", properties={"revenue": "$25.00"}))
    mapped = forward._apply_mapping(event)
    assert mapped.event == "purchase" and mapped.amount_problems == event.amount_problems != ()


async def test_a_crashing_plugin_does_not_log_its_settings_secrets(caplog):
    async with make_router(f"""
        - name: Crashy
          plugin: probe
          settings: {{behaviour: crash, token: "{LOUD_SECRET}"}}
    """) as router:
        with caplog.at_level(logging.DEBUG):
            result = await router.route(track("Leak"))
    assert result.status_of("Crashy").status is Status.INVALID
    assert LOUD_SECRET not in result.status_of("Crashy").reason
    assert LOUD_SECRET not in caplog.text


async def test_a_plugin_returning_non_json_costs_only_its_own_event():
    async with make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/all"}
        - name: Sloppy
          plugin: probe
          settings: {behaviour: decimal}
    """) as router:
        results = await router.route_many([track("Fine", messageId="n-1"),
                                           track("Decimal", messageId="n-2"),
                                           track("Fine", messageId="n-3")])
        queued = await pending(router)
    assert [statuses(r)["Hook"] for r in results] == ["send", "send", "send"]
    assert statuses(results[1])["Sloppy"] == "invalid"
    assert queued == {"Hook": 3, "Sloppy": 2}


async def test_a_payload_over_the_destinations_limit_is_rejected_for_that_destination_only():
    """The core measures each body as it serializes it: one over ``max_payload_bytes`` (or
    over ``batch_bytes``, since no request could carry it) could never be sent."""
    async with make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/all"}
        - name: Small
          plugin: probe
          delivery: {batch_bytes: 2048}
    """) as router:
        small, big = await router.route_many([
            track("Fine", messageId="s-1"),
            track("Fine", messageId="s-2", properties={"blob": "x" * 3000})])
        queued = await pending(router)
    assert statuses(small) == {"Hook": "send", "Small": "send"}
    assert statuses(big) == {"Hook": "send", "Small": "invalid"}
    assert "the probe payload is 3" in big.status_of("Small").reason
    assert "over its limit of 2048" in big.status_of("Small").reason
    assert queued == {"Hook": 2, "Small": 1}


async def test_a_payload_of_exactly_the_destinations_limit_is_sent():
    async with make_router("""
        - name: Small
          plugin: probe
          delivery: {batch_bytes: 2048}
    """) as router:
        bare_event = track("Fine", messageId="at-1", properties={"blob": ""})
        (bare,) = router.plan(bare_event).status_of("Small").bodies
        fits = 2048 - len(bare)
        at, over = await router.route_many([
            track("Fine", messageId="at-1", properties={"blob": "x" * fits}),
            track("Fine", messageId="ov-1", properties={"blob": "x" * (fits + 1)})])
    assert len(at.status_of("Small").bodies[0]) == 2048
    assert (statuses(at), statuses(over)) == ({"Small": "send"}, {"Small": "invalid"})


async def test_rejected_and_skipped_events_carry_the_plugin_reason():
    async with make_router(MISBEHAVING) as router:
        result = await router.route(track("Fine"))
    assert "refuses events named 'Fine'" in result.status_of("Picky").reason
    assert result.status_of("Bored").reason == "probe has no meaning for this event"
    assert result.status_of("Quiet").reason


# -- mapping overrides -----------------------------------------------------------------------------

MAPPED = """
    - name: Mapped
      plugin: probe
      mapping:
        event_names:
          Signed Up: signup
          Order Completed: purchase
        properties:
          total_cents: "{{ (event.properties.revenue * 100) | int }}"
          label: "{{ event.event | upper }}"
    - name: Plain
      plugin: probe
"""


async def test_mapping_event_names_and_properties_are_applied():
    async with make_router(MAPPED) as router:
        result = await router.route(track("Order Completed", properties={"revenue": "25.50",
                                                                          "sku": "A"}))
        unmapped = await router.route(track("Viewed", properties={"revenue": 1}))
    mapped = result.status_of("Mapped").payloads[0].body
    assert mapped["event"] == "purchase"
    assert mapped["properties"]["total_cents"] == "2550"
    assert mapped["properties"]["label"] == "ORDER COMPLETED"
    assert mapped["properties"]["sku"] == "A" and mapped["properties"]["revenue"] == 25.5
    plain = result.status_of("Plain").payloads[0].body
    assert plain["event"] == "Order Completed"
    assert "total_cents" not in plain["properties"]
    assert unmapped.status_of("Mapped").payloads[0].body["event"] == "Viewed"


async def test_mapping_template_failure_is_invalid_for_that_destination():
    async with make_router(MAPPED) as router:
        result = await router.route({"type": "identify", "userId": "u-1"})  # no revenue
    assert result.status_of("Mapped").status is Status.INVALID
    assert "mapping.properties" in result.status_of("Mapped").reason
    assert result.status_of("Plain").status is Status.SEND


async def test_mapping_on_the_webhook_changes_the_body_it_sends():
    async with make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/in"}
          mapping:
            event_names: {Signed Up: signup}
    """) as router:
        result = await router.route(track("Signed Up", messageId="w-1"))
        (request,) = router.requests_for(result.status_of("Hook"))
    body = json.loads(request.body)
    assert body["event"] == "signup" and body["messageId"] == "w-1"


# -- what is queued --------------------------------------------------------------------------------

async def test_queued_jobs_are_in_storage_after_route():
    async with make_router(STANDARD) as router:
        assert await pending(router) == {}
        await router.route(track("Order Completed", messageId="q-1",
                                 properties={"revenue": "9.5"}))
        await router.route({"type": "identify", "userId": "u-9", "messageId": "q-2"})
        assert await pending(router) == {"Hook": 2, "Orders": 1, "Identities": 1}
        jobs = await router.storage.lease("Orders", 10, now=time.time() + 1, lease_for=60)
    (job,) = jobs
    assert job.message_id == "q-1" and job.user_key == "u-1"
    body = json.loads(job.body)
    assert body["event"] == "Order Completed"
    assert body["properties"] == {"revenue": 9.5, "currency": "USD"}


async def test_a_queued_body_takes_about_its_own_size_in_memory():
    """``orjson.dumps`` hands back a buffer of at least 4 KB: kept as it is, each body queued
    in ``memory://`` held eight times its 500 bytes."""
    import tracemalloc

    async with make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/all"}
    """) as router:
        events = [track(messageId=f"m-{n}", properties={"note": "x" * 300})
                  for n in range(1_000)]
        await router.route_many(events[:10])  # what happens once, before counting
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await router.route_many(events[10:])
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        jobs = await router.storage.lease("Hook", 2_000, now=time.time() + 1, lease_for=60)
    body_bytes = sum(len(job.body) for job in jobs[10:])
    assert len(jobs) == 1_000 and 400 < body_bytes / 990 < 1_000
    # each job's body, its fields and the dedup entry: well under the 4 KB a buffer held
    assert held / 990 < 2.5 * body_bytes / 990, f"{held / 990:.0f} bytes a queued job"


def test_the_storage_is_handed_whole_jobs_for_one_payload_and_for_several():
    """``_acceptances`` makes a destination's one job, and each acceptance, without calling
    their class (for speed): each must be the very ``NewJob``/``Acceptance`` the class's
    constructor makes, every field set (a field added to either and left unset here fails
    the comparison), beside the jobs of a destination with several payloads."""
    router = make_router("""
        - name: One
          plugin: probe
          delivery: {ordered: true}
        - name: Two
          plugin: probe
          settings: {behaviour: pair}
        - name: Skips
          plugin: probe
          settings: {behaviour: skip}
    """)
    received = datetime.now(UTC)
    results = [router.plan(track(messageId="j-1"), received_at=received),
               router.plan({"type": "page", "anonymousId": "anon-2", "messageId": "j-2"},
                           received_at=received)]
    acceptances = routing._acceptances(results, "web", router._queued_as)
    expected = []
    for result, user in zip(results, ["u-1", "anon-2"]):
        one, two, _ = result.results
        expected.append(Acceptance("web", result.message_id, [
            NewJob("One", result.message_id, user, queued_group("probe", ""), one.bodies[0],
                   True),
            NewJob("Two", result.message_id, user, queued_group("probe", "import"),
                   two.bodies[0], False),
            NewJob("Two", result.message_id, user, queued_group("probe", "engage"),
                   two.bodies[1], False)]))
    assert acceptances == expected
    assert [type(a) for a in acceptances] == [Acceptance, Acceptance]
    assert {type(job) for a in acceptances for job in a.jobs} == {NewJob}
    assert [dataclasses.astuple(a) for a in acceptances] == \
        [dataclasses.astuple(a) for a in expected]


async def test_nothing_is_queued_for_skipped_or_invalid_destinations():
    async with make_router(MISBEHAVING) as router:
        await router.route(track("Fine"))
        assert set(await pending(router)) == {"Hook", "Crashy"}


async def test_plan_touches_no_storage():
    router = make_router(STANDARD)
    result = router.plan(track(messageId="p-1"))
    assert statuses(result)["Hook"] == "send"
    async with router:
        assert await pending(router) == {}
        assert statuses(await router.route(track(messageId="p-1")))["Hook"] == "send"


class BadlyNamed(Probe):
    plugin_name = "beacon-two"  # not an identifier


class Impostor(Probe):
    plugin_name = "webhook"  # taken by the built-in


class BrokenPlugins:
    @hookimpl
    def router_register_destinations(self, register):
        register(BadlyNamed)


class ClashingPlugin:
    @hookimpl
    def router_register_destinations(self, register):
        register(Impostor)


def test_a_broken_plugin_package_breaks_only_the_configs_that_use_it():
    registry = create_registry(extra_plugins=(BrokenPlugins(), ClashingPlugin(), ProbePlugin()))
    assert registry.get("webhook").package == "event-router"  # the built-in kept its name
    assert registry.get("probe").cls is Probe
    text = "storage: memory://\ndestinations:\n  - {name: a, plugin: webhook, " \
           "settings: {url: 'https://hooks.example/a'}}\n"
    Router(parse_config(text, env={}), registry=registry, deliver=False)  # starts
    with pytest.raises(ConfigError) as raised:
        registry.get("beacon_two")
    message = str(raised.value)
    assert "unknown plugin 'beacon_two'" in message
    assert "needs a plugin_name that is an identifier" in message
    assert "'webhook'" in message and "already registered" in message


# -- what an embedding service hands in (embedding audit) ------------------------------------

async def test_an_event_changed_after_routing_is_routed_as_it_is_now():
    # The event kept what the last route built from it (its JSON form, its serialized body):
    # changed and routed again, it sent the old body, and the new messageId was lost.
    from router import parse_event
    router = make_router("""
        - name: Hook
          plugin: webhook
          settings: {url: "https://hooks.example/all"}
    """)
    event = parse_event({"type": "track", "event": "First", "userId": "u-1",
                         "messageId": "ev-1"})
    async with router:
        first = await router.route(event)
        event.messageId, event.event = "ev-2", "Second"
        second = await router.route(event)
    bodies = [json.loads(result.results[0].bodies[0]) for result in (first, second)]
    assert [(body["messageId"], body["event"]) for body in bodies] == [
        ("ev-1", "First"), ("ev-2", "Second")]


async def test_any_mapping_is_an_event_not_only_a_dict():
    from types import MappingProxyType
    router = make_router(STANDARD)
    result = router.plan(MappingProxyType({"type": "track", "event": "Order Done",
                                           "userId": "u-1", "messageId": "mp-1"}))
    assert result.event is not None and result.status_of("Hook").status == Status.SEND


def test_the_router_and_its_config_are_importable_from_the_package():
    import router as package
    assert package.Router is Router and package.Status is Status
    assert package.parse_config is parse_config
    assert {"Router", "RouteResult", "parse_config", "load_config"} <= set(package.__all__)


def test_translate_answers_are_checked_the_same_on_the_fast_path_and_off_it():
    # checked_payloads lets the usual list of Payload through without calling
    # payloads_problem; what it refuses, and the subclasses it takes, are as before.
    class Group(str):
        pass

    class MyPayload(Payload):
        pass

    usual = [Payload({"a": 1}), Payload({"b": 2}, "g")]
    assert checked_payloads(usual) is usual
    for accepted in ([Payload({}, Group("g"))], [MyPayload({})], (Payload({}),), []):
        assert checked_payloads(accepted) is accepted
    for refused, says in (([Payload({}), ({}, "")], "item 1 "),
                          ([Payload({}, 3)], "item 0 "),  # type: ignore[arg-type]
                          ((p for p in usual), "generator, not a list of Payload")):
        with pytest.raises(TypeError, match=f"translate returned {says}"):
            checked_payloads(refused)
