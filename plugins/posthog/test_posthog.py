"""The PostHog destination, as behaviour: the event that goes in, the request that comes out."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from router import EventRejected, HttpResponse, Payload, SkipEvent, parse_event
from router.registry import create_registry
from router.testing import DestinationHarness, conformance_test
from router_plugins.posthog.translate import UUID_NAMESPACE, event_uuid
from router_plugins.posthog.destination import PostHog, PostHogSettings

RECEIVED = datetime(2026, 11, 20, 14, 3, 12, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
API_KEY = "phc_project-key-0001"
JSON = {"Content-Type": "application/json"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def posthog(**settings: Any) -> PostHog:
    return PostHog(PostHogSettings(api_key=API_KEY, **settings))


def translate(destination: PostHog, raw: dict[str, Any], options: dict | None = None,
              **parse: Any) -> list[Payload]:
    return list(destination.translate(parse_event(raw, received_at=RECEIVED, **parse),
                                      options or {}))


def request(destination: PostHog, raw: dict[str, Any], options: dict | None = None
            ) -> dict[str, Any]:
    """The request the event makes, with the body decoded."""
    built = destination.build_request(translate(destination, raw, options))
    return {"method": built.method, "url": built.url, "headers": built.headers,
            "body": orjson.loads(built.body)}


def event(destination: PostHog, raw: dict[str, Any], options: dict | None = None
          ) -> dict[str, Any]:
    """The one capture event the event becomes."""
    (payload,) = translate(destination, raw, options)
    return payload.body


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Signed Up", "userId": "user-1", "messageId": "m-1",
            "timestamp": "2026-11-20T14:03:12.000Z", **fields}


@pytest.mark.parametrize("name", ["$create_alias", "$identify", "$groupidentify", "$pageview"])
def test_a_track_name_posthog_reserves_is_rejected(name):
    # Sent as it was, a customer's $create_alias asked PostHog to merge without an alias.
    with pytest.raises(EventRejected, match="starts with '\\$', which PostHog reserves"):
        translate(posthog(), track(event=name))
    assert event(posthog(), track(event="Paid in $"))["event"] == "Paid in $"


def test_discovered_through_its_entry_point():
    assert create_registry().get("posthog").package == "event-router"


# The contract every destination keeps, on the kit's sample events and on events hypothesis
# draws, with the uuid as the vendor dedup id.
test_conformance = conformance_test(PostHog, settings={"api_key": API_KEY},
                                    dedup_id=lambda body: body["uuid"])
test_conformance_self_hosted = conformance_test(
    PostHog, settings={"api_key": API_KEY, "host": "https://posthog.internal.example",
                       "person_profiles": "identified_only", "historical_migration": True})


# --- track ------------------------------------------------------------------------------

def test_track_goes_to_batch_with_an_iso_timestamp_and_a_uuid_from_the_messageid():
    assert request(posthog(), fixture("course_started")) == {
        "method": "POST",
        "url": "https://us.i.posthog.com/batch/",
        "headers": JSON,
        "body": {"api_key": API_KEY, "batch": [{
            "event": "Course Started",
            "distinct_id": "AiUGstSDIg",
            "properties": {
                "$lib": "analytics.js", "$lib_version": "2.11.1", "$ip": "108.0.78.21",
                "$locale": "en-US",
                "$useragent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_11_0) AppleWebKit/"
                              "537.36 (KHTML like Gecko) Chrome/46.0.2490.86 Safari/537.36",
                "$current_url": "https://customer.io", "$pathname": "/",
                "utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "winter",
                "utm_term": "courses", "utm_content": "banner",
                "course_in_series": 1, "course_format": "pass/fail",
                "title": "Intro to Customer.io"},
            # receive time less the client's clock skew (sentAt - originalTimestamp = 17 ms)
            "timestamp": "2026-11-20T14:03:11.983Z",
            "uuid": "59170621-49e4-5e78-8290-bf0c4ac77587",
        }]},
    }


@given(st.text())
def test_uuid_is_exactly_the_standard_libraries_uuid5_of_any_messageid(message_id):
    assert event_uuid(message_id) == str(uuid.uuid5(UUID_NAMESPACE, message_id))


def test_uuid_is_a_uuidv5_of_the_messageid_the_same_on_every_translation():
    first = event(posthog(), track(messageId="msg-42"))["uuid"]
    assert first == event(posthog(), track(messageId="msg-42"))["uuid"]
    assert uuid.UUID(first).version == 5
    assert first != event(posthog(), track(messageId="msg-43"))["uuid"]


def test_the_device_app_screen_and_network_context_become_posthogs_properties():
    context = {"os": {"name": "iOS", "version": "17.1"},
               "device": {"id": "d-1", "manufacturer": "Apple", "model": "iPhone15,2",
                          "name": "Ada's phone"},
               "app": {"name": "Shop", "version": "3.2", "build": "320", "namespace": "ex.shop"},
               "screen": {"width": 1179, "height": 2556, "density": 3},
               "network": {"carrier": "T-Mobile"}, "timezone": "Europe/London"}
    properties = event(posthog(), track(context=context))["properties"]
    assert {key: value for key, value in properties.items() if key.startswith("$")} == {
        "$os": "iOS", "$os_version": "17.1", "$device_id": "d-1",
        "$device_manufacturer": "Apple", "$device_model": "iPhone15,2",
        "$device_name": "Ada's phone", "$app_name": "Shop", "$app_version": "3.2",
        "$app_build": "320", "$app_namespace": "ex.shop", "$screen_width": 1179,
        "$screen_height": 2556, "$screen_density": 3, "$network_carrier": "T-Mobile",
        "$timezone": "Europe/London", "$geoip_disable": True}


def test_anonymous_event_uses_the_anonymous_id_and_no_geoip_without_an_ip():
    body = event(posthog(), fixture("newsletter_signup"))
    assert body["distinct_id"] == "anon-7f1c2e"
    assert body["properties"] == {
        "$lib": "analytics.js", "$lib_version": "2.11.1",
        "$current_url": "https://shop.example/blog", "$pathname": "/blog",
        "value": 4.5, "list": "weekly",
        # the router's own address is not the user's
        "$geoip_disable": True}


def test_identified_only_sends_anonymous_events_without_a_person_profile():
    anonymous = event(posthog(person_profiles="identified_only"), fixture("newsletter_signup"))
    assert anonymous["properties"]["$process_person_profile"] is False
    identified = event(posthog(person_profiles="identified_only"), track())
    assert "$process_person_profile" not in identified["properties"]


def test_context_traits_update_the_person_on_other_calls():
    body = event(posthog(), track(context={"traits": {"plan": "pro"}}))
    assert body["properties"]["$set"] == {"plan": "pro"}


# --- money and products ------------------------------------------------------------------

def test_revenue_currency_value_and_products_stay_properties():
    properties = event(posthog(), fixture("order_completed"))["properties"]
    assert properties["revenue"] == 25.0  # "25.00" normalized to a number
    assert properties["currency"] == "EUR"  # upper-cased by the router
    assert properties["total"] == 27.5
    assert [p["price"] for p in properties["products"]] == [19, 3]
    assert [p["quantity"] for p in properties["products"]] == [1, 2]


# --- page, screen, identify, alias, group --------------------------------------------------

def test_page_is_a_pageview_with_current_url():
    body = event(posthog(), {
        "type": "page", "anonymousId": "anon-7f1c2e", "name": "Pricing", "messageId": "p-1",
        "properties": {"url": "https://shop.example/pricing", "path": "/pricing",
                       "title": "Pricing"},
        "context": {"page": {"url": "https://shop.example/old", "referrer": "https://x.example"}}})
    assert body["event"] == "$pageview"
    assert body["properties"] == {
        "$current_url": "https://shop.example/pricing", "$pathname": "/pricing",
        "$referrer": "https://x.example", "url": "https://shop.example/pricing",
        "path": "/pricing", "title": "Pricing", "name": "Pricing", "$geoip_disable": True}


def test_screen_is_a_screen_event_with_its_name():
    body = event(posthog(), {"type": "screen", "userId": "user-1", "name": "Home",
                             "properties": {"tab": "feed"}})
    assert body["event"] == "$screen"
    assert body["properties"]["$screen_name"] == "Home"
    assert body["properties"]["tab"] == "feed"


def test_identify_with_both_ids_sets_traits_and_merges_the_anonymous_person():
    assert request(posthog(), fixture("identify_merge"))["body"]["batch"] == [{
        "event": "$identify", "distinct_id": "user-1042",
        "properties": {"$set": {"email": "ada@example.com", "name": "Ada Lovelace",
                                "plan": "pro"},
                       "$anon_distinct_id": "anon-7f1c2e", "$geoip_disable": True},
        "timestamp": "2026-11-20T14:03:12.000Z",
        "uuid": "a579d8e6-c5ee-5d1e-834e-d725bea1de16"}]


@pytest.mark.parametrize("anonymous_id", [
    "undefined", "Anonymous", " guest ", "[object Object]", "0",
    '"null"', "'false'", '"Distinct_ID"',  # quoted, as some libraries send them
])
def test_identify_with_an_id_posthog_refuses_to_merge_is_rejected(anonymous_id):
    with pytest.raises(EventRejected, match="refuses to merge"):
        translate(posthog(), {**fixture("identify_merge"), "anonymousId": anonymous_id})
    # ids that only contain such a word, or quote marks around a real id, are merged
    for fine in ("guest-7f1c", "'anon-7f1c2e'", '"x"', "NULL0"):
        body = event(posthog(), {**fixture("identify_merge"), "anonymousId": fine})
        assert body["properties"]["$anon_distinct_id"] == fine
    # with one id there is no merge, so nothing to refuse
    body = event(posthog(), {"type": "identify", "userId": "user-1", "traits": {"a": 1}})
    assert "$anon_distinct_id" not in body["properties"]


@pytest.mark.parametrize("person_profiles", ["always", "identified_only"])
def test_an_anonymous_identify_sets_the_traits_without_marking_the_person_identified(
        person_profiles):
    # $identify would mark the anonymous person identified, and PostHog never merges an
    # identified person into another, so the visitor's later login could not take them in
    body = event(posthog(person_profiles=person_profiles),
                 {"type": "identify", "anonymousId": "anon-7f1c2e", "traits": {"plan": "pro"}})
    assert body["event"] == "$set"
    assert body["distinct_id"] == "anon-7f1c2e"
    assert body["properties"] == {"$set": {"plan": "pro"}, "$geoip_disable": True}


def test_an_anonymous_identify_without_traits_is_skipped():
    with pytest.raises(SkipEvent, match="only an anonymousId and no traits"):
        translate(posthog(), {"type": "identify", "anonymousId": "anon-7f1c2e"})


def test_alias_is_sent_as_the_previous_id_naming_the_new_one():
    # posthog-python's alias(previous_id, distinct_id): distinct_id = previous, alias = new
    body = event(posthog(), {"type": "alias", "userId": "user-1042",
                             "previousId": "anon-7f1c2e"})
    assert body["event"] == "$create_alias"
    assert body["distinct_id"] == "anon-7f1c2e"
    assert {k: body["properties"][k] for k in ("distinct_id", "alias")} == {
        "distinct_id": "anon-7f1c2e", "alias": "user-1042"}
    with pytest.raises(EventRejected, match="previousId 'null'"):
        translate(posthog(), {"type": "alias", "userId": "user-1042", "previousId": "null"})


def test_group_is_a_groupidentify_of_the_group_type():
    group = {"type": "group", "userId": "user-1", "groupId": "acme-inc",
             "traits": {"name": "Acme", "employees": 120}}
    properties = event(posthog(), group)["properties"]
    assert event(posthog(), group)["event"] == "$groupidentify"
    assert {k: properties[k] for k in ("$group_type", "$group_key", "$group_set", "$groups")} \
        == {"$group_type": "company", "$group_key": "acme-inc",
            "$group_set": {"name": "Acme", "employees": 120},
            "$groups": {"company": "acme-inc"}}
    assert event(posthog(group_type="org"), group)["properties"]["$group_type"] == "org"
    assert event(posthog(), group, {"group_type": "team"})["properties"]["$group_type"] == "team"


# --- semantic events ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Delete Person", "User Deleted"])
def test_deletion_is_skipped_since_capture_cannot_delete(name: str):
    with pytest.raises(SkipEvent, match="persons REST API"):
        translate(posthog(), track(event=name))


@pytest.mark.parametrize("name", ["Suppress Person", "User Suppressed", "Unsuppress Person"])
def test_suppression_is_skipped(name: str):
    with pytest.raises(SkipEvent, match="PostHog has no"):
        translate(posthog(), track(event=name))


# --- per-event options and limits ---------------------------------------------------------

def test_groups_option_ties_the_event_to_groups():
    body = event(posthog(), track(), {"groups": {"company": "acme-inc"}})
    assert body["properties"]["$groups"] == {"company": "acme-inc"}


@pytest.mark.parametrize("options", [{"groups": ["acme"]}, {"groups": {"company": 7}},
                                     {"group_type": ""}, {"group_type": 7}])
def test_bad_options_reject_the_event(options: dict):
    with pytest.raises(EventRejected, match="integrations option"):
        translate(posthog(), track(), options)


def test_an_event_over_posthogs_size_limit_is_rejected_before_sending():
    big = track(properties={"blob": "x" * (900 * 1024)})
    with pytest.raises(EventRejected, match="over its limit of 921600"):
        DestinationHarness(PostHog, posthog().settings).payloads(
            parse_event(big, max_bytes=2_000_000))


def test_a_distinct_id_posthog_would_cut_is_rejected():
    with pytest.raises(EventRejected, match="201 characters"):
        translate(posthog(), track(userId="u" * 201))


def test_an_event_more_than_23_hours_in_the_future_is_rejected():
    with pytest.raises(EventRejected, match="23 hours"):
        translate(posthog(), track(timestamp="2026-11-21T13:03:13.000Z"))
    assert event(posthog(), track(timestamp="2026-11-21T13:00:00.000Z"))  # within 23 h


# --- endpoints and settings ---------------------------------------------------------------

@pytest.mark.parametrize("host, url", [
    ("US", "https://us.i.posthog.com/batch/"),
    ("eu", "https://eu.i.posthog.com/batch/"),
    ("https://posthog.internal.example/", "https://posthog.internal.example/batch/"),
])
def test_where_events_go(host: str, url: str):
    assert request(posthog(host=host), track())["url"] == url


def test_a_self_hosted_host_is_checked_by_the_egress_policy():
    assert posthog(host="http://127.0.0.1:8000").endpoints() == ("http://127.0.0.1:8000",)
    assert posthog(host="EU").endpoints() == ()


def test_historical_migration_marks_the_request():
    assert request(posthog(historical_migration=True), track())["body"][
        "historical_migration"] is True
    assert "historical_migration" not in request(posthog(), track())["body"]


@pytest.mark.parametrize("settings, message", [
    ({"api_key": API_KEY, "host": "APAC"}, "expected US, EU or the http"),
    ({"api_key": API_KEY, "host": "https://eu.posthog.com"}, "use `host: EU`"),
    ({"api_key": "phx_personal"}, "personal API key"),
    ({"api_key": API_KEY, "person_profiles": "never"}, "always"),
    ({"api_key": API_KEY, "apikey": "typo"}, "Extra inputs are not permitted"),
    ({}, "api_key"),
])
def test_settings_errors_say_what_was_expected(settings: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        PostHogSettings.model_validate(settings)


def test_every_setting_is_documented():
    assert all(info.description for info in PostHogSettings.model_fields.values())


def test_the_api_key_never_reaches_a_payload_body_only_the_request():
    destination = posthog()
    for name in ("course_started", "order_completed", "identify_merge", "newsletter_signup"):
        (payload,) = translate(destination, fixture(name))
        assert API_KEY not in orjson.dumps(payload.body).decode()
        assert API_KEY in destination.build_request([payload]).body.decode()


# --- responses ----------------------------------------------------------------------------

@pytest.mark.parametrize("status, body", [
    (200, b'{"status": 1}'),
    (400, b'{"type": "validation_error", "code": "invalid_payload"}'),
    (401, b'{"type": "authentication_error", "code": "invalid_api_key"}'),
    (503, b""),
])
def test_capture_answers_for_the_whole_batch_so_the_status_judges(status: int, body: bytes):
    payloads = translate(posthog(), track())
    assert posthog().read_response(payloads, HttpResponse(status, {}, body)) is None
