"""Slack: the event that goes in, the incoming-webhook request that comes out."""

from __future__ import annotations

import json
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from router.testing import DestinationHarness, conformance_test
from router import (ConfigError, EventRejected, HttpResponse, Payload, PermanentError,
                    SkipEvent, parse_event)
from router.registry import create_registry
from router_plugins.slack.destination import Slack, SlackSettings

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "events"
WEBHOOK = "https://hooks.slack.com/services/T000/B000/SECRETxyz123"


def slack(**settings: Any) -> Slack:
    return Slack(SlackSettings.model_validate({"url": WEBHOOK, **settings}))


def event(raw: dict[str, Any]):
    return parse_event(raw, received_at=datetime(2024, 3, 1, 12, tzinfo=UTC))


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def text(raw: dict[str, Any], options: dict[str, Any] | None = None, **settings: Any) -> str:
    (payload,) = slack(**settings).translate(event(raw), options or {})
    return payload.body["text"]


def test_discovered_through_its_entry_point():
    assert create_registry().get("slack").cls is Slack


def test_track_posts_one_message_to_the_webhook():
    adapter = slack()
    request = adapter.build_request(adapter.translate(event(fixture("course_started.json")), {}))
    assert (request.method, request.url, request.headers) == (
        "POST", WEBHOOK, {"Content-Type": "application/json"})
    assert orjson.loads(request.body or b"") == {"text": "*Course Started* by AiUGstSDIg"}


def test_anonymous_events_name_the_anonymous_id():
    assert text({"type": "track", "event": "Viewed Pricing", "anonymousId": "anon-7f1c2e"}) == \
        "*Viewed Pricing* by anon-7f1c2e"


def test_identify_posts_by_default_with_the_email_when_there_is_one():
    assert text(fixture("identify_merge.json")) == "*Identified* user-1042 (ada@example.com)"
    assert text({"type": "identify", "anonymousId": "a1"}) == "*Identified* a1"


@pytest.mark.parametrize(("raw", "expected"), [
    ({"type": "page", "userId": "u1", "name": "Pricing"}, "*Viewed page* Pricing by u1"),
    ({"type": "page", "anonymousId": "a1", "properties": {"url": "https://x.example/"}},
     "*Viewed page* https://x.example/ by a1"),
    ({"type": "screen", "userId": "u1", "name": "Home"}, "*Viewed screen* Home by u1"),
    ({"type": "group", "userId": "u1", "groupId": "acme"}, "u1 joined group *acme*"),
    ({"type": "alias", "userId": "u1", "previousId": "a1"}, "a1 is now known as u1"),
])
def test_other_call_types_post_when_listed_in_types(raw, expected):
    assert text(raw, types=["page", "screen", "group", "alias"]) == expected


def test_call_types_not_listed_are_skipped_with_the_reason():
    with pytest.raises(SkipEvent, match="posts only track, identify calls"):
        slack().translate(event({"type": "page", "userId": "u1"}), {})


def test_per_type_templates_and_a_default():
    adapter_settings = {
        "types": ["track", "identify", "group"],
        "templates": {
            "track": ":moneybag: {{ event.event }} for {{ event.properties.revenue }} "
                     "{{ event.properties.currency }}",
            "default": "{{ event.type }} from {{ event.userId }}",
        },
    }
    assert text(fixture("order_completed.json"), **adapter_settings) == \
        ":moneybag: Order Completed for 25.0 EUR"
    assert text(fixture("identify_merge.json"), **adapter_settings) == "identify from user-1042"


@pytest.mark.parametrize("raw", [
    {"type": "track", "event": "E", "userId": "u1"},
    {"type": "identify", "userId": "u1"},
    {"type": "page", "userId": "u1", "name": "Home"},
    {"type": "screen", "userId": "u1", "name": "Home"},
    {"type": "group", "userId": "u1", "groupId": "g1"},
    {"type": "alias", "userId": "u1", "previousId": "a1"},
], ids=lambda raw: raw["type"])
def test_each_call_type_takes_a_template_of_its_own(raw):
    call_type = raw["type"]
    assert text(raw, types=[call_type], templates={
        call_type: f"{call_type}: {{{{ event.userId }}}}",
        "default": "the default"}) == f"{call_type}: u1"


def test_an_amount_the_router_cannot_read_is_shown_as_it_came():
    # A message for people: a sale alert is worth sending with "$25.00" (review).
    harness = DestinationHarness(Slack, {"url": WEBHOOK, "templates": {
        "track": "{{ event.event }}: {{ event.properties.revenue }}"}})
    (payload,) = harness.payloads({"type": "track", "event": "Order Completed",
                                   "userId": "u-1", "properties": {"revenue": "$25.00"}})
    assert payload.body["text"] == "Order Completed: $25.00"


def test_templates_see_the_per_event_options():
    assert text({"type": "track", "event": "Deployed", "userId": "ci"},
                {"channel_note": "prod"},
                templates={"track": "{{ event.event }} ({{ options.channel_note }})"}) == \
        "Deployed (prod)"


def test_missing_fields_are_null_in_templates_rather_than_errors():
    assert text({"type": "track", "event": "E", "anonymousId": "a1"},
                templates={"track": "{{ event.userId }}|{{ event.groupId }}|{{ event.traits }}"}) \
        == "None|None|{}"


def test_event_values_are_escaped_so_they_cannot_mention_channels_or_forge_links():
    assert text({"type": "track", "event": "<!channel> & <https://evil.example|bank>",
                 "userId": "u1"}) == \
        "*&lt;!channel&gt; &amp; &lt;https://evil.example|bank&gt;* by u1"


def test_property_names_are_escaped_too():
    template = "{% for k, v in event.properties.items() %}{{ k }}={{ v }} {% endfor %}"
    assert text({"type": "track", "event": "E", "userId": "u1",
                 "properties": {"<!here> <https://evil.example|x>": "v & <b>", "plan": "pro"}},
                templates={"track": template}) == \
        "&lt;!here&gt; &lt;https://evil.example|x&gt;=v &amp; &lt;b&gt; plan=pro"


def test_the_templates_own_markup_is_kept():
    assert text({"type": "track", "event": "Signed Up", "userId": "u1"},
                templates={"track": "<https://admin.example/users/{{ event.userId }}|"
                                    "{{ event.userId }}> signed up"}) == \
        "<https://admin.example/users/u1|u1> signed up"


# --- which track events post ----------------------------------------------------------------

def test_events_allow_list_takes_names_and_glob_patterns():
    settings = {"events": ["Order *", "Signed Up"]}
    assert text(fixture("order_completed.json"), **settings) == "*Order Completed* by user-1042"
    assert text({"type": "track", "event": "Signed Up", "userId": "u1"}, **settings)
    with pytest.raises(SkipEvent, match="'Course Started' matches none of the `events`"):
        slack(**settings).translate(event(fixture("course_started.json")), {})


def test_semantic_events_are_skipped_unless_the_allow_list_names_them():
    with pytest.raises(SkipEvent, match="semantic event"):
        slack().translate(event(fixture("delete_person.json")), {})
    assert text(fixture("delete_person.json"), events=["Delete Person"]) == \
        "*Delete Person* by user-1042"


def test_a_template_that_renders_nothing_skips_the_event():
    settings = {"templates": {"track": "{% if event.properties.get('revenue') %}"
                                       "{{ event.event }}{% endif %}"}}
    with pytest.raises(SkipEvent, match="rendered no text"):
        slack(**settings).translate(event(fixture("course_started.json")), {})
    assert text(fixture("order_completed.json"), **settings) == "Order Completed"


def test_a_failing_template_rejects_the_event_naming_the_template():
    with pytest.raises(EventRejected, match=r"settings\.templates\.track"):
        text({"type": "track", "event": "E", "userId": "u1"},
             templates={"track": "{{ event.properties.missing.deeper }}"})


def test_text_over_slacks_limit_is_rejected():
    with pytest.raises(EventRejected, match="40000"):
        text({"type": "track", "event": "E", "userId": "u1"},
             templates={"track": "{{ 'x' * 40001 }}"})


# --- settings ---------------------------------------------------------------------------------

def test_a_template_that_does_not_compile_is_a_config_error_naming_its_field():
    with pytest.raises(ConfigError) as caught:
        slack(templates={"track": "{{ event.event "})
    assert caught.value.field == "settings.templates.track"


@pytest.mark.parametrize(("settings", "message"), [
    ({"url": "hooks.slack.com/services/T/B/x"}, "https:// URL"),
    ({"templates": {"page": "x"}}, "templates for page are set, but `types` does not list"),
    ({"types": ["purchase"]}, "track"),
    ({"templates": {"purchase": "x"}}, "default"),
    ({"channel": "#general"}, "Extra inputs are not permitted"),
])
def test_settings_errors_say_what_was_expected(settings, message):
    with pytest.raises(ValidationError) as caught:
        SlackSettings.model_validate({"url": WEBHOOK, **settings})
    assert message in str(caught.value)


def test_the_webhook_url_is_a_secret_kept_out_of_errors_and_bodies():
    assert all(field.description for field in SlackSettings.model_fields.values())
    with pytest.raises(ValidationError) as caught:
        SlackSettings.model_validate({"url": "ftp://SECRETxyz123"})
    assert "SECRETxyz123" not in str(caught.value)
    adapter = slack(types=["track", "identify", "page", "screen", "group", "alias"])
    for name in ("course_started.json", "order_completed.json", "identify_merge.json"):
        for payload in adapter.translate(event(fixture(name)), {}):
            assert "SECRETxyz123" not in orjson.dumps(payload.body).decode()
    assert adapter.endpoints() == (WEBHOOK,)


# --- responses --------------------------------------------------------------------------------

ONE = [Payload({"text": "hi"})]


@pytest.mark.parametrize(("status", "body", "reason"), [
    (400, b"invalid_payload", "Slack refused the message: HTTP 400 invalid_payload (the message "
                              "is not valid for Slack; check the template's output)"),
    (403, b"action_prohibited", "Slack refused the message: HTTP 403 action_prohibited (a "
                                "workspace admin restricted posting to this channel)"),
    (404, b"channel_not_found", "Slack refused the message: HTTP 404 channel_not_found (the "
                                "webhook's channel was deleted or the app removed from it)"),
    (410, b"channel_is_archived", "Slack refused the message: HTTP 410 channel_is_archived (the "
                                  "webhook's channel is archived)"),
    (403, b"invalid_token", "Slack refused the message: HTTP 403 invalid_token (the webhook "
                            "was revoked; create a new one)"),
    (404, b"something_new", "Slack refused the message: HTTP 404 something_new"),
])
def test_refusals_are_permanent_with_slacks_reason(status, body, reason):
    (outcome,) = slack().read_response(ONE, HttpResponse(status, {}, body))
    assert isinstance(outcome, PermanentError)
    assert outcome.reason == reason


@pytest.mark.parametrize("response", [
    HttpResponse(200, {}, b"ok"),
    HttpResponse(429, {"Retry-After": "30"}, b"rate_limited"),
    HttpResponse(500, {}, b"rollup_error"),
])
def test_success_rate_limits_and_server_errors_are_left_to_the_core(response):
    assert slack().read_response(ONE, response) is None


def test_delivery_follows_slacks_webhook_limits():
    assert (Slack.delivery.batch_size, Slack.delivery.rate_limit, Slack.delivery.concurrency) \
        == (1, 1.0, 1)
    assert {429, 500} <= Slack.delivery.retry_on


# The contract every destination keeps, whatever its vendor (router.testing).

test_conformance = conformance_test(
    Slack, settings={"url": "https://hooks.slack.com/services/T0001/B0001/slack-secret-0001"},
    examples=100)
