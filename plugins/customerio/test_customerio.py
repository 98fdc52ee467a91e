"""Customer.io: the event that goes in, the Track API v2 batch request that comes out."""

from __future__ import annotations

import base64
import json
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import conformance_test
from router import (EventRejected, HttpResponse, Payload, PermanentError, RetryableError,
                    SkipEvent, parse_event)
from router.registry import create_registry
from router_plugins.customerio.destination import CustomerIO, CustomerIOSettings

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
RECEIVED = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
RECEIVED_UNIX = 1709294400
API_KEY = "cio_track_key_SECRET_9f2c"
SETTINGS = {"site_id": "site-123", "api_key": API_KEY}


def destination(**settings: Any) -> CustomerIO:
    return CustomerIO(CustomerIOSettings.model_validate({**SETTINGS, **settings}))


def event(raw: dict[str, Any]):
    return parse_event(raw, received_at=RECEIVED)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def items(raw: dict[str, Any], options: dict[str, Any] | None = None, **settings: Any
          ) -> list[dict[str, Any]]:
    """The batch items one event becomes."""
    adapter = destination(**settings)
    return [payload.body for payload in adapter.translate(event(raw), options or {})]


def request(raw: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """The exact request one event makes: method, URL, headers and the decoded JSON body."""
    adapter = destination(**settings)
    built = adapter.build_request(adapter.translate(event(raw), {}))
    return {"method": built.method, "url": built.url, "headers": built.headers,
            "body": orjson.loads(built.body or b"")}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_discovered_through_its_entry_point():
    assert create_registry().get("customerio").cls is CustomerIO


# --- the six call types -------------------------------------------------------------------------

def test_track_becomes_a_person_event_in_a_batch_request():
    sent = request(fixture("course_started.json"))

    assert sent == {
        "method": "POST",
        "url": "https://track.customer.io/api/v2/batch",
        "headers": {"Content-Type": "application/json",
                    "Authorization": basic("site-123", API_KEY)},
        "body": {"batch": [{
            "type": "person", "action": "event",
            "identifiers": {"id": "AiUGstSDIg"},
            "name": "Course Started",
            "id": "58PWKT2PEW8WTHBPS7PXJ80XA3",  # ULID derived from the messageId
            # receivedAt - (sentAt - originalTimestamp): 17 ms before the receipt, whole seconds
            "timestamp": RECEIVED_UNIX - 1,
            "attributes": {"course_in_series": 1, "course_format": "pass/fail",
                           "title": "Intro to Customer.io"},
        }]},
    }


def test_eu_region_sends_to_the_eu_host():
    assert request(fixture("course_started.json"), region="EU")["url"] == \
        "https://track-eu.customer.io/api/v2/batch"


def test_base_url_overrides_the_host_for_proxies_and_tests():
    adapter = destination(base_url="http://127.0.0.1:8080/cio/")
    assert request(fixture("course_started.json"), base_url="http://127.0.0.1:8080/cio/")["url"] \
        == "http://127.0.0.1:8080/cio/api/v2/batch"
    assert adapter.endpoints() == ("http://127.0.0.1:8080/cio/api/v2/batch",)


def test_identify_with_both_ids_carries_the_anonymous_id_so_customerio_merges():
    assert items(fixture("identify_merge.json")) == [{
        "type": "person", "action": "identify",
        "identifiers": {"id": "user-1042"},
        "timestamp": RECEIVED_UNIX,
        "attributes": {"email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro",
                       "anonymous_id": "anon-7f1c2e"},
    }]


def test_identify_turns_created_at_into_unix_seconds():
    (item,) = items({"type": "identify", "userId": "u1",
                     "traits": {"createdAt": "2024-01-01T00:00:00Z", "plan": "pro"}})
    assert item["attributes"] == {"plan": "pro", "created_at": 1704067200}


DATES = {
    "trial_ends": "2024-01-01T00:00:00Z",         # 1704067200
    "renewed": "2024-01-01T01:00:00.123456+01:00",  # the same moment, an hour ahead
    "birthday": "2024-01-01",                     # a date alone is midnight UTC
    "local": "2024-01-01T00:00",                  # no offset: UTC, as the router reads times
    "compact_offset": "2024-01-01T02:00:00+0200",
}


def test_iso_dates_in_properties_become_unix_seconds_in_nested_objects_too():
    (item,) = items({"type": "track", "userId": "u1", "event": "Plan Renewed",
                     "properties": {**DATES, "plan": {"name": "pro", "since": "2024-01-01"},
                                    "history": ["2024-01-01"]}})
    assert item["attributes"] == {
        **dict.fromkeys(DATES, 1704067200),
        "plan": {"name": "pro", "since": 1704067200},
        "history": ["2024-01-01"],  # arrays are left as they are, as Segment's destination does
    }


@pytest.mark.parametrize("text", ["2024", "2024-01", "10/03/2024", "2024-02-30",
                                  "0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00",
                                  "2024-01-01T10", "2024-01-01 10:00:00", "1704067200",
                                  "2024-01-01T00:00:00.1234567Z", "order 2024-01-01"])
def test_text_that_is_no_iso_date_unix_seconds_can_hold_stays_text(text):
    (item,) = items({"type": "track", "userId": "u1", "event": "Noted",
                     "properties": {"note": text}})
    assert item["attributes"] == {"note": text}


def test_traits_of_identify_and_group_are_converted_but_never_the_anonymous_id():
    (person,) = items({"type": "identify", "userId": "u1", "anonymousId": "2024-01-01",
                       "traits": {"trial_ends": "2024-01-01T00:00:00Z"}})
    assert person["attributes"] == {"trial_ends": 1704067200, "anonymous_id": "2024-01-01"}
    (company,) = items({"type": "group", "userId": "u1", "groupId": "acme",
                        "traits": {"founded": "2024-01-01"}})
    assert company["attributes"] == {"founded": 1704067200}


def test_timestamp_conversion_can_be_turned_off():
    (item,) = items({"type": "track", "userId": "u1", "event": "Plan Renewed",
                     "properties": DATES}, convert_timestamps=False)
    assert item["attributes"] == DATES


def test_an_email_shaped_or_cio_user_id_names_the_person_by_that_identifier():
    assert items({"type": "identify", "userId": "ada@example.com"})[0]["identifiers"] == \
        {"email": "ada@example.com"}
    assert items({"type": "identify", "userId": "cio_03000001"})[0]["identifiers"] == \
        {"cio_id": "03000001"}


def test_page_is_a_page_view_named_by_its_url():
    (item,) = items({"type": "page", "userId": "u1", "name": "Pricing", "messageId": "m-1",
                     "properties": {"url": "https://shop.example/pricing", "title": "Pricing"}})
    assert item == {"type": "person", "action": "page", "identifiers": {"id": "u1"},
                    "name": "https://shop.example/pricing", "id": "54C6T75JT1N7P3VVJWJ37RWJKR",
                    "timestamp": RECEIVED_UNIX,
                    "attributes": {"url": "https://shop.example/pricing", "title": "Pricing"}}


def test_page_without_url_falls_back_to_the_context_url_then_the_name():
    assert items({"type": "page", "userId": "u1",
                  "context": {"page": {"url": "https://shop.example/"}}})[0]["name"] == \
        "https://shop.example/"
    assert items({"type": "page", "userId": "u1", "name": "Home"})[0]["name"] == "Home"
    with pytest.raises(EventRejected, match="properties.url"):
        items({"type": "page", "userId": "u1"})


def test_screen_is_a_screen_view_named_by_the_screen():
    (item,) = items({"type": "screen", "userId": "u1", "name": "Dashboard", "messageId": "m-1",
                     "properties": {"app_version": "2.1.0"}})
    assert item == {"type": "person", "action": "screen", "identifiers": {"id": "u1"},
                    "name": "Dashboard", "id": "54C6T75JT1N7P3VVJWJ37RWJKR",
                    "timestamp": RECEIVED_UNIX, "attributes": {"app_version": "2.1.0"}}


def test_group_identifies_an_object_and_relates_the_person_to_it():
    (item,) = items({"type": "group", "userId": "u1", "groupId": "acme",
                     "traits": {"name": "Acme Corp", "plan": "enterprise"}})
    assert item == {"type": "object", "action": "identify",
                    "identifiers": {"object_type_id": "1", "object_id": "acme"},
                    "attributes": {"name": "Acme Corp", "plan": "enterprise"},
                    "cio_relationships": [{"identifiers": {"id": "u1"}}]}


def test_group_object_type_comes_from_options_then_traits_then_the_setting():
    raw = {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"objectTypeId": "3"}}
    assert items(raw)[0]["identifiers"]["object_type_id"] == "3"
    assert items(raw, {"object_type_id": 7})[0]["identifiers"]["object_type_id"] == "7"
    assert items({**raw, "traits": {}}, object_type_id="2")[0]["identifiers"] == \
        {"object_type_id": "2", "object_id": "acme"}
    with pytest.raises(EventRejected, match="options.object_type_id"):
        items(raw, {"object_type_id": "accounts"})
    with pytest.raises(EventRejected, match="options.object_type_id"):
        items(raw, {"object_type_id": "\u0661"})  # an Arabic-Indic 1: a digit, not ASCII


def test_group_is_skipped_when_no_object_type_is_configured():
    with pytest.raises(SkipEvent, match="object_type_id"):
        items({"type": "group", "userId": "u1", "groupId": "acme"}, object_type_id=None)


def test_anonymous_group_relates_the_object_to_the_anonymous_person():
    (item,) = items({"type": "group", "anonymousId": "anon-1", "groupId": "acme"})
    assert item["action"] == "identify_anonymous"
    assert item["cio_relationships"] == [{"identifiers": {"anonymous_id": "anon-1"}}]


def test_alias_merges_the_previous_person_into_the_user():
    assert items({"type": "alias", "userId": "user-1042", "previousId": "old@example.com"}) == [
        {"type": "person", "action": "merge", "primary": {"id": "user-1042"},
         "secondary": {"email": "old@example.com"}}]


def test_alias_to_itself_is_skipped():
    with pytest.raises(SkipEvent, match="same person"):
        items({"type": "alias", "userId": "u1", "previousId": "u1"})


# --- money and commerce --------------------------------------------------------------------------

def test_order_completed_keeps_revenue_currency_and_products_as_event_attributes():
    (item,) = items(fixture("order_completed.json"))
    assert item["name"] == "Order Completed"  # Customer.io has no native commerce names
    assert item["id"] == "0X84J2REFKM3NPQD7W6WC8XQ5R"
    assert item["timestamp"] == 1795183391
    attributes = item["attributes"]
    assert attributes["revenue"] == 25.0  # "25.00" normalized to a number
    assert attributes["currency"] == "EUR"  # "eur" normalized to upper case
    assert attributes["total"] == 27.5
    assert attributes["products"][1] == {
        "product_id": "505bd76785ebb509fc183733", "sku": "46493-32", "name": "Uno Card Game",
        "price": 3, "quantity": 2, "category": "Games"}


def test_value_passes_through_for_anonymous_events():
    (item,) = items(fixture("newsletter_signup.json"))
    assert item["identifiers"] == {"anonymous_id": "anon-7f1c2e"}
    assert item["attributes"] == {"value": 4.5, "list": "weekly"}


# --- dedup and anonymous activity ----------------------------------------------------------------

def test_the_dedup_id_depends_on_the_message_id_only():
    first = event(fixture("order_completed.json"))
    later = parse_event(fixture("order_completed.json"),
                        received_at=datetime(2030, 1, 1, tzinfo=UTC))
    adapter = destination()
    ids = {adapter.translate(e, {})[0].body["id"] for e in (first, first, later)}
    assert ids == {"0X84J2REFKM3NPQD7W6WC8XQ5R"}


def test_a_message_id_that_is_already_a_ulid_is_used_as_it_is():
    (item,) = items({"type": "track", "event": "E", "userId": "u1",
                     "messageId": "01arz3ndektsv4rrffq69g5fav"})
    assert item["id"] == "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def test_a_screen_without_a_name_is_named_by_its_name_property():
    (item,) = items({"type": "screen", "userId": "u1", "properties": {"name": "Settings"}})
    assert item["name"] == "Settings"
    with pytest.raises(EventRejected, match="name of the screen"):
        items({"type": "screen", "userId": "u1"})


def test_anonymous_track_page_and_screen_use_the_anonymous_id():
    for raw in ({"type": "track", "event": "Viewed Pricing", "anonymousId": "a1"},
                {"type": "page", "anonymousId": "a1", "properties": {"url": "https://x.example"}},
                {"type": "screen", "anonymousId": "a1", "name": "Home"}):
        assert items(raw)[0]["identifiers"] == {"anonymous_id": "a1"}


def test_anonymous_identify_uses_the_email_trait_or_is_skipped():
    (item,) = items({"type": "identify", "anonymousId": "a1",
                     "traits": {"email": "ada@example.com"}})
    assert item["identifiers"] == {"email": "ada@example.com"}
    assert item["attributes"] == {"email": "ada@example.com", "anonymous_id": "a1"}
    with pytest.raises(SkipEvent, match="only an anonymousId"):
        items({"type": "identify", "anonymousId": "a1", "traits": {"plan": "free"}})
    with pytest.raises(SkipEvent, match="only an anonymousId"):  # no address: no person
        items({"type": "identify", "anonymousId": "a1", "traits": {"email": "ada at home"}})


# --- semantic events -----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "action"), [
    ("Delete Person", "delete"), ("User Deleted", "delete"),
    ("Suppress Person", "suppress"), ("User Suppressed", "suppress"),
    ("Unsuppress Person", "unsuppress"), ("User Unsuppressed", "unsuppress"),
])
def test_semantic_events_become_person_operations(name, action):
    assert items({"type": "track", "event": name, "userId": "user-1042"}) == [
        {"type": "person", "action": action, "identifiers": {"id": "user-1042"}}]


def test_delete_person_fixture_goes_to_the_batch_endpoint():
    assert request(fixture("delete_person.json"))["body"] == {"batch": [
        {"type": "person", "action": "delete", "identifiers": {"id": "user-1042"}}]}


def test_semantic_event_without_a_user_id_is_skipped():
    with pytest.raises(SkipEvent, match="only an identified person"):
        items({"type": "track", "event": "Delete Person", "anonymousId": "a1"})


def test_device_events_register_and_forget_a_push_token():
    device = {"token": "apns-token-1", "type": "iOS"}
    added = items({"type": "track", "event": "Device Created or Updated", "userId": "user-1",
                   "timestamp": "2026-11-01T10:00:00Z", "properties": {"app_version": "2.1"},
                   "context": {"device": device}})
    assert added == [{"type": "person", "action": "add_device",
                      "identifiers": {"id": "user-1"},
                      "device": {"token": "apns-token-1", "platform": "ios",
                                 "last_used": 1793527200, "attributes": {"app_version": "2.1"}}}]
    deleted = items({"type": "track", "event": "Device Deleted", "userId": "user-1",
                     "context": {"device": device}})
    assert deleted == [{"type": "person", "action": "delete_device",
                        "identifiers": {"id": "user-1"}, "device": {"token": "apns-token-1"}}]


def device_added(properties: dict[str, Any]) -> dict[str, Any]:
    (item,) = items({"type": "track", "event": "Device Created or Updated", "userId": "u1",
                     "properties": properties,
                     "context": {"device": {"token": "t-1", "type": "android"}}})
    return item["device"]


def test_device_attributes_are_sent_as_the_strings_customerio_takes():
    device = device_added({"push_enabled": True, "muted": False, "badge": 3, "ratio": 1.5,
                           "app_version": "2.1", "device_locale": "en-GB", "cleared": None})
    assert device["attributes"] == {"push_enabled": "true", "muted": "false", "badge": "3",
                                    "ratio": "1.5", "app_version": "2.1",
                                    "device_locale": "en-GB"}
    assert all(isinstance(value, str) for value in device["attributes"].values())


def test_a_device_with_only_null_properties_has_no_attributes():
    assert "attributes" not in device_added({"push_enabled": None})
    # Nor does a number no JSON body can hold (an embedding program may pass one).
    assert "attributes" not in device_added({"ratio": float("nan"), "big": float("inf")})


@pytest.mark.parametrize(("value", "kind"), [({"os": "14"}, "an object"), (["a"], "an array")])
def test_a_device_attribute_that_is_an_object_or_array_rejects_the_event(value, kind):
    with pytest.raises(EventRejected, match=rf"^properties\.extra: Customer\.io takes device "
                                             rf"attributes as strings only; this one is {kind}"):
        device_added({"push_enabled": True, "extra": value})


def test_device_attribute_values_are_held_to_the_attribute_limits_as_strings():
    with pytest.raises(EventRejected, match=r"^properties\.note: the attribute value is 1001"):
        device_added({"note": "x" * 1001})
    assert device_added({"note": "x" * 1000})


@pytest.mark.parametrize(("context", "error", "message"), [
    ({}, EventRejected, "context.device.token"),
    ({"device": {"token": "t-1", "type": "web"}}, EventRejected, "ios or android"),
    ({"device": {"token": 12345, "type": "ios"}}, EventRejected, "context.device.token"),
    ({"device": {"token": "", "type": "ios"}}, EventRejected, "context.device.token"),
])
def test_a_device_event_customerio_would_refuse_is_rejected(context, error, message):
    with pytest.raises(error, match=message):
        items({"type": "track", "event": "Device Created or Updated", "userId": "u1",
               "context": context})
    with pytest.raises(SkipEvent, match="identified people"):
        items({"type": "track", "event": "Device Deleted", "anonymousId": "a1",
               "context": {"device": {"token": "t-1"}}})


# --- limits --------------------------------------------------------------------------------------

def test_event_name_over_100_bytes_is_rejected_before_sending():
    with pytest.raises(EventRejected, match=r"^event: the event name is 101 bytes"):
        items({"type": "track", "event": "x" * 101, "userId": "u1"})
    assert items({"type": "track", "event": "é" * 50, "userId": "u1"})  # 100 bytes is fine


def test_person_id_over_150_bytes_is_rejected():
    with pytest.raises(EventRejected, match=r"^userId: a person's id is 151 bytes"):
        items({"type": "track", "event": "E", "userId": "u" * 151})
    with pytest.raises(EventRejected, match=r"^previousId"):
        items({"type": "alias", "userId": "u1", "previousId": "p" * 151})


def test_attribute_name_and_value_limits_name_the_trait():
    with pytest.raises(EventRejected, match=r"^traits\.bio: the attribute value is 1001 bytes"):
        items({"type": "identify", "userId": "u1", "traits": {"bio": "b" * 1001}})
    with pytest.raises(EventRejected, match=r"the attribute name is 151 bytes"):
        items({"type": "identify", "userId": "u1", "traits": {"n" * 151: 1}})
    with pytest.raises(EventRejected, match=r"^traits\.tags: the attribute value"):
        items({"type": "group", "userId": "u1", "groupId": "g",
               "traits": {"tags": ["t" * 60] * 20}})


def test_an_item_of_up_to_32_kb_is_sent_and_a_larger_one_rejected():
    # Each item of a v2 batch may be 32 KB; an embedding program may route larger events.
    adapter = destination()

    def item_of(padding: int) -> list[Payload]:
        raw = {"type": "track", "event": "E", "userId": "u1", "messageId": "m-1",
               "properties": {"blob": "x" * padding}}
        return list(adapter.translate(parse_event(raw, received_at=RECEIVED,
                                                  max_bytes=64 * 1024), {}))

    base = len(orjson.dumps(item_of(0)[0].body))
    (payload,) = item_of(32 * 1024 - base)
    assert len(orjson.dumps(payload.body)) == 32 * 1024
    with pytest.raises(EventRejected, match="item is 32769 bytes; each item of a batch may be "
                                            "at most 32768"):
        item_of(32 * 1024 - base + 1)


def test_event_attributes_are_not_held_to_the_person_attribute_value_limit():
    (item,) = items({"type": "track", "event": "E", "userId": "u1",
                     "properties": {"note": "n" * 5000}})
    assert len(item["attributes"]["note"]) == 5000


# --- per-event options -------------------------------------------------------------------------

def test_update_only_option_never_creates_a_person():
    (item,) = items({"type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
                    {"update_only": True})
    assert item["attributes"] == {"plan": "pro", "_update": True}


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "field", "message"), [
    ({"region": "asia"}, "region", "expected `us` or `eu`"),
    ({"base_url": "track.customer.io"}, "base_url", "http:// or https://"),
    ({"object_type_id": "companies"}, "object_type_id", "whole number"),
    ({"site": "x"}, "site", "Extra inputs are not permitted"),
])
def test_settings_errors_name_the_field_and_say_what_was_expected(settings, field, message):
    with pytest.raises(ValidationError) as caught:
        CustomerIOSettings.model_validate({**SETTINGS, **settings})
    (error,) = caught.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]


def test_every_setting_is_described_and_the_key_is_secret():
    fields = CustomerIOSettings.model_fields
    assert all(field.description for field in fields.values())
    assert "SecretStr" in repr(fields["api_key"].annotation)
    assert API_KEY not in repr(destination().settings)


def test_no_secret_in_any_payload_body():
    adapter = destination()
    for name in ("course_started.json", "order_completed.json", "identify_merge.json",
                 "delete_person.json", "newsletter_signup.json"):
        for payload in adapter.translate(event(fixture(name)), {}):
            assert API_KEY not in orjson.dumps(payload.body).decode()


# --- responses -----------------------------------------------------------------------------------

PAYLOADS = [Payload({"n": n}) for n in range(3)]


def test_207_fails_only_the_items_it_lists():
    response = HttpResponse(207, {}, orjson.dumps({"errors": [
        {"batch_index": 1, "reason": "invalid", "field": "identifiers",
         "message": "id is too long"}]}))
    outcomes = destination().read_response(PAYLOADS, response)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentError)
    assert outcomes[1].reason == ("Customer.io refused the item (reason: invalid, "
                                  "field: identifiers, message: id is too long)")


def test_a_200_that_still_lists_errors_fails_those_items():
    response = HttpResponse(200, {}, orjson.dumps({"errors": [{"batch_index": 0,
                                                               "reason": "required"}]}))
    outcomes = destination().read_response(PAYLOADS, response)
    assert isinstance(outcomes[0], PermanentError) and outcomes[1:] == [None, None]


def test_a_400_naming_items_fails_them_and_resends_the_rest():
    response = HttpResponse(400, {}, orjson.dumps({"errors": [{"batch_index": 2,
                                                               "message": "bad"}]}))
    outcomes = destination().read_response(PAYLOADS, response)
    assert isinstance(outcomes[0], RetryableError) and isinstance(outcomes[1], RetryableError)
    assert isinstance(outcomes[2], PermanentError)


@pytest.mark.parametrize("response", [
    HttpResponse(200, {}, b"{}"),
    HttpResponse(200, {}, b""),
    HttpResponse(429, {"Retry-After": "3"}, b""),
    HttpResponse(401, {}, b"Unauthorized"),
    HttpResponse(400, {}, orjson.dumps({"errors": [{"reason": "malformed"}]})),
    HttpResponse(503, {}, b"<html>down</html>"),
    # Only positions of this request name an item: an index past its end, a negative one
    # or a bool (an int to Python, True == 1) names none, so the answer is its status's.
    # Taken as naming one, a 400 had its items retried until their attempts ran out.
    HttpResponse(400, {}, orjson.dumps({"errors": [{"batch_index": 3, "reason": "x"}]})),
    HttpResponse(400, {}, orjson.dumps({"errors": [{"batch_index": -1, "reason": "x"}]})),
    HttpResponse(400, {}, orjson.dumps({"errors": [{"batch_index": True, "reason": "x"}]})),
    HttpResponse(207, {}, orjson.dumps({"errors": [{"batch_index": True, "reason": "x"}]})),
])
def test_other_answers_are_judged_by_their_status(response):
    assert destination().read_response(PAYLOADS, response) is None


def test_429_and_5xx_are_retried_by_the_core():
    assert {429, 500, 502, 503, 504} <= CustomerIO.delivery.retry_on
    assert CustomerIO.delivery.batch_bytes + len(b'{"batch":[]}') == 500_000


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    CustomerIO, settings={"site_id": "site-0001", "api_key": "cio-track-key-0001"},
    examples=100)
