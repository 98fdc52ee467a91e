"""The Mixpanel destination, as behaviour: the event that goes in, the request that comes out."""

from __future__ import annotations

import json
import re
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import conformance_test, requests_from, shown
from router import (EventRejected, HttpResponse, PermanentError, SkipEvent, parse_event)
from router.registry import create_registry
from router_plugins.mixpanel.destination import Mixpanel, MixpanelSettings

RECEIVED = datetime(2026, 11, 20, 14, 3, 12, tzinfo=UTC)
RECEIVED_MS = 1795183392000
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
TOKEN = "proj-token-0001"
TOKEN_AUTH = "Basic cHJvai10b2tlbi0wMDAxOg=="  # "proj-token-0001:"
SECRETS = {"token": TOKEN, "service_account_secret": "svc-secret-0001",
           "api_secret": "api-secret-0001"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def mixpanel(**settings: Any) -> Mixpanel:
    return Mixpanel(MixpanelSettings(project_token=TOKEN, **settings))


def translate(destination: Mixpanel, raw: dict[str, Any], options: dict | None = None):
    return destination.translate(parse_event(raw, received_at=RECEIVED), options or {})


def requests(destination: Mixpanel, raw: dict[str, Any], options: dict | None = None
             ) -> list[dict[str, Any]]:
    """Every request the event makes, batched by group, with the body decoded."""
    return [shown(request) for request in requests_from(destination,
                                                        translate(destination, raw, options))]


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": "user-1", "messageId": "m-1",
            "timestamp": "2026-11-20T14:03:12.000Z", **fields}


def test_discovered_through_its_entry_point():
    assert create_registry().get("mixpanel").package == "event-router"


# --- track ------------------------------------------------------------------------------

def test_track_goes_to_import_with_time_in_ms_and_messageid_as_insert_id():
    assert requests(mixpanel(), fixture("course_started")) == [{
        "method": "POST",
        "url": "https://api.mixpanel.com/import?strict=1",
        "headers": {"Content-Type": "application/json", "Authorization": TOKEN_AUTH},
        "body": [{"event": "Course Started", "properties": {
            "ip": "108.0.78.21",
            "$current_url": "https://customer.io",
            "utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "winter",
            "utm_term": "courses", "utm_content": "banner",
            "course_in_series": 1, "course_format": "pass/fail",
            "title": "Intro to Customer.io",
            "$user_id": "AiUGstSDIg",
            "$device_id": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
            "distinct_id": "AiUGstSDIg",
            # receive time less the client's clock skew (sentAt - originalTimestamp = 17 ms)
            "time": RECEIVED_MS - 17,
            "$insert_id": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
        }}],
    }]


def test_anonymous_event_uses_the_device_id_as_simplified_id_merge_does():
    (request,) = requests(mixpanel(), fixture("newsletter_signup"))
    properties = request["body"][0]["properties"]
    assert properties["distinct_id"] == "$device:anon-7f1c2e"
    assert properties["$device_id"] == "anon-7f1c2e"
    assert "$user_id" not in properties
    assert properties["value"] == 4.5


def test_original_id_merge_uses_the_ids_as_they_are():
    (request,) = requests(mixpanel(identity_merge="original"), fixture("newsletter_signup"))
    properties = request["body"][0]["properties"]
    assert properties["distinct_id"] == "anon-7f1c2e"
    assert "$device_id" not in properties


def test_revenue_and_currency_stay_event_properties_and_products_pass_through():
    (request,) = requests(mixpanel(), fixture("order_completed"),
                          {})  # without the fixture's per-event project override
    (order,) = request["body"]
    assert order["event"] == "Order Completed"
    assert order["properties"]["revenue"] == 25.0  # "25.00" normalized to a number
    assert order["properties"]["currency"] == "EUR"
    assert order["properties"]["total"] == 27.5
    assert [p["product_id"] for p in order["properties"]["products"]] == [
        "507f1f77bcf86cd799439011", "505bd76785ebb509fc183733"]


def test_order_completed_can_add_product_purchased_per_product():
    (request,) = requests(mixpanel(product_purchased_events=True), fixture("order_completed"),
                          {})
    order, monopoly, uno = request["body"]
    assert [e["event"] for e in request["body"]] == [
        "Order Completed", "Product Purchased", "Product Purchased"]
    assert {"order_id": "50314b8e9bcf000000000000", "currency": "EUR",
            "product_id": "507f1f77bcf86cd799439011", "price": 19, "quantity": 1,
            "name": "Monopoly: 3rd Edition"}.items() <= monopoly["properties"].items()
    assert uno["properties"]["quantity"] == 2
    insert_ids = [e["properties"]["$insert_id"] for e in request["body"]]
    assert insert_ids[0] == "msg-order-50314b8e9bcf"
    assert len(set(insert_ids)) == 3


# --- $insert_id -------------------------------------------------------------------------

def test_insert_id_is_derived_from_a_message_id_that_does_not_fit():
    long_id = "ajs-next-" + "x" * 60
    first = translate(mixpanel(), track(messageId=long_id))[0].body["properties"]["$insert_id"]
    again = translate(mixpanel(), track(messageId=long_id))[0].body["properties"]["$insert_id"]
    assert first == again == "df9a64db-134d-5c89-88a6-49b23dfaf85a"
    assert re.fullmatch(r"[A-Za-z0-9-]{1,36}", first)


@pytest.mark.parametrize("message_id", ["msg_with_underscores", "null", "a.b"])
def test_insert_id_is_hashed_when_mixpanel_would_refuse_the_message_id(message_id):
    (payload,) = translate(mixpanel(), track(messageId=message_id))
    insert_id = payload.body["properties"]["$insert_id"]
    assert insert_id != message_id and len(insert_id) == 36


def test_translation_is_deterministic():
    raw = fixture("order_completed")
    assert translate(mixpanel(product_purchased_events=True), raw) == \
        translate(mixpanel(product_purchased_events=True), raw)


# --- page, screen -----------------------------------------------------------------------

def test_named_page_is_viewed_name_page():
    raw = {"type": "page", "anonymousId": "a1", "name": "Pricing", "messageId": "p-1",
           "properties": {"url": "https://shop.example/pricing", "category": "Docs"}}
    (request,) = requests(mixpanel(), raw)
    (event,) = request["body"]
    assert event["event"] == "Viewed Docs Pricing Page"
    assert event["properties"]["url"] == "https://shop.example/pricing"
    assert event["properties"]["name"] == "Pricing"


def test_unnamed_pages_and_generic_naming_are_loaded_a_page():
    unnamed = {"type": "page", "anonymousId": "a1", "messageId": "p-2"}
    assert requests(mixpanel(), unnamed)[0]["body"][0]["event"] == "Loaded a Page"
    named = {**unnamed, "name": "Pricing"}
    assert requests(mixpanel(named_page_events=False), named)[0]["body"][0]["event"] == \
        "Loaded a Page"


def test_screen_is_viewed_name_screen():
    raw = {"type": "screen", "userId": "u1", "name": "Home", "messageId": "s-1"}
    assert requests(mixpanel(), raw)[0]["body"][0]["event"] == "Viewed Home Screen"


# --- identify, alias, group -------------------------------------------------------------

def test_identify_with_both_ids_sets_the_profile_and_merges_the_ids():
    merge, engage = requests(mixpanel(), fixture("identify_merge"))
    assert merge["url"] == "https://api.mixpanel.com/import?strict=1"
    assert engage == {
        "method": "POST", "url": "https://api.mixpanel.com/engage?verbose=1",
        "headers": {"Content-Type": "application/json"},
        "body": [{"$token": TOKEN, "$distinct_id": "user-1042", "$ip": "0",
                  "$set": {"$email": "ada@example.com", "$name": "Ada Lovelace",
                           "plan": "pro"}}],
    }
    (identify,) = merge["body"]
    assert identify == {"event": "$identify", "properties": {
        "$user_id": "user-1042", "$device_id": "anon-7f1c2e", "distinct_id": "user-1042",
        "time": RECEIVED_MS,
        "$insert_id": identify["properties"]["$insert_id"]}}
    assert identify["properties"]["$insert_id"] != "msg-identify-1"  # not the profile's id


def test_identify_on_original_id_merge_sends_identified_and_anon_ids():
    merge, _ = requests(mixpanel(identity_merge="original"), fixture("identify_merge"))
    properties = merge["body"][0]["properties"]
    assert properties["$identified_id"] == "user-1042"
    assert properties["$anon_id"] == "anon-7f1c2e"
    assert properties["distinct_id"] == "user-1042"


def test_anonymous_identify_updates_the_anonymous_profile_only():
    raw = {"type": "identify", "anonymousId": "anon-1", "traits": {"email": "a@example.com"},
           "context": {"ip": "203.0.113.9"}}
    (engage,) = requests(mixpanel(), raw)
    assert engage["body"] == [{"$token": TOKEN, "$distinct_id": "$device:anon-1",
                               "$ip": "203.0.113.9", "$set": {"$email": "a@example.com"}}]


def test_alias_is_create_alias_on_original_id_merge():
    raw = {"type": "alias", "userId": "user-2", "previousId": "user-1", "messageId": "al-1"}
    (request,) = requests(mixpanel(identity_merge="original"), raw)
    assert request["body"] == [{"event": "$create_alias", "properties": {
        "distinct_id": "user-1", "alias": "user-2", "time": RECEIVED_MS, "$insert_id": "al-1"}}]


def test_alias_is_skipped_on_simplified_id_merge():
    raw = {"type": "alias", "userId": "user-2", "previousId": "user-1"}
    with pytest.raises(SkipEvent, match="Simplified ID Merge"):
        translate(mixpanel(), raw)


def test_group_sets_the_group_profile_and_the_users_membership():
    raw = {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"plan": "team"}}
    engage, groups = sorted(requests(mixpanel(group_key="company"), raw),
                            key=lambda request: request["url"])
    assert groups["url"] == "https://api.mixpanel.com/groups?verbose=1"
    assert groups["body"] == [{"$token": TOKEN, "$group_key": "company", "$group_id": "acme",
                               "$set": {"plan": "team"}}]
    assert engage["body"] == [{"$token": TOKEN, "$distinct_id": "u1", "$ip": "0",
                               "$union": {"company": ["acme"]}}]


def test_group_without_a_group_key_is_skipped():
    with pytest.raises(SkipEvent, match="group_key"):
        translate(mixpanel(), {"type": "group", "userId": "u1", "groupId": "acme"})


# --- semantic events --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Delete Person", "User Deleted"])
def test_delete_deletes_the_profile(name):
    (request,) = requests(mixpanel(), {**fixture("delete_person"), "event": name})
    assert request["url"] == "https://api.mixpanel.com/engage?verbose=1"
    assert request["body"] == [{"$token": TOKEN, "$distinct_id": "user-1042",
                                "$delete": "null", "$ignore_alias": False}]


@pytest.mark.parametrize("name", ["Suppress Person", "User Unsuppressed"])
def test_suppress_is_skipped_with_a_reason(name):
    with pytest.raises(SkipEvent, match="no (suppress|unsuppress) operation"):
        translate(mixpanel(), track(event=name))


# --- vendor limits ----------------------------------------------------------------------

def test_more_than_255_properties_is_rejected():
    properties = {f"p{i}": i for i in range(260)}
    with pytest.raises(EventRejected, match="at most 255"):
        translate(mixpanel(), track(properties=properties))


def test_event_name_over_255_characters_is_rejected():
    with pytest.raises(EventRejected, match="event name"):
        translate(mixpanel(), track(event="x" * 256))


@pytest.mark.parametrize(("name", "prefix"), [("$merge", "$"), ("$identify", "$"),
                                              ("$create_alias", "$"), ("mp_page_view", "mp_")])
def test_a_track_name_mixpanel_reserves_is_rejected(name, prefix):
    # Sent as it was, a customer's $merge became an identity merge without its fields.
    with pytest.raises(EventRejected, match=f"starts with '{re.escape(prefix)}', which "
                                            "Mixpanel reserves.*mapping.event_names"):
        translate(mixpanel(), track(event=name))
    assert translate(mixpanel(), track(event="Merged $ accounts"))  # only as a prefix


def test_string_values_are_truncated_to_255_bytes_between_characters():
    (payload,) = translate(mixpanel(), track(properties={
        "note": "y" * 300, "tags": ["z" * 300], "cyrillic": "я" * 300, "emoji": "😀" * 100,
        "nested": {"ru": "я" * 128, "fits": "я" * 127}, "date": "2026-01-02T03:04:05" + "x" * 300}))
    properties = payload.body["properties"]
    assert properties["note"] == "y" * 255 and properties["tags"] == ["z" * 255]
    # Mixpanel's limit is in bytes: 2 for each "я", 4 for each emoji.
    assert (properties["cyrillic"], properties["emoji"]) == ("я" * 127, "😀" * 63)
    assert properties["nested"] == {"ru": "я" * 127, "fits": "я" * 127}
    assert properties["date"] == ("2026-01-02T03:04:05" + "x" * 300)[:255]


DATE_TIMES = {
    "offset": ("2026-01-02T04:04:05.250+01:00", "2026-01-02T03:04:05"),
    "utc": ("2026-02-01T00:00:00Z", "2026-02-01T00:00:00"),
    "to_the_minute": ("2026-02-01T10:30Z", "2026-02-01T10:30:00"),
    "fractions": ("2026-02-01T10:30:00.123456789", "2026-02-01T10:30:00"),
    "no_zone_no_seconds": ("2024-03-01T10:00", "2024-03-01T10:00:00"),
    "go_zero_time": ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00"),
    "past_year_1_in_utc": ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+01:00"),
    "already_mixpanels": ("2022-10-30T13:30:25", "2022-10-30T13:30:25"),
    "a_date": ("2022-10-29", "2022-10-29"),
    "not_a_date": ("2024-02-30T10:00:00Z", "2024-02-30T10:00:00Z"),
    "text": ("2024-01-01T10:00:00Z is when", "2024-01-01T10:00:00Z is when"),
}


def test_date_times_go_in_mixpanels_date_form_in_utc_at_any_depth():
    # Mixpanel reads a Date as YYYY-MM-DDTHH:MM:SS in UTC: an offset is never converted
    sent = {name: given for name, (given, _) in DATE_TIMES.items()}
    wanted = {name: expected for name, (_, expected) in DATE_TIMES.items()}
    (payload,) = translate(mixpanel(), track(properties={**sent, "nested": {"at": sent},
                                                         "list": list(sent.values())}))
    properties = payload.body["properties"]
    assert {name: properties[name] for name in sent} == wanted
    assert properties["nested"] == {"at": wanted}
    assert properties["list"] == list(wanted.values())
    (profile,) = translate(mixpanel(), {"type": "identify", "userId": "u-1",
                                        "traits": {"trial_ends": "2026-02-01T00:00:00Z"}})
    assert profile.body["$set"]["trial_ends"] == "2026-02-01T00:00:00"


def test_events_more_than_an_hour_in_the_future_are_rejected():
    with pytest.raises(EventRejected, match="1 h in the future"):
        translate(mixpanel(), track(timestamp="2026-11-20T15:03:13.000Z"))
    (payload,) = translate(mixpanel(), track(timestamp="2026-11-20T15:03:12.000Z"))
    assert payload.body["properties"]["time"] == RECEIVED_MS + 3600_000  # 1 h exactly: sent


def test_old_events_are_imported_but_not_before_1971():
    (payload,) = translate(mixpanel(), track(timestamp="2019-01-01T00:00:00.000Z"))
    assert payload.body["properties"]["time"] == 1546300800000
    assert type(payload.body["properties"]["time"]) is int  # 1546300800000, not ...0.0
    with pytest.raises(EventRejected, match="1971"):
        translate(mixpanel(), track(timestamp="1970-12-31T23:59:59.999Z"))
    (payload,) = translate(mixpanel(), track(timestamp="1971-01-01T00:00:00.000Z"))
    assert payload.body["properties"]["time"] == 31536000000


def test_placeholder_user_ids_are_rejected():
    with pytest.raises(EventRejected, match="userId is a placeholder"):
        translate(mixpanel(), track(userId="null"))


# --- per-event options ------------------------------------------------------------------

def test_project_token_override_sends_to_that_project_in_its_own_group():
    payloads = translate(mixpanel(), fixture("order_completed"),
                         {"project_token_override": "abc"})
    assert {payload.group for payload in payloads} == {"import:abc"}
    (request,) = requests(mixpanel(service_account_username="svc-user",
                                   service_account_secret="svc-secret-0001", project_id="42"),
                          fixture("order_completed"), {"project_token_override": "abc"})
    assert request["url"] == "https://api.mixpanel.com/import?strict=1"  # no project_id
    assert request["headers"]["Authorization"] == "Basic YWJjOg=="  # "abc:"


def test_project_token_override_reaches_engage_bodies():
    (request,) = requests(mixpanel(), fixture("delete_person"), {"project_token_override": "abc"})
    assert request["body"][0]["$token"] == "abc"


def test_a_malformed_project_token_override_is_rejected():
    with pytest.raises(EventRejected, match="project_token_override"):
        translate(mixpanel(), track(), {"project_token_override": "a:b"})


# --- credentials and settings -----------------------------------------------------------

def test_service_account_authenticates_import_with_the_project_id():
    destination = mixpanel(service_account_username="svc-user",
                           service_account_secret="svc-secret-0001", project_id="42",
                           region="IN")
    (request,) = requests(destination, track())
    assert request["url"] == "https://api-in.mixpanel.com/import?strict=1&project_id=42"
    assert request["headers"]["Authorization"] == "Basic c3ZjLXVzZXI6c3ZjLXNlY3JldC0wMDAx"


def test_api_secret_authenticates_import_as_user_name():
    (request,) = requests(mixpanel(api_secret="api-secret-0001"), track())
    assert request["headers"]["Authorization"] == "Basic YXBpLXNlY3JldC0wMDAxOg=="


def test_base_url_overrides_the_region_host():
    destination = mixpanel(base_url="http://127.0.0.1:9900/mixpanel/")
    assert requests(destination, track())[0]["url"] == \
        "http://127.0.0.1:9900/mixpanel/import?strict=1"
    assert destination.endpoints() == ("http://127.0.0.1:9900/mixpanel",)


@pytest.mark.parametrize(("settings", "message"), [
    ({}, "project_token"),
    ({"project_token": TOKEN, "region": "APAC"}, "expected one of US, EU, IN"),
    ({"project_token": TOKEN, "service_account_username": "u"}, "go together"),
    ({"project_token": TOKEN, "service_account_username": "u",
      "service_account_secret": "s"}, "project_id is required"),
    ({"project_token": TOKEN, "base_url": "ftp://example.com"}, "http"),
    ({"project_token": TOKEN, "identity_merge": "legacy"}, "identity_merge"),
    ({"project_token": TOKEN, "unknown": 1}, "unknown"),
])
def test_bad_settings_say_what_is_wrong(settings, message):
    with pytest.raises(ValidationError, match=message):
        MixpanelSettings(**settings)


def test_every_setting_is_described():
    assert all(field.description for field in MixpanelSettings.model_fields.values())


def test_no_secret_reaches_a_payload_body():
    destination = mixpanel(service_account_username="svc-user",
                           service_account_secret=SECRETS["service_account_secret"],
                           project_id="42", group_key="company",
                           product_purchased_events=True)
    raws = [fixture(name) for name in ("course_started", "order_completed", "newsletter_signup",
                                       "identify_merge", "delete_person")]
    raws.append({"type": "group", "userId": "u1", "groupId": "acme"})
    for raw in raws:
        for payload in translate(destination, raw):
            stored = orjson.dumps(payload.body).decode() + payload.group
            assert not any(secret in stored for secret in SECRETS.values())


# --- responses --------------------------------------------------------------------------

def test_import_400_fails_only_the_records_it_lists():
    destination = mixpanel()
    payloads = [payload for message_id in ("m-1", "m-2", "m-3")
                for payload in translate(destination, track(messageId=message_id))]
    body = {"code": 400, "error": "some data points in the request failed validation",
            "status": "Bad Request", "num_records_imported": 1, "failed_records": [
                {"index": 0, "insert_id": "m-1", "field": "properties.time",
                 "message": "'properties.time' is invalid"},
                {"insert_id": "m-3", "field": "properties.distinct_id",
                 "message": "invalid distinct_id"}]}
    first, second, third = destination.read_response(
        payloads, HttpResponse(400, {}, orjson.dumps(body)))
    assert isinstance(first, PermanentError) and "properties.time" in first.reason
    assert second is None
    assert isinstance(third, PermanentError) and "distinct_id" in third.reason


def test_an_import_400_index_that_is_a_bool_names_no_record():
    # True is 1 to Python; taken as a position it failed the second record, which Mixpanel
    # had ingested. Unmatched (its insert_id names none either), the 400 is the status's.
    destination = mixpanel()
    payloads = [payload for message_id in ("m-1", "m-2")
                for payload in translate(destination, track(messageId=message_id))]
    body = {"code": 400, "failed_records": [{"index": True, "insert_id": "other"}]}
    assert destination.read_response(payloads, HttpResponse(400, {}, orjson.dumps(body))) is None


def test_import_success_and_other_statuses_are_left_to_the_core():
    destination = mixpanel()
    payloads = translate(destination, track())
    ok = {"code": 200, "num_records_imported": 1, "status": "OK"}
    assert destination.read_response(payloads, HttpResponse(200, {}, orjson.dumps(ok))) is None
    assert destination.read_response(
        payloads, HttpResponse(429, {"Retry-After": "30"}, b"")) is None
    assert destination.read_response(
        payloads, HttpResponse(400, {}, b'{"error": "bad auth"}')) is None


def test_engage_200_with_status_0_is_a_failure():
    destination = mixpanel()
    payloads = translate(destination, fixture("delete_person"))
    refused = HttpResponse(200, {}, b'{"status": 0, "error": "$distinct_id missing"}')
    (outcome,) = destination.read_response(payloads, refused)
    assert isinstance(outcome, PermanentError) and "$distinct_id missing" in outcome.reason
    accepted = HttpResponse(200, {}, b'{"status": 1, "error": null}')
    assert destination.read_response(payloads, accepted) is None


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    Mixpanel,
    settings={"project_token": "mixpanel-token-0001", "api_secret": "mixpanel-secret-0001"},
    examples=100)
