"""The Amplitude destination, as behaviour: the event that goes in, the request that comes out."""

from __future__ import annotations

import json
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router import (EventRejected, HttpResponse, Payload, PermanentError, RetryableError,
                    SkipEvent, parse_event)
from router.registry import create_registry
from router.testing import DestinationHarness
from router.testing import conformance_test, requests_from, shown
from router_plugins.amplitude.destination import Amplitude, AmplitudeSettings

RECEIVED = datetime(2026, 11, 20, 14, 3, 12, tzinfo=UTC)
RECEIVED_MS = 1795183392000
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
API_KEY = "amp-api-key-0001"
SECRET_KEY = "amp-secret-key-0001"
BASIC = "Basic YW1wLWFwaS1rZXktMDAwMTphbXAtc2VjcmV0LWtleS0wMDAx"  # api key:secret key
JSON = {"Content-Type": "application/json"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def amplitude(**settings: Any) -> Amplitude:
    return Amplitude(AmplitudeSettings(api_key=API_KEY, **settings))


def translate(destination: Amplitude, raw: dict[str, Any], options: dict | None = None,
              **parse: Any) -> list[Payload]:
    return list(destination.translate(parse_event(raw, received_at=RECEIVED, **parse),
                                      options or {}))


def requests(destination: Amplitude, raw: dict[str, Any], options: dict | None = None
             ) -> list[dict[str, Any]]:
    """Every request the event makes, batched by group, with the body decoded."""
    return [shown(request) for request in requests_from(destination,
                                                        translate(destination, raw, options))]


def events(destination: Amplitude, raw: dict[str, Any], options: dict | None = None
           ) -> list[dict[str, Any]]:
    """The Amplitude events the event becomes (the bodies of its payloads)."""
    return [payload.body for payload in translate(destination, raw, options)]


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": "user-1", "messageId": "m-1",
            "timestamp": "2026-11-20T14:03:12.000Z", **fields}


def test_a_device_type_is_the_platform_even_for_analytics_js():
    # "Web" stands in only for a browser event that names no device type.
    raw = track(context={"library": {"name": "analytics.js"}, "device": {"type": "ios"}})
    assert events(amplitude(), raw)[0]["platform"] == "ios"
    assert events(amplitude(), track(context={"library": {"name": "analytics.js"}})
                  )[0]["platform"] == "Web"
    assert "platform" not in events(amplitude(), track(context={"library": {"name": "x"}}))[0]


def test_discovered_through_its_entry_point():
    assert create_registry().get("amplitude").package == "event-router"


# The contract every destination keeps, on the kit's sample events and on events hypothesis
# draws: events with their insert_id; then deletions too, which have no vendor dedup id (a
# deletion job per user is idempotent).
test_conformance = conformance_test(
    Amplitude, settings={"api_key": API_KEY, "group_type": "company"},
    dedup_id=lambda body: body["insert_id"])
test_conformance_with_deletions = conformance_test(
    Amplitude, settings={"api_key": API_KEY, "secret_key": SECRET_KEY, "region": "EU",
                         "use_batch_endpoint": True, "min_id_length": 1})


# --- track ------------------------------------------------------------------------------

def test_track_goes_to_http_v2_with_time_in_ms_and_messageid_as_insert_id():
    assert requests(amplitude(), fixture("course_started")) == [{
        "method": "POST",
        "url": "https://api2.amplitude.com/2/httpapi",
        "headers": JSON,
        "body": {"api_key": API_KEY, "events": [{
            "user_id": "AiUGstSDIg",
            "device_id": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
            "event_type": "Course Started",
            # receive time less the client's clock skew (sentAt - originalTimestamp = 17 ms)
            "time": RECEIVED_MS - 17,
            "insert_id": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
            "platform": "Web",  # analytics.js without a device type
            "language": "en-US",
            "ip": "108.0.78.21",
            "event_properties": {"course_in_series": 1, "course_format": "pass/fail",
                                 "title": "Intro to Customer.io"},
            "user_properties": {
                "$set": {"utm_source": "newsletter", "utm_medium": "email",
                         "utm_campaign": "winter", "utm_term": "courses",
                         "utm_content": "banner"},
                "$setOnce": {"initial_utm_source": "newsletter", "initial_utm_medium": "email",
                             "initial_utm_campaign": "winter", "initial_utm_term": "courses",
                             "initial_utm_content": "banner"}},
        }]},
    }]


def test_insert_id_is_the_same_on_every_translation_of_a_message():
    raw = fixture("order_completed")
    first, second = events(amplitude(), raw), events(amplitude(), raw)
    assert [e["insert_id"] for e in first] == [e["insert_id"] for e in second] == [
        "msg-order-50314b8e9bcf", "msg-order-50314b8e9bcf-product-0",
        "msg-order-50314b8e9bcf-product-1"]


def test_anonymous_event_carries_only_the_device_id():
    (event,) = events(amplitude(), fixture("newsletter_signup"))
    assert event["device_id"] == "anon-7f1c2e"
    assert "user_id" not in event
    assert event["event_properties"] == {"value": 4.5, "list": "weekly"}
    assert "revenue" not in event  # `value` is not revenue


def test_context_device_id_stands_in_when_there_is_no_anonymous_id():
    (event,) = events(amplitude(), track(context={"device": {"id": "device-42",
                                                             "type": "ios"}}))
    assert event["device_id"] == "device-42"
    assert event["platform"] == "ios"


def test_device_and_location_fields_come_from_the_context():
    (event,) = events(amplitude(), track(context={
        "app": {"version": "3.1.0"}, "os": {"name": "iOS", "version": "17.2"},
        "device": {"manufacturer": "Apple", "model": "iPhone15,2", "advertisingId": "ad-1234"},
        "network": {"carrier": "T-Mobile"}, "locale": "de-DE",
        "location": {"country": "Germany", "city": "Berlin", "latitude": 52.5,
                     "longitude": 13.4}}))
    assert {key: event[key] for key in (
        "app_version", "os_name", "os_version", "device_manufacturer", "device_model",
        "carrier", "language", "country", "city", "location_lat", "location_lng", "idfa")} == {
        "app_version": "3.1.0", "os_name": "iOS", "os_version": "17.2",
        "device_manufacturer": "Apple", "device_model": "iPhone15,2", "carrier": "T-Mobile",
        "language": "de-DE", "country": "Germany", "city": "Berlin", "location_lat": 52.5,
        "location_lng": 13.4, "idfa": "ad-1234"}


# --- money and products ------------------------------------------------------------------

def test_order_completed_puts_revenue_at_the_root_and_adds_product_purchased_per_product():
    order, monopoly, uno = events(amplitude(), fixture("order_completed"))
    assert order["event_type"] == "Order Completed"
    assert order["revenue"] == 25.0  # "25.00" normalized to a number
    assert order["revenueType"] == "Purchase"
    assert "price" not in order and "quantity" not in order
    # Amplitude's revenue fields include the currency ("Track revenue": "Set the price,
    # quantity, currency, and revenue fields"); it stays a property too
    assert order["currency"] == "EUR"
    assert order["event_properties"]["currency"] == "EUR"
    assert order["event_properties"]["revenue"] == 25.0
    assert len(order["event_properties"]["products"]) == 2
    assert monopoly == {
        "user_id": "user-1042", "event_type": "Product Purchased", "time": 1795183391120,
        "insert_id": "msg-order-50314b8e9bcf-product-0", "ip": "203.0.113.7",
        "event_properties": {"order_id": "50314b8e9bcf000000000000", "currency": "EUR",
                             "product_id": "507f1f77bcf86cd799439011", "sku": "45790-32",
                             "name": "Monopoly: 3rd Edition", "price": 19, "quantity": 1,
                             "category": "Games"}}
    assert "revenue" not in uno  # revenue is counted once, on the order


def test_revenue_per_product_moves_revenue_from_the_order_to_each_product():
    order, monopoly, uno = events(amplitude(track_revenue_per_product=True),
                                  fixture("order_completed"))
    assert "revenue" not in order
    assert {key: monopoly[key] for key in ("revenue", "price", "quantity", "productId",
                                           "revenueType")} == {
        "revenue": 19, "price": 19, "quantity": 1, "productId": "507f1f77bcf86cd799439011",
        "revenueType": "Purchase"}
    assert uno["revenue"] == 6  # price 3 × quantity 2
    assert monopoly["currency"] == uno["currency"] == "EUR"  # the order's


def test_revenue_per_product_keeps_the_orders_revenue_when_no_product_has_a_price():
    order, first, second = events(amplitude(track_revenue_per_product=True), track(
        event="Order Completed", properties={"revenue": 25, "currency": "GBP", "products": [
            {"product_id": "p1", "quantity": 1}, {"product_id": "p2", "name": "B"}]}))
    assert (order["revenue"], order["currency"]) == (25, "GBP")
    assert "revenue" not in first and "revenue" not in second


def test_revenue_per_product_keeps_the_orders_revenue_when_a_product_has_no_price():
    # A gift card without a price: the priced product alone was counted (10 of 30 EUR).
    order, priced, unpriced = events(amplitude(track_revenue_per_product=True), track(
        event="Order Completed", properties={"revenue": 30, "currency": "EUR", "products": [
            {"product_id": "p1", "price": 10, "quantity": 1},
            {"product_id": "p2", "name": "gift card"}]}))
    assert (order["revenue"], order["currency"]) == (30, "EUR")
    assert "revenue" not in priced and "revenue" not in unpriced
    assert priced["event_properties"]["price"] == 10  # still there, as a property


def test_revenue_per_product_counts_the_priced_products_of_an_order_without_revenue():
    # With no revenue on the order there is nothing to keep there: what the products carry
    # is all the revenue known.
    order, priced, unpriced = events(amplitude(track_revenue_per_product=True), track(
        event="Order Completed", properties={"total": 30, "currency": "EUR", "products": [
            {"product_id": "p1", "price": 10}, {"product_id": "p2"}]}))
    assert "revenue" not in order and "revenue" not in unpriced
    assert (priced["revenue"], priced["currency"]) == (10, "EUR")


def test_a_product_without_quantity_counts_its_price_once():
    # Amplitude: "If $quantity isn't present, Amplitude uses 1."
    _, product = events(amplitude(track_revenue_per_product=True), track(
        event="Order Completed", properties={"revenue": 25, "products": [
            {"product_id": "p1", "price": 25}]}))
    assert {key: product[key] for key in ("revenue", "price", "productId")} == {
        "revenue": 25, "price": 25, "productId": "p1"}
    assert "quantity" not in product


def test_a_fractional_quantity_sends_the_revenue_alone():
    # Amplitude's quantity is an integer: 1.5 would be rounded to 2 and price × 2 counted
    (event,) = events(amplitude(), track(event="Product Purchased", properties={
        "revenue": 15, "price": 10, "quantity": 1.5, "product_id": "p1"}))
    assert event["revenue"] == 15.0
    assert not {"price", "quantity"} & event.keys()


def test_only_order_completed_makes_product_purchased_events():
    (checkout,) = events(amplitude(), track(event="Checkout Started", properties={
        "products": [{"product_id": "p1", "price": 3, "quantity": 1}]}))
    assert checkout["event_type"] == "Checkout Started"


def test_product_purchased_events_can_be_turned_off():
    (order,) = events(amplitude(product_purchased_events=False), fixture("order_completed"))
    assert order["revenue"] == 25.0


def test_price_times_quantity_is_the_revenue_as_amplitude_computes_it():
    (event,) = events(amplitude(), track(event="Product Purchased", properties={
        "revenue": 100, "price": 12.5, "quantity": 2, "product_id": "sku-1",
        "revenueType": "Upgrade"}))
    assert {key: event[key] for key in ("revenue", "price", "quantity", "productId",
                                        "revenueType")} == {
        "revenue": 25.0, "price": 12.5, "quantity": 2, "productId": "sku-1",
        "revenueType": "Upgrade"}


def test_negative_revenue_passes_through_as_a_refund():
    (event,) = events(amplitude(), track(event="Order Refunded", properties={"revenue": -25}))
    assert event["revenue"] == -25
    assert event["event_properties"]["currency"] == "USD"  # assumed by the router


def test_a_price_without_revenue_is_not_revenue():
    (event,) = events(amplitude(), track(event="Product Added", properties={
        "product_id": "p1", "price": 9.99, "quantity": 2}))
    assert not {"revenue", "price", "quantity", "productId"} & event.keys()
    assert event["event_properties"] == {"product_id": "p1", "price": 9.99, "quantity": 2}


# --- page, screen, identify, group, alias --------------------------------------------------

def test_named_page_is_viewed_name_with_the_page_fields():
    (event,) = events(amplitude(), {
        "type": "page", "anonymousId": "anon-7f1c2e", "name": "Pricing", "messageId": "p-1",
        "properties": {"url": "https://shop.example/pricing"},
        "context": {"page": {"path": "/pricing", "title": "Pricing",
                             "url": "https://shop.example/old"}}})
    assert event["event_type"] == "Viewed Pricing"
    assert event["event_properties"] == {"path": "/pricing", "title": "Pricing",
                                         "url": "https://shop.example/pricing",
                                         "name": "Pricing"}
    assert event["insert_id"] == "p-1"


def test_unnamed_page_and_screen_are_loaded_a_page_or_screen():
    page = {"type": "page", "userId": "user-1"}
    assert events(amplitude(), page)[0]["event_type"] == "Loaded a Page"
    assert events(amplitude(), {**page, "type": "screen"})[0]["event_type"] == "Loaded a Screen"
    assert events(amplitude(), {**page, "type": "screen", "name": "Home"})[0][
        "event_type"] == "Viewed Home"


def test_identify_with_both_ids_sets_traits_and_merges_device_into_user():
    assert requests(amplitude(), fixture("identify_merge")) == [{
        "method": "POST", "url": "https://api2.amplitude.com/2/httpapi", "headers": JSON,
        "body": {"api_key": API_KEY, "events": [{
            "user_id": "user-1042", "device_id": "anon-7f1c2e", "event_type": "$identify",
            "time": RECEIVED_MS, "insert_id": "msg-identify-1",
            "user_properties": {"$set": {"email": "ada@example.com", "name": "Ada Lovelace",
                                         "plan": "pro"}}}]},
    }]


def test_group_needs_a_group_type():
    group = {"type": "group", "userId": "user-1", "groupId": "acme-inc",
             "traits": {"name": "Acme", "plan": "enterprise"}, "messageId": "g-1"}
    with pytest.raises(SkipEvent, match="group_type"):
        translate(amplitude(), group)
    membership, properties = events(amplitude(group_type="company"), group)
    assert membership == {"user_id": "user-1", "event_type": "$identify",
                          "time": RECEIVED_MS, "insert_id": "g-1-group",
                          "groups": {"company": "acme-inc"},
                          "user_properties": {"$set": {"company": "acme-inc"}}}
    assert properties == {"user_id": "user-1", "event_type": "$groupidentify",
                          "time": RECEIVED_MS, "insert_id": "g-1-groupidentify",
                          "groups": {"company": "acme-inc"},
                          "group_properties": {"$set": {"name": "Acme", "plan": "enterprise"}}}
    (only_membership,) = events(amplitude(), {**group, "traits": {}}, {"group_type": "org"})
    assert only_membership["groups"] == {"org": "acme-inc"}


def test_alias_is_skipped_with_a_reason():
    with pytest.raises(SkipEvent, match="merges a device into a user"):
        translate(amplitude(), {"type": "alias", "userId": "user-1", "previousId": "anon-1"})


# --- semantic events ---------------------------------------------------------------------

def test_delete_person_goes_to_the_user_privacy_api_with_basic_auth():
    assert requests(amplitude(secret_key=SECRET_KEY), fixture("delete_person")) == [{
        "method": "POST", "url": "https://amplitude.com/api/2/deletions/users",
        "headers": {**JSON, "Authorization": BASIC},
        "body": {"user_ids": ["user-1042"], "requester": "event-router",
                 "ignore_invalid_id": "True"},
    }]


def test_user_deleted_in_the_eu_goes_to_the_eu_privacy_host():
    (request,) = requests(amplitude(secret_key=SECRET_KEY, region="eu",
                                    deletion_requester="dpo@example.com"),
                          track(event="User Deleted"))
    assert request["url"] == "https://analytics.eu.amplitude.com/api/2/deletions/users"
    assert request["body"]["requester"] == "dpo@example.com"


def test_delete_without_secret_key_or_user_id_is_skipped():
    with pytest.raises(SkipEvent, match="secret_key"):
        translate(amplitude(), fixture("delete_person"))
    with pytest.raises(SkipEvent, match="only an anonymousId"):
        translate(amplitude(secret_key=SECRET_KEY),
                  {"type": "track", "event": "Delete Person", "anonymousId": "anon-7f1c2e"})


@pytest.mark.parametrize("name", ["Suppress Person", "User Suppressed", "Unsuppress Person"])
def test_suppression_is_skipped(name: str):
    with pytest.raises(SkipEvent, match="Amplitude has no"):
        translate(amplitude(secret_key=SECRET_KEY), track(event=name))


def test_a_deletion_request_carries_at_most_100_users_and_the_rest_go_later():
    destination = amplitude(secret_key=SECRET_KEY)
    payloads = [Payload({"user_id": f"user-{n:03d}"}, "deletions") for n in range(130)]
    request = destination.build_request(payloads)
    assert orjson.loads(request.body)["user_ids"] == [f"user-{n:03d}" for n in range(100)]
    outcomes = destination.read_response(payloads, HttpResponse(200, {}, b'{"status":"staging"}'))
    assert outcomes[:100] == [None] * 100
    assert all(isinstance(o, RetryableError) and o.retry_after == 1.0 for o in outcomes[100:])
    failed = destination.read_response(payloads, HttpResponse(400, {}, b"bad"))
    assert all(isinstance(o, PermanentError) for o in failed[:100])
    assert all(isinstance(o, RetryableError) for o in failed[100:])  # never sent
    assert destination.read_response(payloads[:100], HttpResponse(400, {}, b"")) is None


# --- per-event options and limits ---------------------------------------------------------

def test_session_id_and_groups_come_from_the_events_options():
    (event,) = events(amplitude(), track(), {"session_id": 1795183000000,
                                             "groups": {"company": "acme", "team": ["a", "b"]}})
    assert event["session_id"] == 1795183000000
    assert event["groups"] == {"company": "acme", "team": ["a", "b"]}
    (event,) = events(amplitude(), track(), {"session_id": "1795183000000"})
    assert event["session_id"] == 1795183000000


@pytest.mark.parametrize(("given", "sent"), [
    (1795183000, 1795183000000),  # seconds, which Amplitude would read as January 1970
    ("1795183000", 1795183000000),
    (1795183000000.0, 1795183000000),  # a whole number written as a float is one
    (1795183000.0, 1795183000000),
    (-1, -1), (0, 0), (42, 42),  # no session, and ids that are not times, as they are
])
def test_a_session_start_in_seconds_is_sent_in_milliseconds(given, sent):
    (event,) = events(amplitude(), track(), {"session_id": given})
    assert event["session_id"] == sent


def test_groups_up_to_the_limits_amplitude_tracks_are_sent():
    groups = {"t0": [f"v{n}" for n in range(6)], **{f"t{n}": "x" for n in range(1, 5)}}
    (event,) = events(amplitude(), track(), {"groups": groups})  # 5 types, 10 values
    assert event["groups"] == groups  # one more of either is refused (below)


@pytest.mark.parametrize("options, message", [
    ({"session_id": "yesterday"}, "session_id"),
    ({"session_id": True}, "session_id"),
    ({"session_id": 1795183000000.5}, "session_id"),
    ({"session_id": "\u00b2"}, "session_id"),  # a digit to str.isdigit, not to int()
    ({"groups": ["acme"]}, "groups"),
    ({"groups": {"company": {"name": "acme"}}}, "groups"),  # a name is a string or a list
    ({"groups": {"company": 42}}, "groups"),
    ({"groups": {f"type{n}": "x" for n in range(6)}}, "at most 5 types"),
    ({"groups": {"team": [f"t{n}" for n in range(11)]}}, "10 values"),
])
def test_bad_options_reject_the_event(options: dict, message: str):
    with pytest.raises(EventRejected, match=message):
        translate(amplitude(), track(), options)


def test_ids_shorter_than_five_characters_are_rejected_unless_min_id_length_allows():
    with pytest.raises(EventRejected, match="user_id is 2 characters.*min_id_length"):
        translate(amplitude(), track(userId="u1"))
    with pytest.raises(EventRejected, match="device_id is 3 characters"):
        translate(amplitude(), {"type": "track", "event": "x", "anonymousId": "a-1"})
    (request,) = requests(amplitude(min_id_length=2), track(userId="u1"))
    assert request["body"]["options"] == {"min_id_length": 2}
    assert request["body"]["events"][0]["user_id"] == "u1"


@pytest.mark.parametrize("name", ["$identify", "$groupidentify", "[Amplitude] Start Session",
                                  "[Amplitude] Revenue"])
def test_reserved_event_names_are_rejected(name: str):
    with pytest.raises(EventRejected, match="reserves"):
        translate(amplitude(), track(event=name))


def test_properties_nested_deeper_than_40_levels_are_rejected():
    nested: dict[str, Any] = {}
    for _ in range(41):
        nested = {"n": nested}
    with pytest.raises(EventRejected, match="deeper than 40"):
        translate(amplitude(), track(properties=nested))


@pytest.mark.parametrize("levels", [40, 41])
def test_forty_levels_of_objects_and_arrays_pass_and_forty_one_do_not(levels):
    value: Any = "leaf"
    for level in range(levels - 1):  # the properties object is the first level
        value = [1, value] if level % 2 else {"flat": 1, "n": value}
    event = track(properties={"n": value})
    if levels > 40:
        with pytest.raises(EventRejected, match="deeper than 40"):
            translate(amplitude(), event)
    else:
        assert translate(amplitude(), event)


def test_an_event_too_big_for_one_request_is_rejected_before_sending():
    big = track(properties={"blob": "x" * 1_000_000})
    with pytest.raises(EventRejected, match="over its limit of 990000"):
        DestinationHarness(Amplitude, amplitude().settings).payloads(
            parse_event(big, max_bytes=2_000_000))


# --- endpoints and settings ---------------------------------------------------------------

@pytest.mark.parametrize("settings, url", [
    ({}, "https://api2.amplitude.com/2/httpapi"),
    ({"region": "EU"}, "https://api.eu.amplitude.com/2/httpapi"),
    ({"use_batch_endpoint": True}, "https://api2.amplitude.com/batch"),
    ({"region": "eu", "use_batch_endpoint": True}, "https://api.eu.amplitude.com/batch"),
    ({"base_url": "http://127.0.0.1:9900/amp/"}, "http://127.0.0.1:9900/amp/2/httpapi"),
])
def test_where_events_go(settings: dict, url: str):
    assert requests(amplitude(**settings), track())[0]["url"] == url


def test_base_url_also_takes_deletions_and_is_checked_by_the_egress_policy():
    destination = amplitude(secret_key=SECRET_KEY, base_url="http://127.0.0.1:9900")
    assert requests(destination, fixture("delete_person"))[0]["url"] == \
        "http://127.0.0.1:9900/api/2/deletions/users"
    assert destination.endpoints() == ("http://127.0.0.1:9900",)
    assert amplitude().endpoints() == ()


@pytest.mark.parametrize("settings, message", [
    ({"api_key": API_KEY, "region": "APAC"}, "expected US or EU"),
    ({"api_key": API_KEY, "base_url": "api2.amplitude.com"}, "http:// or https://"),
    ({"api_key": API_KEY, "min_id_length": 0}, "greater than or equal to 1"),
    ({"api_key": API_KEY, "apikey": "typo"}, "Extra inputs are not permitted"),
    ({}, "api_key"),
])
def test_settings_errors_say_what_was_expected(settings: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        AmplitudeSettings.model_validate(settings)


def test_every_setting_is_documented():
    assert all(info.description for info in AmplitudeSettings.model_fields.values())


def test_secrets_never_reach_a_payload_body_only_the_request():
    destination = amplitude(secret_key=SECRET_KEY, group_type="company")
    raws = [fixture(name) for name in ("course_started", "order_completed", "identify_merge",
                                       "newsletter_signup", "delete_person")]
    raws.append({"type": "group", "userId": "user-1", "groupId": "acme", "traits": {"a": 1}})
    for raw in raws:
        payloads = translate(destination, raw)
        for payload in payloads:
            stored = orjson.dumps(payload.body).decode()
            assert API_KEY not in stored and SECRET_KEY not in stored
        request = destination.build_request(payloads[:1])
        assert API_KEY in request.body.decode() or "Authorization" in request.headers


# --- responses ----------------------------------------------------------------------------

def batch(count: int) -> list[Payload]:
    return [Payload({"user_id": f"user-{n}", "device_id": f"device-{n}",
                     "event_type": "x", "insert_id": f"m-{n}"}, "events")
            for n in range(count)]


def answer(status: int, body: dict) -> HttpResponse:
    return HttpResponse(status, {"Content-Type": "application/json"}, orjson.dumps(body))


def test_400_fails_only_the_named_events_and_sends_the_rest_again():
    outcomes = amplitude().read_response(batch(5), answer(400, {
        "code": 400, "error": "Invalid field values on some events",
        "events_with_invalid_fields": {"time": [1]},
        "events_with_missing_fields": {"event_type": [3]},
        "events_with_invalid_id_lengths": {"user_id": [3]}}))
    assert [type(o) for o in outcomes] == [RetryableError, PermanentError, RetryableError,
                                           PermanentError, RetryableError]
    assert outcomes[1].reason == "Amplitude refused the event: invalid time"
    assert outcomes[3].reason == ("Amplitude refused the event: missing event_type, "
                                  "user_id too short")
    assert outcomes[0].retry_after is None
    assert "other events" in outcomes[0].reason


def test_400_with_silenced_devices_fails_their_events_and_waits_for_throttled_ones():
    outcomes = amplitude().read_response(batch(4), answer(400, {
        "code": 400, "error": "Events silenced for device_id",
        "silenced_devices": ["device-2"], "silenced_events": [0],
        "throttled_events": [3], "throttled_devices": {"device-3": 100}}))
    assert [type(o) for o in outcomes] == [PermanentError, RetryableError, PermanentError,
                                           RetryableError]
    assert "silenced" in outcomes[2].reason
    assert outcomes[3].retry_after == 30


def test_400_for_the_whole_request_is_left_to_the_status():
    destination = amplitude()
    assert destination.read_response(batch(3), answer(400, {
        "code": 400, "error": "Request missing required field", "missing_field": "api_key"})
    ) is None
    assert destination.read_response(batch(3), answer(400, {
        "code": 400, "error": "Invalid API key"})) is None
    assert destination.read_response(batch(3), HttpResponse(400, {}, b"not json")) is None


def test_429_pauses_only_the_throttled_users_and_devices_for_30_seconds():
    outcomes = amplitude().read_response(batch(4), answer(429, {
        "code": 429, "error": "Too many requests for some devices and users",
        "eps_threshold": 30, "throttled_users": {"user-1": 32},
        "throttled_devices": {"device-2": 31}, "throttled_events": [1, 2]}))
    assert all(isinstance(o, RetryableError) for o in outcomes)
    assert [o.retry_after for o in outcomes] == [None, 30, 30, None]
    assert not any(o.pause_destination for o in outcomes)  # the others' events go on
    assert "other users or devices" not in outcomes[1].reason


def test_429_over_the_daily_quota_fails_those_events():
    outcomes = amplitude().read_response(batch(2), answer(429, {
        "code": 429, "throttled_users": {"user-0": 40},
        "exceeded_daily_quota_users": {"user-0": 500001}}))
    assert isinstance(outcomes[0], PermanentError)
    assert "daily event quota" in outcomes[0].reason
    assert isinstance(outcomes[1], RetryableError)


def test_429_that_names_nobody_and_success_are_left_to_the_status():
    destination = amplitude()
    assert destination.read_response(batch(2), answer(429, {"code": 429})) is None
    assert destination.read_response(batch(2), answer(200, {
        "code": 200, "events_ingested": 2, "payload_size_bytes": 120,
        "server_upload_time": 1396381378123})) is None
    assert destination.read_response(batch(2), HttpResponse(503, {"Retry-After": "5"})) is None


def test_an_amplitude_throttle_index_out_of_range_is_ignored():
    outcomes = amplitude().read_response(batch(2), answer(429, {"throttled_events": [7, "x"]}))
    assert outcomes is None
    # A 400 naming no event of the request by a valid index is judged by its status too.
    refused = answer(400, {"events_with_invalid_fields": {"time": [7, -1, "0", True]},
                           "silenced_events": [2]})
    assert amplitude().read_response(batch(2), refused) is None


def test_a_429_naming_only_a_throttled_device_holds_back_that_devices_events():
    events = [payload.body for payload in batch(2)]
    outcomes = amplitude().read_response(batch(2), answer(429, {
        "throttled_devices": {events[1]["device_id"]: 31}}))
    assert outcomes[0].caused_by_others and outcomes[0].retry_after is None
    assert outcomes[1].retry_after == 30.0 and not outcomes[1].caused_by_others

