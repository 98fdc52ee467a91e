"""The ga4 destination as behaviour: the event that goes in, the Measurement Protocol request
that comes out, and every rule GA4 would otherwise enforce by silently dropping the event."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import DestinationHarness, conformance_test
from router import (EventRejected, HttpResponse, Payload, PermanentError, SkipEvent,
                    parse_event)
from router.registry import create_registry
from router_plugins.ga4.destination import GA4Settings, GoogleAnalytics4

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
RECEIVED = datetime(2026, 11, 20, 15, 0, 0, tzinfo=UTC)
SECRET = "mp_SECRET_c4n4ry_77"
COLLECT = ("https://www.google-analytics.com/mp/collect"
           f"?measurement_id=G-TEST123&api_secret={SECRET}")


def ga4(**settings: Any) -> GoogleAnalytics4:
    settings.setdefault("api_secret", SECRET)
    if settings.get("stream") != "app":
        settings.setdefault("measurement_id", "G-TEST123")
    return GoogleAnalytics4(GA4Settings(**settings))


def event(raw: dict[str, Any] | str, **fields: Any):
    """A parsed event: a fixture by name, or a dict; ``fields`` added on top."""
    data = json.loads((FIXTURES / f"{raw}.json").read_text()) if isinstance(raw, str) else raw
    return parse_event({**data, **fields}, received_at=RECEIVED)


def track(name: str, properties: dict | None = None, **fields: Any):
    raw = {"type": "track", "event": name, "anonymousId": "anon-1", "messageId": "m-1",
           "properties": properties or {}}
    return event(raw, **fields)


def sent(destination: GoogleAnalytics4, parsed, options: dict | None = None) -> dict:
    """The one request an event makes: method, URL, headers and the decoded JSON body."""
    payloads = destination.translate(parsed, options or {})
    request = destination.build_request(payloads)
    return {"method": request.method, "url": request.url, "headers": request.headers,
            "body": orjson.loads(request.body)}


def only_event(destination: GoogleAnalytics4, parsed, options: dict | None = None) -> dict:
    (payload,) = destination.translate(parsed, options or {})
    (ga4_event,) = payload.body["events"]
    return ga4_event


def micros(moment: str) -> int:
    stamp = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return int(stamp.timestamp()) * 1_000_000 + stamp.microsecond


# --- discovery and the whole request ---------------------------------------------------------

def test_discovered_through_its_entry_point():
    assert create_registry().get("ga4").cls is GoogleAnalytics4


def test_order_completed_becomes_a_purchase_request():
    assert sent(ga4(), event("order_completed")) == {
        "method": "POST",
        "url": COLLECT,
        "headers": {"Content-Type": "application/json"},
        "body": {
            "client_id": "user-1042",  # no anonymousId: the user id stands in, as in Segment
            "user_id": "user-1042",
            "events": [{
                "name": "purchase",
                "params": {
                    "transaction_id": "50314b8e9bcf000000000000",
                    "value": 27.5,  # total comes first for a purchase
                    "currency": "EUR",  # normalized from "eur"
                    "tax": 2, "shipping": 3, "coupon": "hasbros",
                    "affiliation": "Online Store", "discount": 2.5,
                    "items": [
                        {"item_id": "507f1f77bcf86cd799439011",
                         "item_name": "Monopoly: 3rd Edition", "price": 19, "quantity": 1,
                         "item_category": "Games"},
                        {"item_id": "505bd76785ebb509fc183733", "item_name": "Uno Card Game",
                         "price": 3, "quantity": 2, "item_category": "Games"},
                    ],
                },
                "timestamp_micros": micros("2026-11-20T14:03:11.120Z"),
            }],
        },
    }


def test_translation_is_deterministic():
    destination, parsed = ga4(), event("order_completed")
    assert destination.translate(parsed, {}) == destination.translate(parsed, {})


def test_purchase_value_falls_back_to_value_then_revenue():
    props = {"order_id": "o-1", "revenue": "19.99", "products": []}  # currency USD added
    params = only_event(ga4(), track("Order Completed", props))["params"]
    assert (params["value"], params["currency"]) == (19.99, "USD")
    assert "revenue" not in params
    props = {"order_id": "o-1", "value": 5, "revenue": 7, "currency": "gbp"}
    params = only_event(ga4(), track("Order Completed", props))["params"]
    assert (params["value"], params["currency"]) == (5, "GBP")


def test_order_refunded_is_a_refund_with_its_transaction_id():
    ga4_event = only_event(ga4(), track("Order Refunded", {"order_id": "o-9", "total": 30,
                                                           "currency": "EUR"}))
    assert ga4_event["name"] == "refund"
    assert ga4_event["params"] == {"transaction_id": "o-9", "value": 30, "currency": "EUR"}


@pytest.mark.parametrize("name", ["Order Completed", "Order Refunded"])
def test_purchase_and_refund_without_order_id_are_rejected(name):
    with pytest.raises(EventRejected, match="transaction_id.*order_id"):
        ga4().translate(track(name, {"revenue": 10}), {})


def test_commerce_value_without_currency_is_rejected():
    with pytest.raises(EventRejected, match="value but no currency"):
        ga4().translate(track("Checkout Started", {"value": 12}), {})


def test_an_order_total_given_as_text_is_sent_as_a_number():
    params = only_event(ga4(), track("Order Completed", {
        "order_id": "o-1", "total": "27.50", "currency": "EUR"}))["params"]
    assert params["value"] == 27.5 and params["currency"] == "EUR"
    with pytest.raises(EventRejected, match="value .* is not a number: 'n/a'"):
        ga4().translate(track("Order Completed", {"order_id": "o-1", "total": "n/a",
                                                   "currency": "EUR"}), {})


def test_custom_event_keeps_value_without_currency_and_maps_revenue_to_value():
    parsed = event("newsletter_signup", messageId="m-news")
    assert only_event(ga4(), parsed)["params"] == {"value": 4.5, "list": "weekly"}
    params = only_event(ga4(), track("Plan Renewed", {"revenue": 9}))["params"]
    assert params == {"value": 9, "currency": "USD"}


def test_single_product_event_is_its_own_item():
    batch = json.loads((FIXTURES / "batch.json").read_text())["batch"]
    ga4_event = only_event(ga4(), event(batch[0]))
    assert ga4_event["name"] == "add_to_cart"
    assert ga4_event["params"] == {
        "currency": "USD",
        "items": [{"item_id": "p1", "price": 9.99, "quantity": 2}],
    }


@pytest.mark.parametrize(("segment", "native", "props", "expected"), [
    ("Products Searched", "search", {"query": "blue hotpants"}, {"search_term": "blue hotpants"}),
    ("Product List Viewed", "view_item_list", {"list_id": "l1", "category": "Deals"},
     {"item_list_id": "l1", "item_list_name": "Deals"}),
    ("Payment Info Entered", "add_payment_info", {"payment_method": "card"},
     {"payment_type": "card"}),
    ("Checkout Step Completed", "add_shipping_info", {"shipping_method": "Fedex", "step": 2},
     {"shipping_tier": "Fedex", "step": 2}),
    ("Promotion Clicked", "select_promotion",
     {"promotion_id": "p", "name": "sale", "creative": "banner", "position": "top"},
     {"promotion_id": "p", "promotion_name": "sale", "creative_name": "banner",
      "creative_slot": "top"}),
    ("Promotion Viewed", "view_promotion",
     {"promotion_id": "p", "name": "sale", "creative": "banner", "position": "top"},
     {"promotion_id": "p", "promotion_name": "sale", "creative_name": "banner",
      "creative_slot": "top"}),
    ("Product Shared", "share", {"share_via": "email", "product_id": "p1"},
     {"method": "email", "item_id": "p1", "content_type": "product"}),
    ("Cart Shared", "share", {"share_via": "sms", "cart_id": "c1"},
     {"method": "sms", "item_id": "c1", "content_type": "cart"}),
    ("Signed Up", "sign_up", {"method": "google"}, {"method": "google"}),
    ("Cart Viewed", "view_cart", {}, {}),
    ("Product Added to Wishlist", "add_to_wishlist", {}, {}),
])
def test_ecommerce_events_map_to_ga4_recommended_events(segment, native, props, expected):
    ga4_event = only_event(ga4(), track(segment, props))
    assert (ga4_event["name"], ga4_event["params"]) == (native, expected)


@pytest.mark.parametrize(("segment", "native", "props", "items"), [
    ("Product Viewed", "view_item", {"product_id": "p1", "name": "Hat", "price": 9.99},
     [{"item_id": "p1", "item_name": "Hat", "price": 9.99}]),
    # a product known by its sku alone is a product too (mutation audit)
    ("Product Viewed", "view_item", {"sku": "SKU-1", "price": 9.99},
     [{"item_id": "SKU-1", "price": 9.99}]),
    ("Product Clicked", "select_item", {"product_id": "p1", "name": "Hat", "price": 9.99},
     [{"item_id": "p1", "item_name": "Hat", "price": 9.99}]),
    ("Product Removed", "remove_from_cart", {"product_id": "p1", "name": "Hat", "price": 9.99},
     [{"item_id": "p1", "item_name": "Hat", "price": 9.99}]),
    ("Product List Viewed", "view_item_list",
     {"list_id": "l1", "products": [{"product_id": "p1"}, {"product_id": "p2", "name": "Cap"}]},
     [{"item_id": "p1"}, {"item_id": "p2", "item_name": "Cap"}]),
    *[(segment, native, {"products": [{"product_id": "p1"}, {"product_id": "p2", "name": "Cap"}]},
       [{"item_id": "p1"}, {"item_id": "p2", "item_name": "Cap"}])
      for segment, native in [("Checkout Started", "begin_checkout"),
                              ("Payment Info Entered", "add_payment_info"),
                              ("Checkout Step Completed", "add_shipping_info")]],
])
def test_product_events_carry_their_products_as_items(segment, native, props, items):
    # GA4 reports its e-commerce events by their items: without them the event counts, but
    # no product does
    ga4_event = only_event(ga4(), track(segment, {**props, "currency": "EUR"}))
    assert (ga4_event["name"], ga4_event["params"]["items"]) == (native, items)


def test_product_without_id_or_name_is_rejected():
    with pytest.raises(EventRejected, match="item_id or item_name.*product 1"):
        ga4().translate(track("Cart Viewed", {"products": [{"product_id": "a"},
                                                           {"price": 3}]}), {})


# --- call types ----------------------------------------------------------------------------

def test_page_becomes_page_view():
    parsed = event({"type": "page", "anonymousId": "a1", "name": "Pricing", "messageId": "p1",
                    "properties": {"url": "https://shop.example/pricing", "path": "/pricing",
                                   "plan": "pro"},
                    "context": {"page": {"referrer": "https://search.example/",
                                         "title": "Pricing - Shop"}}})
    assert sent(ga4(), parsed)["body"] == {
        "client_id": "a1",
        "events": [{"name": "page_view",
                    "params": {"plan": "pro", "page_location": "https://shop.example/pricing",
                               "page_referrer": "https://search.example/",
                               "page_title": "Pricing - Shop"},
                    "timestamp_micros": micros("2026-11-20T15:00:00Z")}],
    }


def test_screen_becomes_screen_view():
    parsed = event({"type": "screen", "userId": "u1", "anonymousId": "a1", "name": "Home",
                    "messageId": "s1"})
    assert only_event(ga4(), parsed)["name"] == "screen_view"
    assert only_event(ga4(), parsed)["params"] == {"screen_name": "Home"}


def test_group_becomes_join_group():
    parsed = event({"type": "group", "userId": "u1", "groupId": "acme", "messageId": "g1",
                    "traits": {"name": "Acme"}})
    assert only_event(ga4(), parsed) | {"timestamp_micros": 0} == {
        "name": "join_group", "params": {"group_id": "acme"}, "timestamp_micros": 0}


def test_identify_is_skipped_with_the_reason():
    with pytest.raises(SkipEvent, match="no identify call.*user_property_traits"):
        ga4().translate(event("identify_merge"), {})


def test_alias_is_skipped_with_the_reason():
    parsed = event({"type": "alias", "userId": "u1", "previousId": "a1"})
    with pytest.raises(SkipEvent, match="no alias call"):
        ga4().translate(parsed, {})


@pytest.mark.parametrize("name", ["Delete Person", "User Deleted", "Suppress Person",
                                  "Unsuppress Person"])
def test_semantic_events_are_skipped_as_mp_has_no_deletion(name):
    with pytest.raises(SkipEvent, match="Measurement Protocol cannot"):
        ga4().translate(track(name, userId="u1"), {})


def test_delete_person_fixture_is_skipped():
    with pytest.raises(SkipEvent, match="cannot delete users"):
        ga4().translate(event("delete_person"), {})


# --- identity --------------------------------------------------------------------------------

def test_anonymous_event_uses_the_anonymous_id_as_client_id():
    (payload,) = ga4().translate(track("Video Played"), {})
    assert payload.body["client_id"] == "anon-1"
    assert "user_id" not in payload.body


def test_known_user_carries_user_id_beside_the_client_id():
    (payload,) = ga4().translate(event("course_started"), {})
    assert (payload.body["client_id"], payload.body["user_id"]) == \
        ("23adfd82-aa0f-45a7-a756-24f2a7a4c895", "AiUGstSDIg")


def test_client_id_from_option_then_context_then_ga_cookie():
    ga_cookie = {"cookies": {"_ga": "GA1.1.1234567890.1712345678"}}
    assert ga4().translate(track("X", context=ga_cookie), {})[0].body["client_id"] == \
        "1234567890.1712345678"
    context = {"client_id": "555.666", **ga_cookie}
    assert ga4().translate(track("X", context=context), {})[0].body["client_id"] == "555.666"
    options = {"client_id": "777.888"}
    assert ga4().translate(track("X", context=context), options)[0].body["client_id"] == \
        "777.888"


def test_app_stream_sends_app_instance_id_to_the_firebase_app():
    destination = ga4(stream="app", firebase_app_id="1:123:android:abc")
    instance = "0123456789abcdef0123456789abcdef"
    request = sent(destination, track("Level Up"), {"app_instance_id": instance})
    assert request["url"] == ("https://www.google-analytics.com/mp/collect?"
                              f"firebase_app_id=1%3A123%3Aandroid%3Aabc&api_secret={SECRET}")
    assert request["body"]["app_instance_id"] == instance
    assert "client_id" not in request["body"]


def test_app_stream_without_a_valid_app_instance_id_is_rejected():
    destination = ga4(stream="app", firebase_app_id="1:123:android:abc")
    with pytest.raises(EventRejected, match="need app_instance_id"):
        destination.translate(track("Level Up"), {})
    with pytest.raises(EventRejected, match="32 hexadecimal"):
        destination.translate(track("Level Up", context={"app_instance_id": "anon-1"}), {})


# --- names -----------------------------------------------------------------------------------

def test_spaces_in_event_names_become_underscores():
    assert only_event(ga4(), event("course_started"))["name"] == "Course_Started"


def test_event_names_can_be_lower_cased():
    parsed = event("course_started")
    assert only_event(ga4(lowercase_event_names=True), parsed)["name"] == "course_started"


@pytest.mark.parametrize(("name", "why"), [
    ("x" * 41, "41 characters, over GA4's 40"),
    ("1st Visit", "must start with a letter"),
    ("Signed-Up", "only letters, digits and underscores"),
    ("google_thing", "prefix GA4 reserves"),
    ("GA_Thing", "prefix GA4 reserves"),
    ("session_start", "name GA4 reserves"),
])
def test_invalid_event_names_are_rejected_with_the_rule(name, why):
    with pytest.raises(EventRejected, match=why):
        ga4().translate(track(name), {})
    assert only_event(ga4(), track("x" * 40))["name"] == "x" * 40  # the longest allowed


def test_invalid_param_names_are_rejected():
    with pytest.raises(EventRejected, match="param 'ga_x'.*prefix GA4 reserves"):
        ga4().translate(track("X", {"ga_x": 1}), {})
    with pytest.raises(EventRejected, match="41 characters, over GA4's 40"):
        ga4().translate(track("X", {"p" * 41: 1}), {})
    assert only_event(ga4(), track("X", {"p" * 40: 1}))["params"] == {"p" * 40: 1}


def test_spaces_in_property_names_become_underscores():
    assert only_event(ga4(), track("X", {"Plan Name": "pro"}))["params"] == {"Plan_Name": "pro"}


# --- limits ----------------------------------------------------------------------------------

def test_more_than_25_params_are_rejected():
    with pytest.raises(EventRejected, match="26 params, over GA4's 25"):
        ga4().translate(track("X", {f"p{i}": i for i in range(26)}), {})


def test_long_values_are_truncated_by_default():
    params = only_event(ga4(), track("X", {"note": "n" * 150}))["params"]
    assert params == {"note": "n" * 100}


def test_long_values_can_reject_the_event_instead():
    with pytest.raises(EventRejected, match="param 'note' is 150 characters, over GA4's 100"):
        ga4(oversized_values="reject").translate(track("X", {"note": "n" * 150}), {})


def test_ga360_allows_500_characters():
    params = only_event(ga4(max_param_value_length=500), track("X", {"note": "n" * 600}))
    assert params["params"]["note"] == "n" * 500


def test_page_params_have_their_own_limits():
    url = "https://shop.example/" + "a" * 1200
    parsed = event({"type": "page", "anonymousId": "a", "properties": {"url": url,
                                                                       "title": "t" * 400}})
    params = only_event(ga4(), parsed)["params"]
    assert (len(params["page_location"]), len(params["page_title"])) == (1000, 300)


def test_null_params_are_dropped_and_nested_ones_rejected():
    assert only_event(ga4(), track("X", {"a": None, "b": 1}))["params"] == {"b": 1}
    with pytest.raises(EventRejected, match="param 'tags' is an array"):
        ga4().translate(track("X", {"tags": ["a"]}), {})
    with pytest.raises(EventRejected, match="param 'meta' is an object"):
        ga4().translate(track("X", {"meta": {"a": 1}}), {})


def test_events_older_than_72_hours_less_the_retry_margin_are_rejected():
    old = (RECEIVED - timedelta(hours=69)).isoformat()
    with pytest.raises(EventRejected, match="69 h before it was received.*72 h.*4 h for retries"):
        ga4().translate(track("X", timestamp=old), {})
    recent = (RECEIVED - timedelta(hours=67)).isoformat()
    assert only_event(ga4(), track("X", timestamp=recent))["timestamp_micros"] == \
        int((RECEIVED - timedelta(hours=67)).timestamp()) * 1_000_000


def test_a_longer_max_age_leaves_less_of_the_72_hours_but_never_none():
    # max_age may be raised to 36 h (the config refuses more): events up to 36 h old pass.
    destination = ga4()
    destination.delivery = destination.delivery.model_copy(update={"max_age": 36 * 3600})
    day_old = (RECEIVED - timedelta(hours=30)).isoformat()
    assert only_event(destination, track("X", timestamp=day_old))["timestamp_micros"]
    too_old = (RECEIVED - timedelta(hours=37)).isoformat()
    with pytest.raises(EventRejected, match="36 h for retries"):
        destination.translate(track("X", timestamp=too_old), {})


def test_a_user_id_over_256_characters_is_rejected():
    # GA4 answers 2xx and does not log it: the event would count as delivered and be lost.
    with pytest.raises(EventRejected, match="300 characters.*over 256"):
        ga4().translate(track("X", userId="u" * 300), {})
    assert only_event(ga4(), track("X", userId="u" * 256))


@pytest.mark.parametrize("field, value", [("price", "abc"), ("quantity", "two"),
                                          ("price", True), ("position", "1st")])
def test_an_item_number_that_is_not_a_number_is_rejected(field, value):
    # Numeric strings became numbers in the core; what is left would be dropped by GA4.
    order = track("Order Completed", {"order_id": "o1", "revenue": 20, "currency": "EUR",
                                      "products": [{"product_id": 1, field: value}]})
    ga4_field = "index" if field == "position" else field
    with pytest.raises(EventRejected, match=f"items\\[\\]\\.{ga4_field} as a number"):
        ga4().translate(order, {})


def test_oversized_request_is_rejected():
    # Only reachable with GA4 360's 500-character values: 200 items of 1 KB each.
    products = [{"product_id": f"p{i}", "name": "n" * 500, "category": "c" * 500}
                for i in range(200)]
    parsed = parse_event({"type": "track", "event": "Cart Viewed", "anonymousId": "a",
                          "properties": {"products": products}},
                         received_at=RECEIVED, max_bytes=10_000_000)
    with pytest.raises(EventRejected, match="over its limit of 130000"):
        DestinationHarness(GoogleAnalytics4, ga4(max_param_value_length=500).settings).payloads(
            parsed)


def test_more_than_200_items_are_rejected():
    products = [{"product_id": f"p{i}"} for i in range(201)]
    with pytest.raises(EventRejected, match="201 products, over GA4's 200"):
        ga4().translate(track("Cart Viewed", {"products": products}), {})


# --- user properties -------------------------------------------------------------------------

def test_configured_traits_become_user_properties():
    parsed = track("X", context={"traits": {"plan": "pro", "email": "ada@example.com",
                                            "seats": 4}})
    (payload,) = ga4(user_property_traits=["plan", "seats"]).translate(parsed, {})
    assert payload.body["user_properties"] == {"plan": {"value": "pro"}, "seats": {"value": 4}}
    assert "ada@example.com" not in orjson.dumps(payload.body).decode()


def test_user_properties_option_is_validated():
    (payload,) = ga4().translate(track("X"), {"user_properties": {"tier": "t" * 50}})
    assert payload.body["user_properties"] == {"tier": {"value": "t" * 36}}
    with pytest.raises(EventRejected, match="user property 'a_very_long_user_property_name'"):
        ga4().translate(track("X"), {"user_properties": {"a_very_long_user_property_name": 1}})
    with pytest.raises(EventRejected, match="'user_id' is a name GA4 reserves"):
        ga4().translate(track("X"), {"user_properties": {"user_id": "u"}})
    with pytest.raises(EventRejected, match="26 user properties"):
        ga4().translate(track("X"), {"user_properties": {f"p{i}": i for i in range(26)}})


# --- per-event options -----------------------------------------------------------------------

def test_session_and_engagement_options_become_params():
    options = {"session_id": "1712345678", "engagement_time_msec": 100}
    assert only_event(ga4(), track("X"), options)["params"] == options


def test_consent_option_is_sent_and_checked():
    (payload,) = ga4().translate(track("X"), {"consent": {"ad_user_data": "DENIED"}})
    assert payload.body["consent"] == {"ad_user_data": "DENIED"}
    with pytest.raises(EventRejected, match="GRANTED or DENIED"):
        ga4().translate(track("X"), {"consent": {"ad_user_data": "yes"}})


# --- batching and requests -------------------------------------------------------------------

def test_events_of_one_client_share_a_request_and_others_do_not():
    destination = ga4()
    first = destination.translate(track("A", messageId="1"), {})[0]
    second = destination.translate(track("B", messageId="2"), {})[0]
    other = destination.translate(track("A", anonymousId="anon-2"), {})[0]
    assert first.group == second.group != other.group
    body = orjson.loads(destination.build_request([first, second]).body)
    assert body["client_id"] == "anon-1"
    assert [e["name"] for e in body["events"]] == ["A", "B"]


def test_delivery_defaults_follow_the_mp_limits():
    assert GoogleAnalytics4.delivery.batch_size == 25
    assert GoogleAnalytics4.delivery.batch_bytes == 130_000


def test_eu_region_base_url_and_debug_change_the_url():
    assert sent(ga4(region="EU"), track("X"))["url"].startswith(
        "https://region1.google-analytics.com/mp/collect?")
    assert sent(ga4(base_url="http://sink.test:9900/"), track("X"))["url"].startswith(
        "http://sink.test:9900/mp/collect?")
    assert sent(ga4(debug=True), track("X"))["url"].startswith(
        "https://www.google-analytics.com/debug/mp/collect?")
    assert ga4(base_url="http://sink.test:9900").endpoints() == ("http://sink.test:9900",)
    assert ga4().endpoints() == ()


@pytest.mark.parametrize("name", ["order_completed", "course_started", "newsletter_signup"])
def test_the_api_secret_is_only_in_the_url(name):
    destination = ga4()
    payloads = destination.translate(event(name), {})
    assert all(SECRET not in orjson.dumps(p.body).decode() for p in payloads)
    request = destination.build_request(payloads)
    assert SECRET in request.url and SECRET not in request.body.decode()


# --- responses -------------------------------------------------------------------------------

def test_collect_answers_are_judged_by_status():
    payloads = [Payload({"events": [{}]})]
    assert ga4().read_response(payloads, HttpResponse(204)) is None
    assert ga4().read_response(payloads, HttpResponse(500)) is None


def test_debug_validation_messages_fail_the_named_event():
    payloads = [Payload({"events": [{}]}), Payload({"events": [{}]})]
    answer = {"validationMessages": [{"fieldPath": "events[1].params.x",
                                      "description": "bad param",
                                      "validationCode": "NAME_INVALID"}]}
    outcomes = ga4(debug=True).read_response(payloads, HttpResponse(200, {}, orjson.dumps(answer)))
    assert outcomes[0] is None
    assert isinstance(outcomes[1], PermanentError)
    assert "NAME_INVALID at events[1].params.x: bad param" in outcomes[1].reason
    clean = HttpResponse(200, {}, b'{"validationMessages": []}')
    assert ga4(debug=True).read_response(payloads, clean) is None
    # a message without a path (null once raised AttributeError in the plugin) fails all
    unplaced = HttpResponse(200, {}, b'{"validationMessages": [{"fieldPath": null}]}')
    assert all(isinstance(outcome, PermanentError)
               for outcome in ga4(debug=True).read_response(payloads, unplaced))


# --- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"api_secret": "s"}, "web stream needs `measurement_id`"),
    ({"api_secret": "s", "stream": "app"}, "app stream needs `firebase_app_id`"),
    ({"api_secret": "s", "measurement_id": "UA-1234-1"}, "GA4 measurement ID such as G-"),
    ({"api_secret": "s", "measurement_id": "G-1", "region": "asia"}, "`global`.*or `eu`"),
    ({"api_secret": "s", "measurement_id": "G-1", "base_url": "ftp://x"}, "http:// or https://"),
    ({"api_secret": "s", "measurement_id": "G-1", "user_property_traits": ["first_open_time"]},
     "reserves"),
    ({"api_secret": "s", "measurement_id": "G-1", "max_param_value_length": 1000},
     "less than or equal to 500"),
    ({"measurement_id": "G-1"}, "api_secret"),
    ({"api_secret": "s", "measurement_id": "G-1", "apikey": "x"}, "Extra inputs"),
])
def test_settings_errors_say_what_was_expected(settings, message):
    with pytest.raises(ValidationError, match=message):
        GA4Settings(**settings)


def test_every_setting_is_documented():
    assert all(field.description for field in GA4Settings.model_fields.values())


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    GoogleAnalytics4, settings={"measurement_id": "G-TEST12345", "api_secret": "ga4-secret-0001"},
    examples=100)


def test_an_items_property_is_checked_as_ga4_items():
    # It went out as it came, a string or nested lists, for GA4 to drop (data fidelity audit).
    for bad in ("abc", [{"deep": {"x": [1]}}], [None], [{"item_id": "p1", "tags": ["a"]}]):
        with pytest.raises(EventRejected):
            ga4().translate(track("Custom Thing", {"items": bad}), {})
    (payload,) = ga4().translate(track("Custom Thing", {"items": [
        {"item_id": "p1", "price": 2, "coupon": None}]}), {})
    assert payload.body["events"][0]["params"]["items"] == [{"item_id": "p1", "price": 2}]
    # An event's products make its items; an items property beside them is not sent.
    (payload,) = ga4().translate(track("Order Completed", {
        "order_id": "o1", "revenue": 5, "items": "abc",
        "products": [{"product_id": "p2"}]}), {})
    assert payload.body["events"][0]["params"]["items"] == [{"item_id": "p2"}]


def test_a_future_timestamp_is_refused_and_a_fast_clock_reads_as_receipt():
    # GA4 answers 2xx to an event in the future and drops it (data fidelity audit).
    with pytest.raises(EventRejected, match="in the past"):
        ga4().translate(track("Future", timestamp=(RECEIVED + timedelta(hours=2)).isoformat()),
                        {})
    fast = track("Fast", timestamp=(RECEIVED + timedelta(seconds=20)).isoformat())
    assert only_event(ga4(), fast)["timestamp_micros"] == int(RECEIVED.timestamp()) * 10**6
