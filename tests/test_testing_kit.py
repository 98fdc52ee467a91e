"""The plugin authors' test kit, tested: the fake server, the harness, the conformance suite
(passing for a sound destination, failing for broken ones), the sample events and strategies."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from router import (DeliveryDefaults, Destination, Event, EventRejected, HttpRequest,
                    HttpResponse, Outcome, Payload, PermanentError, RetryableError, SkipEvent,
                    basic_auth, parse_event)
from router.events import CALL_TYPES
from router.testing import (Answer, ConformanceFailure, ConformanceSuite, DestinationHarness,
                            FakeDestinationServer, check_destination, classify_status,
                            conformance_test, edge_events, make_event, sample_events)
from router.testing.strategies import events, raw_events
from router_plugins.webhook.destination import Webhook

pytest_plugins = ["router.testing.pytest_plugin"]

HOOK_SECRET = "Bearer hook-secret-0001"
HOOK_SETTINGS = {"url": "https://hooks.example/in", "headers": {"Authorization": HOOK_SECRET}}


async def post(url: str, data: Any = None, *, timeout: float = 5.0, **kwargs: Any
               ) -> tuple[int, dict[str, str], bytes]:
    """One request from a fresh aiohttp client, as the router's transport would send it:
    ``data`` as JSON, or raw bytes given as ``body=``."""
    body = kwargs.pop("body", None)
    payload = {"data": body} if body is not None else {"json": data}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, timeout=aiohttp.ClientTimeout(total=timeout), **payload,
                                **kwargs) as response:
            return response.status, dict(response.headers), await response.read()


# -- the fake destination server ------------------------------------------------------------

async def test_fake_server_records_every_request_and_answers_200_by_default():
    async with FakeDestinationServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, headers, body = await post(server.url + "/v1/events?strict=1", {"n": 1},
                                           headers={"Authorization": "Bearer k"})
        assert (status, body) == (200, b"{}")
        assert headers["Content-Type"] == "application/json"
        (request,) = server.requests
        assert (request.method, request.path, dict(request.query)) == \
            ("POST", "/v1/events", {"strict": "1"})
        assert request.headers["authorization"] == "Bearer k"  # case-insensitive
        assert request.json == {"n": 1} and orjson.loads(request.body) == {"n": 1}
        assert request.status == 200 and abs(request.time - time.time()) < 5


async def test_fake_server_answers_a_status_sequence_then_the_default():
    async with FakeDestinationServer() as server:
        server.script([500, 503, Answer(400, body={"error": "bad"})])
        answers = [await post(server.url, {"n": n}) for n in range(5)]
    assert [status for status, _, _ in answers] == [500, 503, 400, 200, 200]
    assert orjson.loads(answers[2][2]) == {"error": "bad"}
    assert [r.status for r in server.requests] == [500, 503, 400, 200, 200]


async def test_fake_server_scripts_per_path_before_the_global_script():
    async with FakeDestinationServer(default=204) as server:
        server.script([429], path="/import")
        server.script([500])
        assert (await post(server.url + "/engage"))[0] == 500  # global script
        assert (await post(server.url + "/import"))[0] == 429  # its path's script
        assert (await post(server.url + "/import"))[0] == 204  # both used up: the default
        assert [r.path for r in server.requests_to("/import")] == ["/import", "/import"]


async def test_fake_server_sends_retry_after():
    async with FakeDestinationServer() as server:
        server.script([Answer(429, headers={"Retry-After": "7"}, body=b"slow down")])
        status, headers, body = await post(server.url)
    assert (status, headers["Retry-After"], body) == (429, "7", b"slow down")
    assert headers["Content-Type"].startswith("text/plain")


async def test_fake_server_delays_an_answer_past_the_client_timeout():
    async with FakeDestinationServer() as server:
        server.script([Answer(200, delay=2), Answer(201, delay=0.2)])
        with pytest.raises(asyncio.TimeoutError):
            await post(server.url, timeout=0.3)
        started = time.monotonic()
        assert (await post(server.url))[0] == 201
        assert time.monotonic() - started >= 0.2
        assert [r.status for r in server.requests] == [None, 201]  # the first was never sent


async def test_fake_server_resets_the_connection():
    async with FakeDestinationServer() as server:
        server.script([Answer(200, reset=True)])
        with pytest.raises(aiohttp.ClientError):
            await post(server.url, {"n": 1})
        assert (await post(server.url, {"n": 2}))[0] == 200
    assert [r.status for r in server.requests] == [None, 200]
    assert server.requests[0].answer == Answer(200, reset=True)


async def test_fake_server_handler_gives_per_message_answer_sequences():
    sequences = {"m-1": [500, 200], "m-2": [429, 429, 200]}

    def handler(request):
        if request.path == "/fallback":
            return None  # the script, then the default, answer instead
        return Answer(sequences[request.json["messageId"]].pop(0))

    async with FakeDestinationServer(handler=handler) as server:
        server.script([418])
        statuses = [(await post(server.url, {"messageId": m}))[0]
                    for m in ["m-1", "m-2", "m-2", "m-1", "m-2"]]
        assert statuses == [500, 429, 429, 200, 200]
        assert (await post(server.url + "/fallback"))[0] == 418


async def test_fake_server_accepts_an_async_handler():
    async def handler(request):
        await asyncio.sleep(0)
        return 202

    async with FakeDestinationServer(handler=handler) as server:
        assert (await post(server.url))[0] == 202


async def test_wait_for_waits_for_requests_in_flight_and_says_when_they_do_not_come():
    async with FakeDestinationServer() as server:
        senders = [asyncio.create_task(post(server.url, {"n": n})) for n in range(3)]
        arrived = await server.wait_for(3, timeout=5)
        assert sorted(r.json["n"] for r in arrived) == [0, 1, 2]
        await asyncio.gather(*senders)
        with pytest.raises(TimeoutError, match="expected 4 requests .* got 3"):
            await server.wait_for(4, timeout=0.1)


async def test_fake_server_stops_promptly_with_answers_held_back_and_frees_its_port():
    server = FakeDestinationServer(default=Answer(200, delay=60))
    await server.start()
    pending = asyncio.create_task(post(server.url, timeout=30))
    await server.wait_for(1)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 3
    with pytest.raises(aiohttp.ClientError):
        await pending  # the held answer is dropped, not sent
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(server.url)  # nothing listens there any more


# -- the harness, on the webhook destination ------------------------------------------------

def test_harness_validates_settings_with_the_plugins_model():
    with pytest.raises(ValidationError, match="url"):
        DestinationHarness(Webhook, {"url": "ftp://nope"})


def test_harness_payloads_are_the_normalized_event():
    harness = DestinationHarness(Webhook, HOOK_SETTINGS)
    order = next(e for e in sample_events() if e.get("event") == "Order Completed")
    (payload,) = harness.payloads(order)
    assert payload.body["properties"]["revenue"] == 25.0  # was "25.00"
    assert payload.body["properties"]["currency"] == "EUR"  # was "eur"
    assert payload.body["messageId"] == "msg-order-50314b8e9bcf"
    assert payload.body["receivedAt"] == "2026-11-20T14:03:12.000Z"  # the kit's fixed clock


def test_harness_rejects_amounts_that_are_no_numbers_as_the_router_does():
    """A destination that reads amounts is never handed "$25.00"; one that passes events on
    as they came (the webhook without a template) gets it as sent."""
    odd = make_event("track", event="Order Completed", properties={"revenue": "$25.00"})
    (payload,) = DestinationHarness(Webhook, HOOK_SETTINGS).payloads(odd)
    assert payload.body["properties"] == {"revenue": "$25.00"}
    templated = DestinationHarness(Webhook, {**HOOK_SETTINGS, "body": "{{ event.event }}"})
    with pytest.raises(EventRejected, match="properties.revenue: expected a number"):
        templated.payloads(odd)


def test_harness_requests_show_the_exact_request():
    harness = DestinationHarness(Webhook, HOOK_SETTINGS)
    event = make_event("track", event="Signed Up", properties={"plan": "pro"})
    (request,) = harness.requests(event)
    assert (request.method, request.url) == ("POST", "https://hooks.example/in")
    assert request.headers == {"Content-Type": "application/json", "Authorization": HOOK_SECRET}
    body = harness.request_json(request)
    assert (body["event"], body["properties"], body["userId"]) == \
        ("Signed Up", {"plan": "pro"}, "user-1042")


def test_harness_hands_the_integrations_options_to_the_destination():
    harness = DestinationHarness(Webhook, {**HOOK_SETTINGS, "method": "PUT",
                                           "body": '{"channel": "{{ options.channel }}"}'})
    event = make_event("track", integrations={"WEBHOOK": {"channel": "#sales"}})
    (request,) = harness.requests(event)
    assert request.method == "PUT"
    assert harness.request_json(request) == {"channel": "#sales"}
    (request,) = harness.requests(event, options={"channel": "#ops"})  # explicit options win
    assert harness.request_json(request) == {"channel": "#ops"}


def test_harness_judges_answers_like_the_router():
    harness = DestinationHarness(Webhook, HOOK_SETTINGS)
    payloads = harness.payloads(make_event("identify"))
    assert harness.outcomes(payloads, 204) == [None]
    (retry,) = harness.outcomes(payloads, 503, headers={"Retry-After": "7"})
    assert isinstance(retry, RetryableError) and retry.retry_after == 7
    (permanent,) = harness.outcomes(payloads, 404, body={"error": "no such hook"})
    assert isinstance(permanent, PermanentError) and "404" in permanent.reason
    operator_retries_404 = DestinationHarness(Webhook, HOOK_SETTINGS, delivery={"retry_on": [404]})
    assert isinstance(operator_retries_404.outcomes(payloads, 404)[0], RetryableError)


def test_classify_status_is_the_core_default():
    assert classify_status(200) is None and classify_status(299) is None
    assert isinstance(classify_status(429), RetryableError)
    assert isinstance(classify_status(500), RetryableError)
    assert isinstance(classify_status(520), RetryableError)  # Cloudflare: the origin is down
    assert isinstance(classify_status(400), PermanentError)
    assert isinstance(classify_status(404, retry_on={404}), RetryableError)
    assert classify_status(429, headers={"Retry-After": "3"}).retry_after == 3



def test_harness_finds_secrets_at_any_depth():
    class Region(BaseModel):
        key: SecretStr = Field(description="regional key")

    class DeepSettings(BaseModel):
        token: SecretStr = Field(description="token")
        regions: list[Region] = Field(description="regions")
        extra: dict[str, SecretStr] = Field(description="extra keys")
        optional: SecretStr | None = Field(None, description="unset")

    class Deep(Recorder):
        Settings = DeepSettings

    harness = DestinationHarness(Deep, {"token": "token-0001", "regions": [{"key": "eu-key-0001"}],
                                        "extra": {"x": "extra-0001"}})
    assert sorted(harness.secrets()) == ["eu-key-0001", "extra-0001", "token-0001"]
    # a "Bearer <token>" header is a secret, and so is its token alone
    assert sorted(DestinationHarness(Webhook, HOOK_SETTINGS).secrets()) == sorted(
        [HOOK_SECRET, HOOK_SECRET.split()[-1]])


# -- destinations for the harness and the conformance suite ---------------------------------

class RecorderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(description="API key, sent as a bearer token.")
    base_url: str = Field("https://api.recorder.example", description="API host.")


class Recorder(Destination[RecorderSettings]):
    """A sound batching destination: track and identify to /events, delete to /delete,
    ``id`` from messageId for the vendor's dedup."""

    plugin_name = "recorder"
    Settings = RecorderSettings
    delivery = DeliveryDefaults(batch_size=3, batch_bytes=64 * 1024)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if event.type == "track" and event.event in ("Delete Person", "User Deleted"):
            return [Payload({"id": event.messageId, "user": event.user_key}, "delete")]
        if event.type not in ("track", "identify"):
            raise SkipEvent(f"Recorder has no {event.type} calls")
        return [Payload({"id": event.messageId, "user": event.user_key,
                         "name": event.event or "$identify",
                         "at": event.timestamp, "props": event.properties or event.traits,
                         "tags": ("a", "b")})]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        token = self.settings.api_key.get_secret_value()
        path = "/delete" if payloads[0].group == "delete" else "/events"
        return HttpRequest.json("POST", self.settings.base_url + path,
                                {"batch": [payload.body for payload in payloads]},
                                {"Authorization": f"Bearer {token}"})


RECORDER_SETTINGS = {"api_key": "recorder-key-0001"}


class ReadsItsHeadersInLowerCase(Recorder):
    """Reads the vendor's own wait header, and the answer's content type, as their names
    come in lower case (HTTP/2 sends them so, and aiohttp finds them in any case)."""

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        if not response.headers["content-type"].startswith("application/json"):
            return None
        wait = response.headers.get("x-recorder-retry-in")
        if response.status == 200 and wait is not None:
            return [RetryableError("busy", retry_after=float(wait))] * len(payloads)
        return None


def test_read_response_gets_headers_in_any_case_from_the_kit_as_from_the_router():
    # The router hands read_response aiohttp's case-insensitive headers; the harness and the
    # conformance suite handed it a plain dict, so a plugin that reads a header in another
    # case than its test wrote it failed tests that production passes (plugin author audit).
    harness = DestinationHarness(ReadsItsHeadersInLowerCase, RECORDER_SETTINGS)
    payloads = harness.payloads(make_event("track"))
    (outcome,) = harness.outcomes(payloads, 200, headers={"Content-Type": "application/json",
                                                          "X-Recorder-Retry-In": "5"})
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 5
    check_destination(ReadsItsHeadersInLowerCase, RECORDER_SETTINGS, rules=["read_response"])


def test_harness_batches_payloads_by_group_up_to_the_batch_size():
    harness = DestinationHarness(Recorder, RECORDER_SETTINGS)
    raws = [make_event("track", messageId=f"m-{n}") for n in range(4)] + \
           [make_event("track", event="Delete Person", messageId="m-del")]
    requests = harness.requests_for_events(raws)
    assert [(r.url.rsplit("/", 1)[1], len(harness.request_json(r)["batch"])) for r in requests] \
        == [("events", 3), ("events", 1), ("delete", 1)]
    assert requests[0].headers["Authorization"] == "Bearer recorder-key-0001"


def test_harness_passes_bodies_through_the_spool_like_the_core():
    harness = DestinationHarness(Recorder, RECORDER_SETTINGS)
    (request,) = harness.requests(make_event("track"))
    (item,) = harness.request_json(request)["batch"]
    assert item["tags"] == ["a", "b"]  # a tuple in the payload, a list after the spool
    # a datetime, now its JSON text; clock skew corrected from sentAt (80 ms behind receipt)
    assert item["at"] == "2026-11-20T14:03:12.080000+00:00"


def test_request_json_undoes_gzip():
    request = HttpRequest("POST", "https://x.example", {"Content-Encoding": "gzip"},
                          gzip.compress(b'{"ok": true}'))
    assert DestinationHarness.request_json(request) == {"ok": True}


# -- the conformance suite ------------------------------------------------------------------

def test_webhook_conforms():
    check_destination(Webhook, HOOK_SETTINGS, examples=100)


def test_a_sound_batching_destination_conforms_with_its_dedup_id():
    check_destination(Recorder, RECORDER_SETTINGS, examples=100, dedup_id=lambda body: body["id"])


test_webhook_conformance_in_one_line = conformance_test(Webhook, settings=HOOK_SETTINGS,
                                                        examples=50)


class TrustsItsOptions(Recorder):
    """Assumes per-event options always carry a ``region``; no sample names this destination
    in its integrations map, but clients can send any object there."""

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        region = options["region"] if options else "us"
        return [Payload({**payload.body, "region": region}, payload.group)
                for payload in super().translate(event, options)]


class CrashesOnOrders(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if event.event == "Order Completed":
            return [Payload({"coupon": event.properties["discount_code"]})]
        return super().translate(event, options)


class ParsesAPropertyAsJson(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if event.event == "Order Completed":
            return [Payload({"order": json.loads("not json")})]
        return super().translate(event, options)


class RandomInsertId(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return [Payload({**payload.body, "insert_id": str(uuid.uuid4())}, payload.group)
                for payload in super().translate(event, options)]


class SaltedPerInstance(Recorder):
    def __init__(self, settings: RecorderSettings) -> None:
        super().__init__(settings)
        self.salt = uuid.uuid4().hex

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return [Payload({**payload.body, "id": f"{self.salt}:{event.messageId}"}, payload.group)
                for payload in super().translate(event, options)]


class LeaksItsKey(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return [Payload({**payload.body, "api_key": self.settings.api_key.get_secret_value()},
                        payload.group) for payload in super().translate(event, options)]


class MutatesTheEvent(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        event.properties.pop("revenue", None)
        return super().translate(event, options)


class UnserializableBody(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return [Payload({"ids": {event.messageId}})]  # a set: orjson refuses it


class ReturnsAGenerator(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return (payload for payload in super().translate(event, options))


class UndocumentedSettings(BaseModel):
    api_key: SecretStr = Field(description="API key.")
    region: str = "US"


class Undocumented(Recorder):
    Settings = UndocumentedSettings


class NestedAuth(BaseModel):
    access_token: str | None = Field(None, description="OAuth token.")


class PlainCredentialSettings(BaseModel):
    api_key: SecretStr = Field(description="API key.")
    signing_secret: str = Field("whsec-0001", description="Signs the requests.")
    auth: NestedAuth = Field(default_factory=NestedAuth, description="OAuth.")
    refreshToken: str = Field("r", description="camelCase, as some APIs name it.")  # noqa: N815
    credentials: dict[str, SecretStr] = Field(default_factory=dict, description="By name.")
    tokens: list[str] = Field(default_factory=list, description="Plain, one by one.")
    group_key: str = Field("company", description="The group's key name: no secret.")
    page_token: str = Field("first", description="Where paging starts.",
                            json_schema_extra={"secret": False})


class PlainCredentials(Recorder):
    Settings = PlainCredentialSettings


class WrapsEachPayload(Recorder):
    delivery = DeliveryDefaults(batch_size=50, batch_bytes=262_144 - len(b'{"records":[]}'))

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        # About 1 KB around each body: a batch the core fills to batch_bytes goes over.
        return HttpRequest.json("POST", "https://api.recorder.example/events",
                                {"records": [{"data": p.body, "meta": "m" * 1000}
                                             for p in payloads]})


class DeclaresWhatItWraps(WrapsEachPayload):
    delivery = WrapsEachPayload.delivery.model_copy(update={"payload_overhead": 1024})


class BatchBytesLessTheEnvelope(Recorder):
    # As plugins.md says: the vendor's 4,000-byte limit less the request's envelope.
    delivery = DeliveryDefaults(batch_size=500, batch_bytes=4000 - len(b'{"records":[]}'))

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        return HttpRequest.json("POST", "https://api.recorder.example/events",
                                {"records": [p.body for p in payloads]})


class FragileResponseReader(Recorder):
    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        return [None if item["ok"] else PermanentError("refused")
                for item in response.json()["items"]]


class SameDedupIdForAll(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return [Payload({**payload.body, "id": event.user_key}, payload.group)
                for payload in super().translate(event, options)]


def failure(destination_cls: type[Destination[Any]], rules: Sequence[str] | None = None,
            **kwargs: Any) -> str:
    """The conformance failure of a broken destination, as text."""
    with pytest.raises(AssertionError) as raised:
        check_destination(destination_cls, RECORDER_SETTINGS, examples=150, rules=rules,
                          **kwargs)
    assert isinstance(raised.value, ConformanceFailure)
    return str(raised.value)


def test_a_destination_raising_keyerror_on_some_events_fails_and_names_the_event():
    message = failure(CrashesOnOrders)
    assert "[sample_events]" in message
    assert "track 'Order Completed'" in message and "msg-order-50314b8e9bcf" in message
    assert "translate raised KeyError" in message
    # where in the plugin: pytest hides the suite's frames, and the plugin's with them
    # (newcomer audit)
    line = CrashesOnOrders.translate.__code__.co_firstlineno + 2
    assert f"(at tests/test_testing_kit.py:{line} in translate)" in message


def test_the_place_named_is_the_plugins_own_not_the_standard_librarys():
    # json.loads raised inside the standard library, and that is where the report pointed
    # (review by experiment)
    message = failure(ParsesAPropertyAsJson)
    line = ParsesAPropertyAsJson.translate.__code__.co_firstlineno + 2
    assert f"(at tests/test_testing_kit.py:{line} in translate)" in message


def test_hypothesis_finds_events_that_break_a_destination_the_samples_do_not():
    check_destination(TrustsItsOptions, RECORDER_SETTINGS, rules=["sample_events"])
    message = failure(TrustsItsOptions, rules=["any_valid_event"])
    assert "[any_valid_event]" in message and "translate raised KeyError: 'region'" in message
    assert "event: {" in message  # the falsifying event, to reproduce it


def test_a_non_deterministic_destination_fails():
    message = failure(RandomInsertId)
    assert "not deterministic: a second call gave other payloads" in message


def test_a_dedup_id_salted_per_instance_fails():
    assert "not deterministic: a new instance gave other payloads" in failure(SaltedPerInstance)


def test_a_destination_leaking_its_api_key_into_the_payload_fails():
    message = failure(LeaksItsKey)
    assert "secret from the settings is in payload 0's body" in message
    assert "recorder-key-0001" not in message  # the report must not leak it either


def test_a_destination_modifying_the_shared_event_fails():
    assert "translate modified the event" in failure(MutatesTheEvent)


class FillsTheEmptyMap(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        (event.traits if event.type == "track" else event.properties)["added"] = 1
        return super().translate(event, options)


def test_a_destination_filling_the_map_its_call_type_lacks_fails():
    # an empty map a call type does not have is not in to_dict: the change went unseen
    assert "translate modified the event" in failure(FillsTheEmptyMap, rules=["sample_events"])


def test_a_generator_from_translate_fails_as_the_router_refuses_it():
    assert "translate returned generator, not a list of Payload" in failure(ReturnsAGenerator)
    harness = DestinationHarness(ReturnsAGenerator, RECORDER_SETTINGS)
    with pytest.raises(TypeError, match="translate returned generator"):
        harness.payloads({"type": "track", "event": "X", "userId": "u1"})


def test_an_unserializable_payload_fails():
    assert "not serializable by orjson" in failure(UnserializableBody)


def test_undocumented_settings_fail():
    message = failure(Undocumented)
    assert "[settings]" in message and "missing on region" in message


class LaxRoute(BaseModel):
    path: str = Field("/events", description="Where the route's events go.")


class LaxNested(RecorderSettings):
    region: str = Field("us", description="Data region: us (the default) or eu.")
    proxy: RecorderSettings | None = Field(None, description="Nested, and strict.")
    routes: list[LaxRoute] = Field(default_factory=list, description="Nested, and lax.")


class IgnoresUnknownKeys(Recorder):
    Settings = LaxNested


class AllowsUnknownKeys(Recorder):
    class Settings(RecorderSettings):
        model_config = ConfigDict(extra="allow")


def test_settings_models_that_drop_unknown_keys_fail():
    # A misspelt `regoin: eu` passed router check and the events went to the default
    # region, with a model that left pydantic's extra unset (plugin author audit).
    message = failure(IgnoresUnknownKeys, rules=["settings"])
    assert "[settings]" in message and "ignore keys they do not have" in message
    assert "(pydantic's default): LaxRoute." in message
    check_destination(AllowsUnknownKeys, RECORDER_SETTINGS, rules=["settings"])


def test_a_credential_typed_str_fails_as_the_router_would_never_mask_it():
    message = failure(PlainCredentials, rules=["settings"])
    assert "[settings]" in message
    assert "typed str: signing_secret, auth.access_token, refreshToken, tokens. Type it " \
           "SecretStr" in message
    assert "group_key" not in message and "page_token" not in message


@pytest.mark.parametrize("rules", [["settings"], ["sample_events"], None])
def test_short_secrets_are_refused_as_test_input(rules):
    with pytest.raises(AssertionError, match="distinctive secret values"):
        check_destination(Recorder, {"api_key": "abc"}, rules=rules)


def test_bytes_added_to_each_payload_fail_the_batching_rule():
    message = failure(WrapsEachPayload, rules=["batching"])
    assert "[batching]" in message and "adds about 1019 bytes per payload" in message
    assert "over the 0 declared in delivery.payload_overhead" in message


def test_declared_payload_overhead_passes_and_the_core_counts_it():
    check_destination(DeclaresWhatItWraps, RECORDER_SETTINGS, rules=["batching"])
    harness = DestinationHarness(DeclaresWhatItWraps, RECORDER_SETTINGS)
    events = [{"type": "track", "event": "X", "userId": f"u{n}",
               "properties": {"text": "t" * 5000}} for n in range(50)]
    # Each request stays under the vendor's 262,144 bytes, the core having counted the
    # kilobyte each payload gains in build_request.
    requests = harness.requests_for_events(events)
    assert len(requests) > 1 and max(len(r.body) for r in requests) <= 262_144


def test_batch_bytes_less_the_envelope_passes_the_batching_rule():
    # A batch filled by bytes builds a body over batch_bytes by the envelope alone: right.
    check_destination(BatchBytesLessTheEnvelope, RECORDER_SETTINGS, rules=["batching"])


def test_read_response_that_breaks_on_ordinary_answers_fails():
    assert "read_response raised" in failure(FragileResponseReader, rules=["read_response"])


def test_dedup_ids_that_do_not_follow_messageid_fail():
    message = failure(SameDedupIdForAll, rules=["sample_events"], dedup_id=lambda b: b["id"])
    assert "differing only in messageId share a vendor dedup id" in message


def test_a_conformance_failure_in_pytest_shows_the_reason_not_the_suites_insides(tmp_path):
    (tmp_path / "test_leaks.py").write_text(
        "from test_testing_kit import LeaksItsKey, RECORDER_SETTINGS\n"
        "from router.testing import conformance_test\n"
        "test_conformance = conformance_test(LeaksItsKey, settings=RECORDER_SETTINGS,\n"
        "                                    examples=20, rules=['sample_events'])\n")
    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "test_leaks.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": tests, "PATH": ""})
    assert run.returncode == 1
    assert "[sample_events] LeaksItsKey" in run.stdout
    assert "a secret from the settings is in payload 0's body" in run.stdout
    assert "_check_payloads" not in run.stdout  # no frame from inside the suite


def test_conformance_test_makes_one_test_per_rule():
    test = conformance_test(LeaksItsKey, settings=RECORDER_SETTINGS, examples=20)
    (mark,) = test.pytestmark
    assert mark.args == ("rule", ConformanceSuite.RULES)
    test("settings")  # this rule holds
    with pytest.raises(AssertionError, match="secret"):
        test("sample_events")


# -- the pytest plugin's fixtures -----------------------------------------------------------

async def test_fake_destination_fixture_is_a_started_server(fake_destination):
    assert (await post(fake_destination.url + "/x"))[0] == 200
    assert [r.path for r in fake_destination.requests] == ["/x"]


async def test_destination_harness_fixture_sends_to_the_fake_server(fake_destination,
                                                                    destination_harness):
    """The whole path by hand: requests built by the harness, sent over HTTP, judged."""
    fake_destination.script([Answer(503, headers={"Retry-After": "2"})])
    harness = destination_harness(Recorder, {**RECORDER_SETTINGS,
                                             "base_url": fake_destination.url})
    payloads = harness.payloads(make_event("identify"))
    (request,) = harness.build_requests(payloads)
    status, headers, body = await post(request.url, headers=request.headers, body=request.body)
    (outcome,) = harness.outcomes(payloads, status, body, headers)
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 2
    (received,) = fake_destination.requests
    assert received.path == "/events" and received.json["batch"][0]["user"] == "user-1042"
    assert received.headers["Authorization"] == "Bearer recorder-key-0001"


# -- sample events and strategies -----------------------------------------------------------

def test_sample_events_cover_what_every_destination_must_handle():
    raws = sample_events()
    parsed = [parse_event(raw) for raw in raws]
    assert {event.type for event in parsed} == set(CALL_TYPES)
    names = {event.event for event in parsed}
    assert {"Order Completed", "Delete Person", "User Deleted", "Suppress Person"} <= names
    order = next(raw for raw in raws if raw.get("event") == "Order Completed")
    assert order["properties"]["revenue"] == "25.00" and order["properties"]["currency"] == "eur"
    assert len(order["properties"]["products"]) == 2
    assert any(e.anonymousId and not e.userId for e in parsed)
    assert any(e.type == "identify" and e.userId and e.anonymousId for e in parsed)
    assert len({event.messageId for event in parsed}) == len(parsed)
    raws[0]["event"] = "changed"
    assert sample_events()[0]["event"] != "changed"  # fresh copies every call


def test_edge_events_are_valid_and_unusual():
    parsed = [parse_event(raw) for raw in edge_events()]
    assert any(not event.context and not event.properties for event in parsed)
    assert any("revenue" in e.properties and e.properties["revenue"] is None
               and "currency" not in e.properties for e in parsed)
    assert any(e.userId == "1042" for e in parsed)  # sent as a number


def test_the_suite_catches_a_null_revenue_without_luck():
    class TrustsRevenue(Recorder):
        def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
            payloads = super().translate(event, options)
            if "revenue" in event.properties:  # present, but may be null: no currency then
                return [Payload({**p.body, "amount": [event.properties["revenue"],
                                                      event.properties["currency"]]}, p.group)
                        for p in payloads]
            return payloads

    message = failure(TrustsRevenue, rules=["sample_events"])
    assert "track 'Cart Viewed'" in message and "KeyError: 'currency'" in message


def test_make_event_builds_each_call_type_with_overrides():
    for call_type in CALL_TYPES:
        assert parse_event(make_event(call_type)).type == call_type
    anonymous = parse_event(make_event("track", userId=None, event="Viewed"))
    assert anonymous.userId is None and anonymous.anonymousId and anonymous.event == "Viewed"
    with pytest.raises(ValueError, match="unknown call type"):
        make_event("purchase")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_events())
def test_raw_events_are_valid_events(raw):
    assert parse_event(raw).type == raw["type"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(types=["group", "alias"]))
def test_events_are_parsed_and_limited_to_the_call_types_asked_for(event):
    assert isinstance(event, Event) and event.type in ("group", "alias")


class ReadsOpaqueBodies(Recorder):
    """Declares opaque bodies, then reads one: production hands it an orjson.Fragment."""

    opaque_bodies = True

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        refused = set((response.json() or {}).get("refused", []))
        return [PermanentError("refused") if p.body["id"] in refused else None
                for p in payloads]


def test_opaque_bodies_reach_read_response_as_in_production():
    # The router fell back to the status (delivered) when such a read_response raised;
    # the kit used to hand it parsed bodies, so its tests passed.
    harness = DestinationHarness(ReadsOpaqueBodies, RECORDER_SETTINGS)
    with pytest.raises(TypeError, match="Fragment"):
        harness.outcomes(harness.payloads(make_event("track")), 200, {"refused": ["x"]})
    assert "read_response raised TypeError" in failure(ReadsOpaqueBodies,
                                                       rules=["read_response"])


class SendsNothing(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        return []

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        raise RuntimeError("never checked")


def test_a_destination_that_sends_nothing_cannot_pass_by_checking_nothing():
    assert "no sample event gave a payload" in failure(SendsNothing, rules=["sample_events"])


class ReadsRetryAfterAsSeconds(Recorder):
    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        if "Retry-After" in response.headers:
            wait = float(response.headers["Retry-After"])
            return [RetryableError("later", retry_after=wait)] * len(payloads)
        return None


def test_a_retry_after_given_as_an_http_date_is_among_the_answers():
    message = failure(ReadsRetryAfterAsSeconds, rules=["read_response"])
    assert "ValueError" in message and "Retry-After" in message


class LeaksItsKeyEncoded(Recorder):
    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        auth = basic_auth("acct-7", self.settings.api_key.get_secret_value())
        return [Payload({**payload.body, "auth": auth}, payload.group)
                for payload in super().translate(event, options)]


def test_a_key_leaked_as_basic_auth_in_the_payload_fails():
    # base64 of "acct-7:recorder-key-0001": not the key's own text, just as exposed
    message = failure(LeaksItsKeyEncoded, rules=["sample_events"])
    assert "secret from the settings is in payload 0's body" in message


class TrueMeansDelivered(Recorder):
    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        return [True for _ in payloads]  # the router ignores such outcomes


def test_harness_outcomes_refuse_what_the_router_would_ignore():
    harness = DestinationHarness(TrueMeansDelivered, RECORDER_SETTINGS)
    payloads = harness.payloads({"type": "track", "event": "X", "userId": "u1"})
    with pytest.raises(AssertionError, match="read_response returned True; expected None"):
        harness.outcomes(payloads, 200)


class SendsTheFirstOnly(Recorder):
    delivery = DeliveryDefaults(batch_size=10)

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        return super().build_request(payloads[:1])


def test_a_request_that_leaves_payloads_out_fails():
    message = failure(SendsTheFirstOnly, rules=["batching"], dedup_id=lambda body: body["id"])
    assert "build_request left payload 1 of a batch of 10" in message
    check_destination(Recorder, RECORDER_SETTINGS, rules=["batching"],
                      dedup_id=lambda body: body["id"])


class SendsAForm(Recorder):
    """Mixpanel's classic shape: ``data=<base64 of the JSON batch>``, form-encoded."""
    delivery = DeliveryDefaults(batch_size=10, payload_overhead=100)  # base64 adds a third

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        batch = base64.b64encode(orjson.dumps([payload.body for payload in payloads]))
        return HttpRequest("POST", "https://api.recorder.example/track",
                           {"Content-Type": "application/x-www-form-urlencoded"},
                           b"data=" + urllib.parse.quote_plus(batch).encode())


def test_payloads_sent_inside_a_base64_form_body_are_found():
    check_destination(SendsAForm, RECORDER_SETTINGS, rules=["batching"],
                      dedup_id=lambda body: body["id"])


class DeliveryAsADict(Recorder):
    delivery = {"batch_size": 10}  # type: ignore[assignment]


def test_a_broken_declaration_is_a_settings_failure_whatever_the_rules():
    # The check of the secrets builds a harness, which needs the declarations: it raised
    # an AttributeError from inside the kit instead.
    for rules in (None, ["sample_events"]):
        assert "[settings]" in failure(DeliveryAsADict, rules=rules)
        assert "delivery must be a DeliveryDefaults" in failure(DeliveryAsADict, rules=rules)


class GzipsAWrapper(WrapsEachPayload):
    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        request = super().build_request(payloads)
        return HttpRequest("POST", request.url, {**request.headers, "Content-Encoding": "gzip"},
                           gzip.compress(request.body or b""))


def test_bytes_added_to_each_payload_are_seen_through_gzip():
    assert "adds about 1019 bytes per payload" in failure(GzipsAWrapper, rules=["batching"])


def test_a_dedup_id_made_of_several_values_is_found_in_the_request():
    check_destination(Recorder, RECORDER_SETTINGS, rules=["batching"],
                      dedup_id=lambda body: (body["user"], body["id"]))


# -- what a router dead-lettered ------------------------------------------------------------

async def test_dead_letters_say_which_event_a_destination_refused_and_why(tmp_path,
                                                                           fake_destination):
    # drain() is True whether an event was delivered or dead-lettered: a plugin's test
    # could tell them apart only through the storage's internals (plugin author audit).
    from router import Router, parse_config
    from router.redaction import REDACTED
    from router.testing import dead_letters

    fake_destination.script([Answer(400, body={"error": "unknown event name"})], path="/bad")
    fake_destination.script([503, 503], path="/busy")
    hooks = [{"name": name, "plugin": "webhook",
              "settings": {"url": f"{fake_destination.url}/{name.lower()}",
                           "headers": {"Authorization": HOOK_SECRET}},
              "delivery": {"max_attempts": 2, "backoff_initial": "20ms"}}
             for name in ("Good", "Bad", "Busy")]
    config = json.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                         "egress": {"allow_private_addresses": True}, "destinations": hooks})
    async with Router(parse_config(config)) as router:
        await router.route(make_event("track", messageId="m-1",
                                      properties={"note": HOOK_SECRET}))
        assert await router.drain(timeout=20)
        refused, busy = sorted(await dead_letters(router), key=lambda letter: letter.destination)
        assert await dead_letters(router, "good") == []
        assert await dead_letters(router, "BAD") == [refused]  # names match without case
    assert (refused.destination, refused.message_id, refused.status, refused.attempts) == \
        ("Bad", "m-1", 400, 1)
    assert refused.reason == "HTTP 400: unknown event name"
    assert refused.response == '{"error":"unknown event name"}'
    assert refused.request is not None
    assert (refused.request["method"], refused.request["url"]) == \
        ("POST", f"{fake_destination.url}/bad")
    assert refused.request["headers"]["Authorization"] == REDACTED
    assert refused.payload["messageId"] == "m-1"
    assert refused.payload["properties"]["note"] == REDACTED  # as `router dlq list` shows it
    assert (busy.destination, busy.status, busy.attempts) == ("Busy", 503, 2)
    assert busy.reason == "gave up after 2 attempts; last: HTTP 503"
