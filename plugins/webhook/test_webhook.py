"""The webhook destination: the event as JSON, or a sandboxed template's output."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router import EventRejected, SkipEvent
from router.errors import ConfigError
from router.testing import DestinationHarness, conformance_test
from router_plugins.webhook.destination import Webhook

URL = "https://hooks.example.com/in"
ORDER = {"type": "track", "event": "Order Completed", "userId": "user-1042",
         "messageId": "msg-1",
         "properties": {"order_id": "o-1", "revenue": "25", "currency": "eur"},
         "integrations": {"webhook": {"plan": "pro"}}}


def test_without_a_template_the_body_is_the_normalized_event():
    harness = DestinationHarness(Webhook, {"url": URL})
    (request,) = harness.requests(ORDER)
    assert (request.method, request.url) == ("POST", URL)
    assert request.headers == {"Content-Type": "application/json"}
    body = harness.request_json(request)
    assert body["messageId"] == "msg-1" and body["event"] == "Order Completed"
    assert body["properties"]["revenue"] == 25.0 and body["properties"]["currency"] == "EUR"
    assert body["receivedAt"].endswith("Z")


def test_a_template_renders_the_body_with_event_and_options():
    harness = DestinationHarness(Webhook, {
        "url": URL, "method": "PUT", "headers": {"Authorization": "Bearer hook-token-0001"},
        "body": '{"order": {{ event.properties.order_id | tojson }}, '
                '"plan": {{ options.plan | tojson }}}'})
    (request,) = harness.requests(ORDER, {"plan": "pro"})
    assert request.method == "PUT"
    assert request.headers["Authorization"] == "Bearer hook-token-0001"
    assert harness.request_json(request) == {"order": "o-1", "plan": "pro"}


def test_a_body_that_is_not_json_is_sent_as_text():
    harness = DestinationHarness(Webhook, {"url": URL,
                                           "body": "{{ event.event }} by {{ event.userId }}"})
    (request,) = harness.requests(ORDER)
    assert request.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert request.body == b"Order Completed by user-1042"


def test_a_json_template_broken_by_an_events_values_is_refused_not_sent_as_text():
    # Without | tojson, a quote in a value breaks the JSON the receiver expects.
    harness = DestinationHarness(Webhook, {"url": URL,
                                           "body": '{"name": "{{ event.event }}"}'})
    (fine,) = harness.requests({**ORDER, "event": "Signed Up"})
    assert harness.request_json(fine) == {"name": "Signed Up"}
    with pytest.raises(EventRejected, match="not valid JSON for this event.*tojson"):
        harness.payloads({**ORDER, "event": 'The "Big" Sale'})


def test_a_json_template_whose_keys_an_events_values_chose_is_refused():
    # `x", "role": "admin` put in without | tojson made valid JSON with "role" twice: the
    # receiver took the event's "admin" (templates audit).
    harness = DestinationHarness(Webhook, {
        "url": URL, "body": '{"role": "viewer", "name": "{{ event.event }}"}'})
    with pytest.raises(EventRejected, match="has the key 'role' twice for this event"):
        harness.payloads({**ORDER, "event": 'x", "role": "admin'})


def test_a_body_that_renders_nothing_skips_the_event():
    # It was POSTed empty; as with Slack, an empty render is how a template leaves one out.
    harness = DestinationHarness(Webhook, {
        "url": URL, "body": "{% if event.event != 'Drop' %}{{ event.event }}{% endif %}"})
    with pytest.raises(SkipEvent, match="rendered nothing"):
        harness.payloads({**ORDER, "event": "Drop"})
    assert harness.payloads(ORDER)


@pytest.mark.parametrize("headers, complaint", [
    ({"X-Trace": "abc\r\nX-Injected: yes"}, "line break"),
    ({"X Trace": "abc"}, "not an HTTP header name"),
])
def test_headers_http_cannot_carry_are_refused_at_load(headers, complaint):
    # Accepted, they made every event a dead letter as a plugin bug (aiohttp refuses them).
    with pytest.raises(ValidationError, match=complaint) as caught:
        Webhook.Settings.model_validate({"url": URL, "headers": headers})
    # What the router shows (`router check`: file, line, field and this message) never
    # quotes the value, a secret.
    assert "X-Injected" not in caught.value.errors()[0]["msg"]
    Webhook.Settings.model_validate({"url": URL, "headers": {"X-Trace": "a\tb"}})


def test_a_template_that_fails_costs_only_that_event():
    harness = DestinationHarness(Webhook, {"url": URL, "body": "{{ event.properties.missing.x }}"})
    with pytest.raises(EventRejected, match="settings.body"):
        harness.payloads(ORDER)


def test_a_template_reaching_python_internals_is_refused():
    harness = DestinationHarness(Webhook, {"url": URL, "body": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(EventRejected, match="sandbox"):
        harness.payloads(ORDER)


def test_a_template_that_does_not_compile_fails_at_load_with_its_line():
    with pytest.raises(ConfigError, match="line 2"):
        DestinationHarness(Webhook, {"url": URL, "body": "{\n{{ event.event }"})


@pytest.mark.parametrize("url", ["ftp://example.com/x", "hooks.example.com", "http://"])
def test_only_http_urls_with_a_host_are_accepted(url):
    with pytest.raises(ValidationError, match="http"):
        Webhook.Settings.model_validate({"url": url})


def test_credentials_in_the_url_and_an_authorization_header_are_refused_together():
    with pytest.raises(ValidationError, match="not both"):
        Webhook.Settings.model_validate({"url": "https://svc:pw@hooks.example.com/in",
                                         "headers": {"authorization": "Bearer t"}})
    Webhook.Settings.model_validate({"url": "https://svc:pw@hooks.example.com/in",
                                     "headers": {"X-Api-Key": "k"}})


test_conformance = conformance_test(
    Webhook, settings={"url": URL, "headers": {"X-Api-Key": "hook-secret-0001"}}, examples=100)
