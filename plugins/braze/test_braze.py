"""The Braze destination, as behaviour: the event that goes in, the request that comes out."""

from __future__ import annotations

import json
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import conformance_test, requests_from, shown
from router import (EventRejected, HttpResponse, Payload, PermanentError, RetryableError,
                    SkipEvent, parse_event)
from router.registry import create_registry
from router_plugins.braze.destination import Braze, BrazeSettings

RECEIVED = datetime(2026, 11, 20, 14, 3, 12, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
API_KEY = "braze-rest-key-0001"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
TRACK_URL = "https://rest.iad-01.braze.com/users/track"
ANONYMOUS = {"alias_name": "anon-7f1c2e", "alias_label": "anonymous_id"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def braze(**settings: Any) -> Braze:
    return Braze(BrazeSettings(api_key=API_KEY, **settings))


def translate(destination: Braze, raw: dict[str, Any], options: dict | None = None):
    return destination.translate(parse_event(raw, received_at=RECEIVED), options or {})


def requests(destination: Braze, raw: dict[str, Any], options: dict | None = None
             ) -> list[dict[str, Any]]:
    """Every request the event makes, batched by group, with the body decoded."""
    return [shown(request) for request in requests_from(destination,
                                                        translate(destination, raw, options))]


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": "user-1", "messageId": "m-1",
            "timestamp": "2026-11-20T14:03:12.000Z", **fields}


def test_discovered_through_its_entry_point():
    assert create_registry().get("braze").package == "event-router"


# --- track and purchases ----------------------------------------------------------------

def test_track_is_a_custom_event_with_iso_time():
    assert requests(braze(), fixture("course_started")) == [{
        "method": "POST", "url": TRACK_URL, "headers": HEADERS,
        "body": {"events": [{
            "external_id": "AiUGstSDIg", "_update_existing_only": False,
            "name": "Course Started",
            "time": "2026-11-20T14:03:11.983Z",  # receive time less the client's 17 ms skew
            "properties": {"course_in_series": 1, "course_format": "pass/fail",
                           "title": "Intro to Customer.io"}}]},
    }]


def test_anonymous_events_name_the_user_by_an_alias_that_braze_may_create():
    (request,) = requests(braze(update_existing_only=True), fixture("newsletter_signup"))
    assert request["body"] == {"events": [{
        "user_alias": ANONYMOUS, "_update_existing_only": False,
        "name": "Newsletter Signed Up", "time": "2026-11-20T14:03:12.000Z",
        "properties": {"value": 4.5, "list": "weekly"}}]}


def test_order_completed_is_one_purchase_per_product():
    (request,) = requests(braze(app_id="app-1"), fixture("order_completed"))
    order = {"order_id": "50314b8e9bcf000000000000", "coupon": "hasbros"}
    assert request == {"method": "POST", "url": TRACK_URL, "headers": HEADERS, "body": {
        "purchases": [
            {"external_id": "user-1042", "_update_existing_only": False, "app_id": "app-1",
             "product_id": "507f1f77bcf86cd799439011", "currency": "EUR", "price": 19,
             "quantity": 1, "time": "2026-11-20T14:03:11.120Z",
             "properties": {**order, "sku": "45790-32", "name": "Monopoly: 3rd Edition",
                            "category": "Games"}},
            {"external_id": "user-1042", "_update_existing_only": False, "app_id": "app-1",
             "product_id": "505bd76785ebb509fc183733", "currency": "EUR", "price": 3,
             "quantity": 2, "time": "2026-11-20T14:03:11.120Z",
             "properties": {**order, "sku": "46493-32", "name": "Uno Card Game",
                            "category": "Games"}},
        ]}}


def test_each_purchase_is_its_own_payload_so_batches_count_objects():
    payloads = translate(braze(), fixture("order_completed"))
    assert [list(payload.body) for payload in payloads] == [["purchases"], ["purchases"]]


def test_order_completed_can_also_be_a_custom_event():
    (request,) = requests(braze(order_completed_event=True), fixture("order_completed"))
    (event,) = request["body"]["events"]
    assert event["name"] == "Order Completed"
    assert event["properties"]["revenue"] == 25.0 and event["properties"]["currency"] == "EUR"
    assert len(request["body"]["purchases"]) == 2


def test_purchase_currency_defaults_to_usd_and_sku_stands_in_for_product_id():
    raw = track(event="Order Completed", properties={"products": [
        {"sku": "SKU-1", "price": "9.50", "quantity": 3}]})
    ((purchase,),) = [p.body["purchases"] for p in translate(braze(), raw)]
    assert (purchase["product_id"], purchase["currency"], purchase["price"],
            purchase["quantity"]) == ("SKU-1", "USD", 9.5, 3)


def test_a_numeric_product_id_is_sent_as_text():
    raw = track(event="Order Completed", properties={"products": [
        {"product_id": 1234, "sku": "SKU-1", "price": 25, "quantity": 2},
        {"product_id": None, "sku": 77, "price": 5}]})
    purchases = [purchase for payload in translate(braze(), raw)
                 for purchase in payload.body.get("purchases", [])]
    assert [(p["product_id"], p["price"], p["quantity"]) for p in purchases] \
        == [("1234", 25, 2), ("77", 5, 1)]


def test_a_purchase_of_100_is_the_most_braze_takes_and_a_products_own_currency_is_not_sent():
    raw = track(event="Order Completed", properties={"currency": "EUR", "products": [
        {"product_id": "p1", "price": 2, "quantity": 100, "currency": "GBP", "size": "L"}]})
    ((purchase,),) = [p.body["purchases"] for p in translate(braze(), raw)]
    # The order's currency is the purchase's; the product's own would be a reserved property.
    assert (purchase["quantity"], purchase["currency"], purchase["properties"]) == (
        100, "EUR", {"size": "L"})


def test_a_custom_event_carries_the_app_id_when_one_is_set():
    (payload,) = translate(braze(app_id="app-1"), track())
    assert payload.body["events"][0]["app_id"] == "app-1"
    (payload,) = translate(braze(), track())
    assert "app_id" not in payload.body["events"][0]


def test_order_completed_without_products_stays_a_custom_event():
    (payload,) = translate(braze(), track(event="Order Completed",
                                          properties={"revenue": 10}))
    assert payload.body["events"][0]["properties"] == {"revenue": 10, "currency": "USD"}


@pytest.mark.parametrize(("product", "message"), [
    ({"price": 1}, "no product_id"),
    ({"product_id": True, "price": 1}, "no product_id"),
    ({"product_id": "p1"}, "no numeric price"),
    ({"product_id": "p1", "price": 1, "quantity": 1.5}, "whole number"),
    ({"product_id": "p1", "price": 1, "quantity": 101}, "outside 1..100"),
    ({"product_id": "p1", "price": 1, "quantity": 0}, "outside 1..100"),
    ({"product_id": "p1", "price": 1, "quantity": "a few"}, "whole number"),
    ({"product_id": "p" * 256, "price": 1}, "over 255"),
])
def test_purchases_braze_would_refuse_are_rejected(product, message):
    with pytest.raises(EventRejected, match=message):
        translate(braze(), track(event="Order Completed", properties={"products": [product]}))


@pytest.mark.parametrize(("properties", "message"), [
    ({"time": 93}, "named 'time', which Braze reserves"),
    ({"event_name": "intro"}, "named 'event_name', which Braze reserves"),
    ({"$source": "ios"}, "not starting with \\$"),
    ({"": 1}, "1 to 255 characters"),
    ({"p" * 256: 1}, "1 to 255 characters"),
    ({f"p{n}": n for n in range(257)}, "257 properties; Braze keeps only the first 256"),
])
def test_event_properties_braze_would_refuse_or_drop_are_rejected(properties, message):
    # Braze refuses the whole event for these names ("Invalid 'properties' field"), and
    # keeps the first 256 properties of an event without a word.
    with pytest.raises(EventRejected, match=message):
        translate(braze(), track(properties=properties))


def test_purchase_properties_braze_reserves_are_rejected():
    product = {"product_id": "p1", "price": 1, "time": 93}
    with pytest.raises(EventRejected, match="product 1 has a property named 'time'"):
        translate(braze(), track(event="Order Completed", properties={"products": [product]}))
    # A custom event may carry what a purchase may not: its price is an ordinary property.
    (payload,) = translate(braze(), track(properties={"price": 3, "quantity": 2}))
    assert payload.body["events"][0]["properties"] == {"price": 3, "quantity": 2}
    assert len(translate(braze(), track(properties={f"p{n}": n for n in range(256)}))) == 1


def test_event_name_over_255_characters_is_rejected():
    with pytest.raises(EventRejected, match="at most 255"):
        translate(braze(), track(event="x" * 256))


# --- identify, alias, group, page -------------------------------------------------------

def test_identify_sets_attributes_and_identifies_the_anonymous_profile():
    attributes, identify = requests(braze(), fixture("identify_merge"))
    assert attributes == {"method": "POST", "url": TRACK_URL, "headers": HEADERS, "body": {
        "attributes": [{"external_id": "user-1042", "_update_existing_only": False,
                        "email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro"}]}}
    assert identify == {
        "method": "POST", "url": "https://rest.iad-01.braze.com/users/identify",
        "headers": HEADERS,
        "body": {"aliases_to_identify": [{"external_id": "user-1042", "user_alias": ANONYMOUS}],
                 "merge_behavior": "merge"}}


def test_traits_map_to_braze_standard_attributes():
    raw = {"type": "identify", "userId": "u1", "traits": {
        "firstName": "Ada", "last_name": "Lovelace", "gender": "female",
        "birthday": "1815-12-10T00:00:00Z", "address": {"city": "London", "country": "GB"},
        "external_id": "spoofed"}}
    ((attributes,),) = [p.body["attributes"] for p in translate(braze(), raw)]
    assert attributes == {"external_id": "u1", "_update_existing_only": False,
                          "first_name": "Ada", "last_name": "Lovelace", "gender": "F",
                          "dob": "1815-12-10", "home_city": "London", "country": "GB",
                          "address": {"city": "London", "country": "GB"}}
    # Both spellings of the spec's names: first_name and lastName too.
    raw["traits"] = {"first_name": "Ada", "lastName": "Lovelace", "phone": "+442071234567",
                     "email": "ada@example.com"}
    ((attributes,),) = [p.body["attributes"] for p in translate(braze(), raw)]
    assert (attributes["first_name"], attributes["last_name"], attributes["phone"],
            attributes["email"]) == ("Ada", "Lovelace", "+442071234567", "ada@example.com")
    assert not {"firstName", "lastName"} & attributes.keys()


def gender_sent(value: Any) -> dict[str, Any]:
    """The ``gender`` key (if any) of the attributes object an identify with this gender makes,
    next to a trait that must survive whatever the gender is."""
    raw = {"type": "identify", "userId": "u1", "traits": {"gender": value, "plan": "pro"}}
    ((attributes,),) = [p.body["attributes"] for p in translate(braze(), raw)]
    assert attributes["plan"] == "pro"
    return {key: attributes[key] for key in ("gender",) if key in attributes}


@pytest.mark.parametrize(("value", "code"), [
    ("male", "M"), ("Man", "M"), (" M ", "M"), ("FEMALE", "F"), ("woman", "F"), ("f", "F"),
    ("other", "O"), ("Non-Binary", "O"), ("nonbinary", "O"), ("non_binary", "O"), ("o", "O"),
    ("not applicable", "N"), ("N/A", "N"), ("n", "N"),
    ("Prefer not to say", "P"), ("prefer_not_to_say", "P"), ("p", "P"),
])
def test_gender_synonyms_become_the_codes_braze_takes(value, code):
    assert gender_sent(value) == {"gender": code}


@pytest.mark.parametrize("value", ["unknown", "U", " u ", None])
def test_unknown_gender_is_null_not_the_sdk_only_u(value):
    assert gender_sent(value) == {"gender": None}


@pytest.mark.parametrize("value", ["nonbinary-ish", "x", "", "  ", 1, True, ["F"], {"v": "F"}])
def test_a_gender_braze_would_refuse_is_left_out_and_the_other_traits_still_go(value):
    assert gender_sent(value) == {}


def test_anonymous_identify_creates_an_alias_only_profile():
    raw = {"type": "identify", "anonymousId": "anon-7f1c2e", "traits": {"plan": "free"}}
    (payload,) = translate(braze(), raw)
    assert payload == Payload({"attributes": [{"user_alias": ANONYMOUS,
                                               "_update_existing_only": False,
                                               "plan": "free"}]}, "track")


def test_alias_identifies_the_previous_ids_alias_only_profile():
    raw = {"type": "alias", "userId": "user-1042", "previousId": "anon-7f1c2e"}
    (request,) = requests(braze(), raw)
    assert request["body"] == {"aliases_to_identify": [
        {"external_id": "user-1042", "user_alias": ANONYMOUS}], "merge_behavior": "merge"}


def test_group_marks_membership_with_a_custom_attribute():
    (payload,) = translate(braze(), {"type": "group", "userId": "u1", "groupId": "acme"})
    assert payload.body == {"attributes": [{"external_id": "u1", "_update_existing_only": False,
                                            "ab_segment_group_acme": True}]}


def test_pages_and_screens_are_skipped_unless_track_pages():
    page = {"type": "page", "anonymousId": "a1", "name": "Pricing"}
    with pytest.raises(SkipEvent, match="track_pages"):
        translate(braze(), page)
    (payload,) = translate(braze(track_pages=True), page)
    assert payload.body["events"][0]["name"] == "Viewed Pricing Page"
    screen = {"type": "screen", "userId": "u1"}
    assert translate(braze(track_pages=True), screen)[0].body["events"][0]["name"] == \
        "Loaded a Screen"


# --- semantic events --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Delete Person", "User Deleted"])
def test_delete_goes_to_users_delete(name):
    (request,) = requests(braze(), {**fixture("delete_person"), "event": name})
    assert request == {"method": "POST", "url": "https://rest.iad-01.braze.com/users/delete",
                       "headers": HEADERS, "body": {"external_ids": ["user-1042"]}}


def test_deletes_batch_known_and_anonymous_users_together():
    destination = braze()
    payloads = [*translate(destination, fixture("delete_person")),
                *translate(destination, {"type": "track", "event": "User Deleted",
                                         "anonymousId": "anon-7f1c2e"})]
    request = destination.build_request(payloads)
    assert orjson.loads(request.body) == {"external_ids": ["user-1042"],
                                          "user_aliases": [ANONYMOUS]}


@pytest.mark.parametrize("name", ["Suppress Person", "User Unsuppressed"])
def test_suppress_is_skipped_with_a_reason(name):
    with pytest.raises(SkipEvent, match="subscription groups"):
        translate(braze(), track(event=name))


# --- per-event options, settings --------------------------------------------------------

def test_update_existing_only_per_event_option():
    (payload,) = translate(braze(), track(), {"update_existing_only": True})
    assert payload.body["events"][0]["_update_existing_only"] is True
    with pytest.raises(EventRejected, match="update_existing_only"):
        translate(braze(), track(), {"update_existing_only": "yes"})


def test_instance_picks_the_rest_endpoint_and_rest_endpoint_overrides_it():
    assert requests(braze(instance="eu-02"), track())[0]["url"] == \
        "https://rest.fra-02.braze.eu/users/track"
    custom = braze(instance="US-03", rest_endpoint="http://127.0.0.1:9900/braze/")
    assert requests(custom, track())[0]["url"] == "http://127.0.0.1:9900/braze/users/track"
    assert custom.endpoints() == ("http://127.0.0.1:9900/braze",)


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "api_key"),
    ({"api_key": API_KEY, "instance": "US-99"}, "unknown Braze instance; expected one of"),
    ({"api_key": API_KEY, "rest_endpoint": "rest.iad-01.braze.com"}, "http"),
    ({"api_key": API_KEY, "unknown": 1}, "unknown"),
])
def test_bad_settings_say_what_is_wrong(settings, message):
    with pytest.raises(ValidationError, match=message):
        BrazeSettings(**settings)


def test_every_setting_is_described():
    assert all(field.description for field in BrazeSettings.model_fields.values())


def test_no_secret_reaches_a_payload_body():
    destination = braze(track_pages=True)
    raws = [fixture(name) for name in ("course_started", "order_completed", "newsletter_signup",
                                       "identify_merge", "delete_person")]
    for raw in raws:
        for payload in translate(destination, raw):
            assert API_KEY not in orjson.dumps(payload.body).decode() + payload.group


def test_translation_is_deterministic():
    assert translate(braze(), fixture("order_completed")) == \
        translate(braze(), fixture("order_completed"))


# --- responses --------------------------------------------------------------------------

def test_201_fails_only_the_objects_braze_lists():
    destination = braze()
    payloads = [*translate(destination, fixture("identify_merge"))[:1],   # attributes[0]
                *translate(destination, track(messageId="m-1")),          # events[0]
                *translate(destination, fixture("order_completed")),      # purchases[0], [1]
                *translate(destination, track(messageId="m-2"))]          # events[1]
    body = {"message": "success", "attributes_processed": 1, "events_processed": 1,
            "purchases_processed": 1, "errors": [
                {"type": "'name' is required", "input_array": "events", "index": 1},
                {"type": "'price' is invalid", "input_array": "purchases", "index": 0},
                {"type": "odd", "input_array": "events", "index": [0]},  # once TypeError
                "an error that names no object"]}
    outcomes = destination.read_response(payloads, HttpResponse(201, {}, orjson.dumps(body)))
    assert [None if outcome is None else outcome.reason for outcome in outcomes] == [
        None, None, "Braze refused it: 'price' is invalid", None,
        "Braze refused it: 'name' is required"]
    assert all(isinstance(o, PermanentError) for o in outcomes if o is not None)


def test_plain_success_and_errors_without_items_are_left_to_the_core():
    destination = braze()
    payloads = translate(destination, track())
    assert destination.read_response(payloads, HttpResponse(201, {}, b'{"message":"success"}')) \
        is None
    assert destination.read_response(payloads, HttpResponse(400, {}, b'{"message":"bad"}')) \
        is None


RESET = {"X-RateLimit-Reset": "1795183400", "Date": "Fri, 20 Nov 2026 14:03:12 GMT"}


@pytest.mark.parametrize("headers", [
    {"X-Ratelimit-Retry-After": "12"},
    {"X-Ratelimit-Retry-After": "12", **RESET},  # the wait it states wins over the reset
    {"Retry-After": "12", **RESET},
])
def test_429_with_retry_after_header_is_left_to_the_core_which_reads_it(headers):
    destination = braze()
    payloads = translate(destination, track())
    response = HttpResponse(429, headers, b"")
    assert destination.read_response(payloads, response) is None


def test_429_with_only_a_reset_time_waits_until_then():
    destination = braze()
    payloads = translate(destination, track())
    response = HttpResponse(429, {"X-RateLimit-Reset": "1795183400",
                                  "Date": "Fri, 20 Nov 2026 14:03:12 GMT"}, b"")
    (outcome,) = destination.read_response(payloads, response)
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 8.0
    past = HttpResponse(429, {**RESET, "Date": "Fri, 20 Nov 2026 14:03:22 GMT"}, b"")
    (outcome,) = destination.read_response(payloads, past)  # the reset already past: now
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 0.0


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    Braze, settings={"api_key": "braze-rest-key-0001", "instance": "US-01"},
    examples=100)
