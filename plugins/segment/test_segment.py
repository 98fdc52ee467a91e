"""Segment forwarder: the event that goes in, the ``/v1/batch`` request that comes out."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import DestinationHarness, conformance_test
from router import EventRejected, HttpResponse, Payload, PermanentError, parse_event
from router.registry import create_registry
from router_plugins.segment.destination import Segment, SegmentSettings

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
RECEIVED = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
WRITE_KEY = "wk_SECRET_5d1e77"


def segment(**settings: Any) -> Segment:
    return Segment(SegmentSettings.model_validate({"write_key": WRITE_KEY, **settings}))


def event(raw: dict[str, Any], **kwargs: Any):
    return parse_event(raw, received_at=RECEIVED, **kwargs)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def forwarded(raw: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    (payload,) = segment().translate(event(raw), options or {})
    return payload.body


def test_discovered_through_its_entry_point():
    assert create_registry().get("segment").cls is Segment


def test_events_go_to_the_batch_endpoint_with_the_write_key_as_user_name():
    adapter = segment()
    payloads = [*adapter.translate(event(fixture("identify_merge.json")), {}),
                *adapter.translate(event(fixture("delete_person.json")), {})]
    request = adapter.build_request(payloads)

    assert (request.method, request.url) == ("POST", "https://api.segment.io/v1/batch")
    assert request.headers == {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    assert orjson.loads(request.body or b"") == {"batch": [
        {"type": "identify", "messageId": "msg-identify-1",
         "timestamp": "2024-03-01T12:00:00.000Z",
         "userId": "user-1042", "anonymousId": "anon-7f1c2e",
         "traits": {"email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro"}},
        # A semantic event goes on unchanged: the next hop runs its delete.
        {"type": "track", "messageId": "msg-delete-1", "event": "Delete Person",
         "timestamp": "2024-03-01T12:00:00.000Z", "userId": "user-1042"},
    ]}
    # each call type carries its own map only, as client libraries send them


def test_base_url_points_it_at_customerio_data_pipelines_or_another_router():
    assert segment(base_url="https://cdp.customer.io").build_request(
        [Payload({"type": "track"})]).url == "https://cdp.customer.io/v1/batch"
    other = segment(base_url="http://127.0.0.1:8088/")
    assert other.endpoints() == ("http://127.0.0.1:8088/v1/batch",)


@pytest.mark.parametrize("raw", [
    {"type": "track", "event": "Signed Up", "userId": "u1", "properties": {"plan": "pro"}},
    {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com"}},
    {"type": "page", "anonymousId": "a1", "name": "Pricing", "properties": {"url": "https://x"}},
    {"type": "screen", "userId": "u1", "name": "Home"},
    {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"seats": 5}},
    {"type": "alias", "userId": "u1", "previousId": "a1"},
])
def test_all_six_call_types_go_on_as_the_normalized_event(raw):
    parsed = event({**raw, "messageId": "m-1"})
    normalized = {field: value for field, value in parsed.to_dict().items()
                  if field != "receivedAt" and value != {}}  # the next hop sets its own
    assert forwarded({**raw, "messageId": "m-1"}) == normalized


def test_empty_properties_traits_and_context_are_left_to_the_next_hop():
    # Each byte counts against the next hop's 32 KB an event; it reads them as empty itself.
    identify = forwarded({"type": "identify", "userId": "u1", "traits": {}, "context": {}})
    track = forwarded({"type": "track", "event": "E", "userId": "u1", "properties": {}})
    group = forwarded({"type": "group", "userId": "u1", "groupId": "g1", "traits": {}})
    assert not {"traits", "context"} & identify.keys()
    assert not {"properties", "context"} & track.keys()
    assert "traits" not in group
    # Maps with something in them go on.
    assert forwarded({"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}
                     )["traits"] == {"plan": "pro"}


def test_reserved_properties_go_on_normalized_and_products_untouched():
    body = forwarded(fixture("order_completed.json"))
    assert body["properties"]["revenue"] == 25.0  # "25.00" became a number
    assert body["properties"]["currency"] == "EUR"  # "eur" became upper case
    given = fixture("order_completed.json")["properties"]["products"]
    assert body["properties"]["products"] == given
    assert body["integrations"] == {"All": True, "Slack": False,
                                    "Mixpanel": {"project_token_override": "abc"}}


def test_value_and_the_anonymous_id_go_on_for_anonymous_events():
    body = forwarded(fixture("newsletter_signup.json"))
    assert body["anonymousId"] == "anon-7f1c2e" and "userId" not in body
    assert body["properties"] == {"value": 4.5, "list": "weekly"}


def test_the_message_id_goes_on_so_the_next_hop_drops_retries():
    adapter = segment()
    parsed = event(fixture("order_completed.json"))
    first, again = (adapter.translate(parsed, {})[0].body for _ in range(2))
    assert first == again
    assert first["messageId"] == "msg-order-50314b8e9bcf"


def test_the_next_hop_sees_the_corrected_time_not_the_first_clients_clock():
    # The client's clock ran 10 minutes fast; this hop corrected it from sentAt.
    raw = {"type": "track", "event": "E", "userId": "u1",
           "originalTimestamp": "2024-03-01T12:10:00.000Z", "sentAt": "2024-03-01T12:10:01.000Z"}
    body = forwarded(raw)
    assert body["timestamp"] == "2024-03-01T11:59:59.000Z"
    assert "sentAt" not in body and "originalTimestamp" not in body

    # An hour later (a retry), the next router takes the timestamp as it is.
    next_hop = parse_event(body, received_at=RECEIVED + timedelta(hours=1))
    assert next_hop.timestamp == datetime(2024, 3, 1, 11, 59, 59, tzinfo=UTC)
    assert next_hop.messageId == body["messageId"]


def test_an_event_just_under_32_kb_as_sent_is_forwarded():
    # receivedAt and an empty context took it over the next hop's limit (router chaining
    # audit): the client got a 200, and the event reached no destination of the next hop.
    raw = {"type": "track", "event": "E", "userId": "u1", "messageId": "m-1",
           "timestamp": "2024-03-01T12:00:00.000Z", "properties": {"blob": ""}}
    raw["properties"]["blob"] = "x" * (32_768 - len(orjson.dumps(raw)))
    assert len(orjson.dumps(raw)) == 32_768
    (payload,) = DestinationHarness(Segment, segment().settings).payloads(event(raw))
    assert len(orjson.dumps(payload.body)) <= 32_768


def test_an_event_over_32_kb_once_normalized_is_rejected_before_it_sinks_a_batch():
    big = {"type": "track", "event": "E", "userId": "u1", "properties": {"blob": "x" * 33_000}}
    with pytest.raises(EventRejected, match="segment payload is 33.* over its limit of 32768"):
        DestinationHarness(Segment, segment().settings).payloads(event(big, max_bytes=64 * 1024))


def test_options_change_nothing_the_integrations_map_goes_on_as_is():
    raw = {"type": "track", "event": "E", "userId": "u1",
           "integrations": {"All": False, "segment": {"note": "x"}}}
    assert forwarded(raw, {"note": "x"})["integrations"] == {"All": False,
                                                             "segment": {"note": "x"}}


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "field", "message"), [
    ({"base_url": "api.segment.io"}, ("base_url",), "http:// or https://"),
    ({"writeKey": "x"}, ("writeKey",), "Extra inputs are not permitted"),
])
def test_settings_errors_name_the_field(settings, field, message):
    with pytest.raises(ValidationError) as caught:
        SegmentSettings.model_validate({"write_key": WRITE_KEY, **settings})
    (error,) = caught.value.errors()
    assert error["loc"] == field and message in error["msg"]


def test_the_write_key_is_secret_and_never_in_a_body():
    assert all(field.description for field in SegmentSettings.model_fields.values())
    with pytest.raises(ValidationError):
        SegmentSettings.model_validate({})
    assert WRITE_KEY not in repr(segment().settings)
    for name in ("course_started.json", "order_completed.json", "identify_merge.json",
                 "delete_person.json", "newsletter_signup.json"):
        assert WRITE_KEY not in orjson.dumps(forwarded(fixture(name))).decode()


# --- responses --------------------------------------------------------------------------------

PAYLOADS = [Payload({"n": n}) for n in range(3)]


@pytest.mark.parametrize("response", [
    HttpResponse(200, {}, b"{}"),
    HttpResponse(200, {}, b'{"success": true}'),
    HttpResponse(400, {}, b'{"success": false, "code": "invalid_json"}'),
    HttpResponse(429, {"Retry-After": "5"}, b""),
    HttpResponse(502, {}, b"<html>bad gateway</html>"),
])
def test_whole_batch_answers_are_judged_by_status(response):
    assert segment().read_response(PAYLOADS, response) is None


def test_a_router_next_hop_rejecting_some_events_fails_only_those():
    response = HttpResponse(200, {}, orjson.dumps({"success": True, "rejected": [
        {"index": 1, "reason": "event: required for a track call"}]}))
    outcomes = segment().read_response(PAYLOADS, response)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentError)
    assert outcomes[1].reason == ("the next hop rejected the event: "
                                  "event: required for a track call")


def test_a_router_next_hop_rejecting_all_events_fails_each_with_its_reason():
    response = HttpResponse(400, {}, orjson.dumps({"success": False, "code": "no_valid_event",
                                                   "rejected": [{"index": i, "reason": f"r{i}"}
                                                                for i in range(3)]}))
    outcomes = segment().read_response(PAYLOADS, response)
    assert [outcome.reason for outcome in outcomes] == [
        f"the next hop rejected the event: r{i}" for i in range(3)]


def test_a_next_hop_refusing_a_batch_while_naming_only_some_events_is_judged_by_status():
    # A 4xx that names some events refused says nothing of the others: they were not
    # accepted, so the whole answer is judged by its status, none counted delivered.
    response = HttpResponse(400, {}, orjson.dumps({"rejected": [{"index": 1, "reason": "r"}]}))
    assert segment().read_response(PAYLOADS, response) is None


def test_a_rejection_without_a_reason_says_so():
    response = HttpResponse(200, {}, orjson.dumps({"rejected": [{"index": 0}]}))
    outcomes = segment().read_response(PAYLOADS, response)
    assert outcomes[0].reason == "the next hop rejected the event: no reason given"
    assert outcomes[1:] == [None, None]


def test_rejections_that_name_no_event_are_ignored_and_the_others_still_fail():
    response = HttpResponse(200, {}, orjson.dumps({"rejected": [
        "junk", {"index": "1", "reason": "text index"}, {"reason": "no index"},
        {"index": 2, "reason": "r2"}]}))
    outcomes = segment().read_response(PAYLOADS, response)
    assert outcomes[:2] == [None, None]
    assert outcomes[2].reason == "the next hop rejected the event: r2"
    # A refusal whose entries name no event by its index is judged by its status: none of
    # its events is taken for delivered.
    refused = HttpResponse(400, {}, orjson.dumps({"rejected": [
        {"index": str(n), "reason": "text index"} for n in range(3)]}))
    assert segment().read_response(PAYLOADS, refused) is None


def test_a_refusal_naming_events_outside_the_request_counts_no_other_event_delivered():
    # A 400 that names two of three events, and one index the request does not have, has
    # not named the third: it was refused with the batch, never taken for delivered.
    response = HttpResponse(400, {}, orjson.dumps({"rejected": [
        {"index": 0, "reason": "r0"}, {"index": 1, "reason": "r1"},
        {"index": 3, "reason": "r3"}, {"index": -1, "reason": "r-1"}]}))
    assert segment().read_response(PAYLOADS, response) is None
    # Nor does a 200 fail an event it did not name.
    accepted = HttpResponse(200, {}, orjson.dumps({"rejected": [
        {"index": 3, "reason": "r3"}, {"index": -1, "reason": "r-1"},
        {"index": True, "reason": "a boolean"}]}))
    assert segment().read_response(PAYLOADS, accepted) == [None, None, None]


def test_delivery_limits_follow_the_tracking_api():
    assert Segment.delivery.batch_size == 100
    assert Segment.delivery.rate_limit == 50  # the rate Segment asks senders to stay under
    assert Segment.delivery.batch_bytes + len(b'{"batch":[]}') == 500_000
    assert {429, 500, 503} <= Segment.delivery.retry_on


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    Segment, settings={"write_key": "segment-write-key-0001"},
    examples=100)
