"""The meta_capi destination as behaviour: the event that goes in, the Conversions API request
that comes out, the hashing of customer data, and how Graph API errors are judged."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import conformance_test
from router import (EventRejected, HttpResponse, Payload, PermanentError, RetryableError,
                    SkipEvent, parse_event)
from router.registry import create_registry
from router_plugins.meta_capi.destination import MetaConversions, MetaSettings

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
RECEIVED = datetime(2026, 11, 20, 15, 0, 0, tzinfo=UTC)
TOKEN = "EAAB_SECRET_c4n4ry_token_99"
EVENTS_URL = "https://graph.facebook.com/v24.0/1234567890/events"
UA = "Mozilla/5.0 (X11; Linux x86_64)"
WEB_CONTEXT = {"page": {"url": "https://shop.example/cart"}, "userAgent": UA,
               "ip": "203.0.113.7"}


def meta(**settings: Any) -> MetaConversions:
    settings.setdefault("access_token", TOKEN)
    settings.setdefault("pixel_id", "1234567890")
    return MetaConversions(MetaSettings(**settings))


def event(raw: dict[str, Any] | str, **fields: Any):
    """A parsed event: a fixture by name, or a dict; ``fields`` added on top."""
    data = json.loads((FIXTURES / f"{raw}.json").read_text()) if isinstance(raw, str) else raw
    return parse_event({**data, **fields}, received_at=RECEIVED)


def track(name: str, properties: dict | None = None, **fields: Any):
    raw = {"type": "track", "event": name, "anonymousId": "anon-1", "messageId": "m-1",
           "properties": properties or {}, "context": WEB_CONTEXT}
    return event(raw, **fields)


def only_event(destination: MetaConversions, parsed, options: dict | None = None) -> dict:
    (payload,) = destination.translate(parsed, options or {})
    return payload.body


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- discovery and the whole request ---------------------------------------------------------

def test_discovered_through_its_entry_point():
    assert create_registry().get("meta_capi").cls is MetaConversions


def test_order_completed_becomes_a_purchase_request():
    destination = meta()
    payloads = destination.translate(event("order_completed"),
                                     {"action_source": "system_generated"})
    request = destination.build_request(payloads)
    assert (request.method, request.url, request.headers) == \
        ("POST", EVENTS_URL, {"Content-Type": "application/json"})
    assert orjson.loads(request.body) == {
        "data": [{
            "event_name": "Purchase",
            "event_time": int(datetime(2026, 11, 20, 14, 3, 11, tzinfo=UTC).timestamp()),
            "event_id": "msg-order-50314b8e9bcf",
            "action_source": "system_generated",
            "user_data": {"external_id": [sha("user-1042")], "client_ip_address": "203.0.113.7"},
            "custom_data": {
                "value": 25.0,  # revenue comes first ("25.00" normalized to a number)
                "currency": "EUR",
                "order_id": "50314b8e9bcf000000000000",
                "content_ids": ["507f1f77bcf86cd799439011", "505bd76785ebb509fc183733"],
                "contents": [{"id": "507f1f77bcf86cd799439011", "quantity": 1, "item_price": 19},
                             {"id": "505bd76785ebb509fc183733", "quantity": 2, "item_price": 3}],
                "num_items": 3,
                "content_type": "product",
                "affiliation": "Online Store", "shipping": 3, "tax": 2, "discount": 2.5,
                "coupon": "hasbros",
            },
        }],
        "access_token": TOKEN,
    }


def test_website_event_carries_url_user_agent_and_ip():
    body = only_event(meta(), event("course_started"))
    assert body == {
        "event_name": "Course Started",
        "event_time": int(datetime(2026, 11, 20, 15, 0, 0, tzinfo=UTC).timestamp())
        - 1,  # clock-skew corrected: 97 ms before receipt
        "event_id": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
        "action_source": "website",
        "event_source_url": "https://customer.io",
        "user_data": {
            "external_id": [sha("AiUGstSDIg"), sha("23adfd82-aa0f-45a7-a756-24f2a7a4c895")],
            "client_ip_address": "108.0.78.21",
            "client_user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_11_0) "
                                 "AppleWebKit/537.36 (KHTML like Gecko) Chrome/46.0.2490.86 "
                                 "Safari/537.36",
        },
        "custom_data": {"course_in_series": 1, "course_format": "pass/fail",
                        "title": "Intro to Customer.io"},
    }


def test_event_id_is_the_message_id_on_every_translation():
    destination, parsed = meta(), event("course_started")
    assert destination.translate(parsed, {}) == destination.translate(parsed, {})
    assert only_event(destination, parsed)["event_id"] == parsed.messageId


def test_a_batch_is_one_data_array_and_test_event_code_is_added():
    destination = meta(test_event_code="TEST4242")
    payloads = [p for i in range(3)
                for p in destination.translate(track("X", messageId=f"m{i}"), {})]
    body = orjson.loads(destination.build_request(payloads).body)
    assert [e["event_id"] for e in body["data"]] == ["m0", "m1", "m2"]
    assert body["test_event_code"] == "TEST4242"


# --- e-commerce ------------------------------------------------------------------------------

@pytest.mark.parametrize(("segment", "native"), [
    ("Product List Viewed", "ViewContent"), ("Product Viewed", "ViewContent"),
    ("Product Added", "AddToCart"), ("Checkout Started", "InitiateCheckout"),
    ("Payment Info Entered", "AddPaymentInfo"), ("Product Added to Wishlist", "AddToWishlist"),
    ("Products Searched", "Search"), ("Order Completed", "Purchase"),
])
def test_ecommerce_events_map_to_standard_events(segment, native):
    props = {"order_id": "o", "revenue": 1} if native == "Purchase" else {}
    assert only_event(meta(), track(segment, props))["event_name"] == native


def test_single_product_event_is_worth_price_times_quantity():
    props = {"product_id": "p1", "sku": "s1", "name": "Uno", "category": "Games",
             "price": 3.5, "quantity": 2, "currency": "usd", "url": "https://x/p1"}
    assert only_event(meta(), track("Product Added", props))["custom_data"] == {
        "value": 7.0, "currency": "USD",
        "content_ids": ["p1"], "contents": [{"id": "p1", "quantity": 2, "item_price": 3.5}],
        "num_items": 2, "content_type": "product",
        "content_name": "Uno", "content_category": "Games",
    }


def test_an_event_listing_products_keeps_its_own_product_like_properties():
    # Product List Viewed names the list's category beside its products[]: not a product's
    # own fields, so it stays a property (only a single-product event's become content_*).
    props = {"list_id": "l1", "category": "Games", "name": "Bestsellers",
             "products": [{"product_id": "p1", "price": 3.5}]}
    data = only_event(meta(), track("Product List Viewed", props))["custom_data"]
    assert (data["list_id"], data["category"]) == ("l1", "Games")
    assert "content_category" not in data and "content_name" not in data
    assert "name" not in data  # a "name" property is never sent: it may be a person's
    assert "value" not in data  # no revenue, total or value: a list is worth nothing


def test_a_quantity_no_json_body_can_hold_counts_as_one():
    # An embedding program may pass float("inf"): int() of it raised OverflowError inside
    # the plugin, which the router counts as a bug.
    for quantity in (float("inf"), float("nan")):
        props = {"product_id": "p1", "price": 3.5, "quantity": quantity}
        contents = only_event(meta(), track("Product Added", props))["custom_data"]["contents"]
        assert contents == [{"id": "p1", "quantity": 1, "item_price": 3.5}]



def test_a_fractional_quantity_counts_in_the_value_and_rounds_up_in_contents():
    # 0.5 kg at 4.5 was worth 0.0, its quantity cut to 0 (data fidelity audit).
    props = {"product_id": "p1", "price": 4.5, "quantity": 0.5, "currency": "USD"}
    data = only_event(meta(), track("Product Added", props))["custom_data"]
    assert data["value"] == 2.25
    assert (data["contents"], data["num_items"]) == ([{"id": "p1", "quantity": 1,
                                                       "item_price": 4.5}], 1)


def test_a_boolean_price_is_not_a_price():
    props = {"product_id": "p1", "price": True, "currency": "USD"}
    data = only_event(meta(), track("Product Added", props))["custom_data"]
    assert "value" not in data and data["contents"] == [{"id": "p1", "quantity": 1}]

def test_value_comes_from_revenue_then_total_then_value():
    def value(props):
        return only_event(meta(), track("Checkout Started", props))["custom_data"]["value"]
    assert value({"revenue": 1, "total": 2, "value": 3}) == 1
    assert value({"total": 2, "value": 3, "currency": "EUR"}) == 2
    assert value({"value": 3}) == 3
    assert value({"total": "27.50", "currency": "EUR"}) == 27.5  # a number, as Meta needs
    with pytest.raises(EventRejected, match="not a number: 'n/a'"):
        value({"total": "n/a"})


def test_search_carries_the_query_as_search_string():
    custom = only_event(meta(), track("Products Searched", {"query": "blue"}))["custom_data"]
    assert custom == {"search_string": "blue"}


def test_purchase_without_currency_or_value_is_rejected():
    with pytest.raises(EventRejected, match="currency on Purchase"):
        meta().translate(track("Order Completed", {"total": 10}), {})
    with pytest.raises(EventRejected, match="value on Purchase"):
        meta().translate(track("Order Completed", {"currency": "EUR"}), {})


def test_products_need_an_id():
    with pytest.raises(EventRejected, match="product 0 has no product_id or sku"):
        meta().translate(track("Checkout Started", {"products": [{"name": "x"}]}), {})


# --- call types ------------------------------------------------------------------------------

def test_page_and_screen_are_page_views():
    page = event({"type": "page", "anonymousId": "a", "name": "Pricing", "messageId": "p",
                  "properties": {"url": "https://shop.example/pricing"},
                  "context": {"userAgent": UA}})
    body = only_event(meta(), page)
    assert (body["event_name"], body["event_source_url"]) == \
        ("PageView", "https://shop.example/pricing")
    assert "url" not in body.get("custom_data", {})  # it went as event_source_url
    screen = event({"type": "screen", "anonymousId": "a", "name": "Home", "messageId": "s"})
    assert only_event(meta(), screen, {"action_source": "other"})["event_name"] == "PageView"


@pytest.mark.parametrize("raw", [
    {"type": "identify", "userId": "u1", "traits": {"email": "a@b.c"}},
    {"type": "group", "userId": "u1", "groupId": "g1"},
    {"type": "alias", "userId": "u1", "previousId": "a1"},
])
def test_identify_group_and_alias_are_skipped_with_the_reason(raw):
    with pytest.raises(SkipEvent, match=f"conversions only: {raw['type']} calls"):
        meta().translate(event(raw), {})


def test_identify_carrying_both_ids_is_skipped():
    with pytest.raises(SkipEvent):
        meta().translate(event("identify_merge"), {})


@pytest.mark.parametrize("name", ["Delete Person", "User Deleted"])
def test_delete_events_are_skipped_pointing_at_data_processing_options(name):
    with pytest.raises(SkipEvent) as skipped:
        meta().translate(track(name, userId="u1"), {})
    assert skipped.value.reason == ("Meta has no per-user delete API; use "
                                    "data_processing_options for CCPA")


def test_suppress_person_is_skipped():
    with pytest.raises(SkipEvent, match="no per-user suppress API"):
        meta().translate(track("Suppress Person", userId="u1"), {})


def test_custom_event_names_are_kept_up_to_50_characters():
    assert only_event(meta(), track("Course Started"))["event_name"] == "Course Started"
    with pytest.raises(EventRejected, match="at most 50 characters"):
        meta().translate(track("x" * 51), {})


# --- customer information --------------------------------------------------------------------

@pytest.mark.parametrize(("address", "state"), [
    ({"state": "California", "country": "US"}, "ca"),
    ({"state": "new york"}, "ny"),  # no country: a US state's name is still known
    ({"state": "District of Columbia", "country": "us"}, "dc"),
    ({"state": "Bavaria", "country": "DE"}, "bavaria"),  # outside the US: the name, compact
    ({"state": "Georgia", "country": "GE"}, "georgia"),  # the country, not the US state
])
def test_a_us_state_is_hashed_as_its_two_letter_code(address, state):
    context = {**WEB_CONTEXT, "traits": {"address": address}}
    user = only_event(meta(), track("X", userId="u1", context=context))["user_data"]
    assert user["st"] == sha(state)


def test_contact_traits_are_normalized_and_hashed():
    traits = {"email": "  Ada@Example.COM ", "phone": "+1 (555) 010-0200",
              "firstName": "Ada", "last_name": "Love-Lace",
              "address": {"city": "San Francisco", "state": "CA", "postal_code": "94107-1234",
                          "country": "US"},
              "plan": "pro"}
    context = {**WEB_CONTEXT, "traits": traits, "fbp": "fb.1.1596403881668.1116446470"}
    user = only_event(meta(), track("X", userId="u1", context=context),
                      {"fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890"})
    assert user["user_data"] == {
        "em": sha("ada@example.com"),
        "ph": sha("15550100200"),
        "fn": sha("ada"),
        "ln": sha("lovelace"),
        "ct": sha("sanfrancisco"),
        "st": sha("ca"),
        "zp": sha("94107"),
        "country": sha("us"),
        "external_id": [sha("u1"), sha("anon-1")],
        "client_ip_address": "203.0.113.7",
        "client_user_agent": UA,
        "fbc": "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
        "fbp": "fb.1.1596403881668.1116446470",
    }


def test_contact_data_never_reaches_custom_data_unhashed():
    props = {"email": "ada@example.com", "phone": "555", "plan": "pro"}
    body = only_event(meta(), track("X", props))
    assert body["custom_data"] == {"plan": "pro"}
    assert "ada@example.com" not in orjson.dumps(body).decode()


def test_already_hashed_values_are_not_hashed_again():
    hashed = sha("ada@example.com")
    context = {**WEB_CONTEXT, "traits": {"email": hashed}}
    assert only_event(meta(), track("X", context=context))["user_data"]["em"] == hashed


def test_phone_leading_zeros_dropped():
    context = {**WEB_CONTEXT, "traits": {"phone": "0044 20 7946 0958"}}
    assert only_event(meta(), track("X", context=context))["user_data"]["ph"] == \
        sha("442079460958")


@pytest.mark.parametrize(("phone", "country", "digits"), [
    ("(650) 555-1212", "US", "16505551212"),  # national: the user's country's code
    ("07911 123456", "United Kingdom", "447911123456"),  # and without its trunk 0
    ("+44 07911 123456", None, "447911123456"),  # the trunk 0 written after the code
    ("+1 650 555 1212", "DE", "16505551212"),  # a number's own code wins
    ("16505551212", "US", "16505551212"),  # digits that start with the code keep it
    ("4915123456789", "DE", "4915123456789"),  # and it is not added twice
    ("46812345678", "SE", "46812345678"),
    ("3912345678", "IT", "393912345678"),  # an Italian mobile that starts with 39
    ("06 1234 5678", "IT", "390612345678"),  # Italy keeps its leading 0
    ("6505551212", None, "6505551212"),  # no country to tell: digits, as given
])
def test_phone_is_hashed_with_its_country_code(phone, country, digits):
    # Meta matches a phone only with its country code; "(650) 555-1212" of a US user was
    # hashed as 6505551212, which matches no one.
    address = {"country": country} if country else {}
    context = {**WEB_CONTEXT, "traits": {"phone": phone, "address": address}}
    assert only_event(meta(), track("X", context=context))["user_data"]["ph"] == sha(digits)


@pytest.mark.parametrize(("country", "expected"), [
    ("DE", "de"), ("Germany", "de"), ("DEU", "de"), ("United States", "us"),
    ("United States of America", "us"), ("usa", "us"), ("South Korea", "kr"), ("UK", "gb"),
    ("Cote d'Ivoire", "ci"), ("Côte d'Ivoire", "ci"), ("Turkey", "tr"), ("Russia", "ru"),
    ("Narnia", None)])
def test_country_codes_and_names_become_two_letter_codes(country, expected):
    context = {**WEB_CONTEXT, "traits": {"country": country}}
    user = only_event(meta(), track("X", context=context))["user_data"]
    assert user.get("country") == (sha(expected) if expected else None)


def test_a_us_address_given_by_country_name_gets_the_state_code_and_zip5():
    address = {"state": "Texas", "postalCode": "73301-0001", "country": "United States"}
    user = only_event(meta(), track("X", context={**WEB_CONTEXT, "traits": {
        "address": address}}))["user_data"]
    assert (user["st"], user["zp"], user["country"]) == (sha("tx"), sha("73301"), sha("us"))


def test_anonymous_event_is_matched_by_its_hashed_anonymous_id():
    assert only_event(meta(), track("X"))["user_data"]["external_id"] == [sha("anon-1")]


# --- time ------------------------------------------------------------------------------------

def test_event_time_in_the_future_is_rejected():
    later = (RECEIVED + timedelta(minutes=5)).isoformat()
    with pytest.raises(EventRejected, match="refuses event_time in the future"):
        meta().translate(track("X", timestamp=later), {})


def test_a_sender_clock_a_little_fast_is_read_as_the_moment_of_receipt():
    ahead = (RECEIVED + timedelta(seconds=20)).isoformat()
    body = only_event(meta(), track("X", timestamp=ahead))
    assert body["event_time"] == int(RECEIVED.timestamp())


def test_events_older_than_7_days_less_the_retry_margin_are_rejected():
    old = (RECEIVED - timedelta(days=6, hours=21)).isoformat()
    with pytest.raises(EventRejected, match="6.9 days.*over 7 days old.*4 h for retries"):
        meta().translate(track("X", timestamp=old), {})
    recent = RECEIVED - timedelta(days=6)
    body = only_event(meta(), track("X", timestamp=recent.isoformat()))
    assert body["event_time"] == int(recent.timestamp())


# --- required fields and options -------------------------------------------------------------

def test_website_events_need_source_url_and_user_agent():
    with pytest.raises(EventRejected, match="event_source_url"):
        meta().translate(track("X", context={"userAgent": UA}), {})
    with pytest.raises(EventRejected, match="client_user_agent"):
        meta().translate(track("X", context={"page": {"url": "https://x"}}), {})
    body = only_event(meta(action_source="physical_store"), track("X", context={}))
    assert body["action_source"] == "physical_store"


def test_action_source_option_is_checked():
    with pytest.raises(EventRejected, match="action_source 'web' is not one Meta knows"):
        meta().translate(track("X"), {"action_source": "web"})


def test_app_events_need_app_data():
    with pytest.raises(EventRejected, match="app events need app_data"):
        meta().translate(track("X"), {"action_source": "app"})
    app_data = {"advertiser_tracking_enabled": 1, "application_tracking_enabled": 1,
                "extinfo": ["i2"]}
    body = only_event(meta(), track("X"), {"action_source": "app", "app_data": app_data})
    assert body["app_data"] == app_data


def test_limited_data_use_option():
    body = only_event(meta(), track("X"), {"data_processing_options": ["LDU"]})
    assert (body["data_processing_options"], body["data_processing_options_country"],
            body["data_processing_options_state"]) == (["LDU"], 0, 0)
    body = only_event(meta(), track("X"), {"data_processing_options": ["LDU"],
                                           "data_processing_options_country": 1,
                                           "data_processing_options_state": 1000})
    assert (body["data_processing_options_country"], body["data_processing_options_state"]) \
        == (1, 1000)
    assert only_event(meta(), track("X"), {"data_processing_options": []})[
        "data_processing_options"] == []
    for bad in ("LDU", ["ldu"], ["LDU", "GDPR"], {}, ""):
        with pytest.raises(EventRejected, match=r'must be \[\] or \["LDU"\]'):
            meta().translate(track("X"), {"data_processing_options": bad})


# --- secrets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["order_completed", "course_started", "newsletter_signup"])
def test_the_access_token_is_only_added_by_build_request(name):
    destination = meta()
    payloads = destination.translate(event(name), {"action_source": "other"})
    assert all(TOKEN not in orjson.dumps(p.body).decode() for p in payloads)
    request = destination.build_request(payloads)
    assert TOKEN not in request.url
    assert orjson.loads(request.body)["access_token"] == TOKEN


def test_base_url_override_and_api_version():
    destination = meta(base_url="http://sink.test:9900/", api_version="v25.0")
    request = destination.build_request(destination.translate(track("X"), {}))
    assert request.url == "http://sink.test:9900/v25.0/1234567890/events"
    assert destination.endpoints() == ("http://sink.test:9900",)


def test_delivery_defaults_follow_meta_limits():
    assert MetaConversions.delivery.batch_size == 1000


# --- responses -------------------------------------------------------------------------------

def error(status: int, body: dict, headers: dict | None = None) -> HttpResponse:
    return HttpResponse(status, headers or {}, orjson.dumps({"error": body}))


PAYLOADS = [Payload({"event_name": "X"}), Payload({"event_name": "Y"})]


def test_success_is_judged_by_status():
    ok = HttpResponse(200, {}, b'{"events_received": 2, "messages": [], "fbtrace_id": "A"}')
    assert meta().read_response(PAYLOADS, ok) is None
    assert meta().read_response(PAYLOADS, HttpResponse(502, {}, b"<html>")) is None


def test_invalid_token_is_permanent_and_the_token_is_masked():
    answer = error(400, {"message": f"Malformed access token {TOKEN}", "type": "OAuthException",
                         "code": 190, "error_subcode": 463, "fbtrace_id": "A"})
    outcomes = meta().read_response(PAYLOADS, answer)
    assert all(isinstance(o, PermanentError) for o in outcomes) and len(outcomes) == 2
    assert outcomes[0].reason == "Meta error 190/463: Malformed access token **REDACTED**"


def test_invalid_parameter_is_permanent():
    answer = error(400, {"message": "Invalid parameter", "code": 100, "error_subcode": 2804010,
                         "error_user_msg": "A currency is required for Purchase events"})
    (first, _) = meta().read_response(PAYLOADS, answer)
    assert isinstance(first, PermanentError)
    assert first.reason == "Meta error 100/2804010: A currency is required for Purchase events"


def test_transient_errors_are_retried():
    answer = error(500, {"message": "An unexpected error has occurred", "code": 2,
                         "is_transient": True})
    outcomes = meta().read_response(PAYLOADS, answer)
    assert all(isinstance(o, RetryableError) and not o.pause_destination for o in outcomes)
    answer = error(400, {"message": "odd", "code": 12345, "is_transient": True})
    assert isinstance(meta().read_response(PAYLOADS, answer)[0], RetryableError)


@pytest.mark.parametrize("code", [4, 17, 32, 613, 80004])
def test_throttling_codes_pause_the_destination_for_the_usage_headers_wait(code):
    usage = {"1234567890": [{"type": "ads_management", "call_count": 100,
                             "estimated_time_to_regain_access": 10}]}
    answer = error(400, {"message": "Application request limit reached", "code": code},
                   {"X-Business-Use-Case-Usage": orjson.dumps(usage).decode()})
    outcome = meta().read_response(PAYLOADS, answer)[0]
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 600
    assert outcome.pause_destination


def test_retry_after_header_wins():
    answer = error(400, {"message": "slow down", "code": 17}, {"Retry-After": "30"})
    assert meta().read_response(PAYLOADS, answer)[0].retry_after == 30


def test_other_errors_are_left_to_the_status():
    answer = error(403, {"message": "Permissions error", "code": 200})
    assert meta().read_response(PAYLOADS, answer) is None
    odd = error(400, {"message": "m", "code": [1]})  # unhashable: once TypeError
    assert meta().read_response(PAYLOADS, odd) is None


# --- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"access_token": "t", "pixel_id": "px-1"}, "numeric Pixel"),
    ({"access_token": "t", "pixel_id": "\u0661\u0662"}, "numeric Pixel"),
    ({"access_token": "t", "pixel_id": "1", "api_version": "24"}, "version such as v24.0"),
    ({"access_token": "t", "pixel_id": "1", "action_source": "web"}, "website"),
    ({"access_token": "t", "pixel_id": "1", "base_url": "graph.facebook.com"}, "http://"),
    ({"pixel_id": "1"}, "access_token"),
    ({"access_token": "t", "pixel_id": "1", "token": "x"}, "Extra inputs"),
])
def test_settings_errors_say_what_was_expected(settings, message):
    with pytest.raises(ValidationError, match=message):
        MetaSettings(**settings)


def test_every_setting_is_documented():
    assert all(field.description for field in MetaSettings.model_fields.values())


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    MetaConversions, settings={"pixel_id": "1234567890", "access_token": "meta-token-0001"},
    examples=100)


@pytest.mark.parametrize(("birthday", "expected"), [
    ("1990-05-17", "19900517"),
    ("1990-05-17T00:00:00.000Z", "19900517"),  # analytics.js sends a Date as ISO-8601
    ("19900517", "19900517"),
    (19900517, "19900517"),
    ("05/17/1990", None),  # day and month cannot be told apart in such spellings
    ("1990-02-30", None),  # no such day
    ("1850-01-01", None),  # Meta takes years from 1900
])
def test_birthday_is_hashed_as_yyyymmdd(birthday, expected):
    context = {**WEB_CONTEXT, "traits": {"birthday": birthday}}
    user = only_event(meta(), track("X", context=context))["user_data"]
    assert user.get("db") == (sha(expected) if expected else None)


@pytest.mark.parametrize(("gender", "expected"), [
    ("Female", "f"), (" male ", "m"), ("F", "f"), ("m", "m"), ("nonbinary", None)])
def test_gender_is_hashed_as_f_or_m(gender, expected):
    context = {**WEB_CONTEXT, "traits": {"gender": gender}}
    user = only_event(meta(), track("X", context=context))["user_data"]
    assert user.get("ge") == (sha(expected) if expected else None)


def test_birthday_and_gender_properties_never_reach_custom_data():
    body = only_event(meta(), track("X", {"birthday": "1990-05-17", "gender": "f", "plan": "pro"}))
    assert body["custom_data"] == {"plan": "pro"}
