"""A third-party destination plugin with bugs costs only its own events: intake goes on, the
other destinations deliver, the broken one's events are recorded with a reason (invalid,
or dead-lettered), and no secret reaches a log."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, SecretStr, field_validator

from router import cli, runtime
from router import (DeliveryDefaults, Destination, HttpRequest, HttpResponse, Payload,
                    RetryableError, hookimpl)
from router.config import parse_config
from router.errors import ConfigError, EventRejected
from router.registry import create_registry
from router.routing import RouteResult, Router, Status
from router.storage.base import DeadLetter, DeadLetterFilter
from router.testing import FakeDestinationServer
from tests.delivery_helpers import FAST_RETRIES, track

TOKEN = "buggy-token-0001"


class BuggySettings(BaseModel):
    url: str
    bug: str
    token: SecretStr = SecretStr(TOKEN)

    @field_validator("bug")
    @classmethod
    def _no_crash(cls, bug: str) -> str:
        if bug == "settings":
            raise RuntimeError("a validator that raises what pydantic does not wrap")
        return bug


class Buggy(Destination[BuggySettings]):
    """Sends like a webhook (a JSON list of bodies), with the bug its settings name."""

    plugin_name = "buggy"
    Settings = BuggySettings
    delivery = DeliveryDefaults(batch_size=10)

    def __init__(self, settings: BuggySettings) -> None:
        if settings.bug == "init":
            raise RuntimeError(f"cannot start with {settings.token.get_secret_value()}")
        if settings.bug == "refuses":  # a plugin refusing its settings, as docs/plugins.md says
            raise ValueError("this url and this bug do not go together")
        super().__init__(settings)

    def endpoints(self) -> Sequence[str]:
        if self.settings.bug == "endpoints":
            raise KeyError("url")
        return [self.settings.url]

    def translate(self, event, options: Mapping[str, Any]) -> Sequence[Payload]:
        n = event.properties.get("n")
        if self.settings.bug == "group" and n == 2:
            return [Payload({"n": n}, group={"not": "a str"})]  # type: ignore[arg-type]
        if self.settings.bug == "exit" and n == 2:
            raise SystemExit(3)
        if self.settings.bug == "sleep" and n == 2:
            time.sleep(1.0)  # blocks the event loop, as a plugin's slow regex or loop would
        return [Payload({"n": n})]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        numbers = [payload.body["n"] for payload in payloads]
        if self.settings.bug == "none":
            return None  # type: ignore[return-value]
        if self.settings.bug == "one event" and 2 in numbers:
            raise ValueError(f"cannot send event 2 with {self.settings.token.get_secret_value()}")
        if self.settings.bug == "build blames others":  # no request, so no event at fault
            raise RetryableError("refused for the others", caused_by_others=True)
        if self.settings.bug == "untyped text body":  # no Content-Type: aiohttp's for a str
            return HttpRequest("POST", self.settings.url, {}, orjson.dumps(numbers).decode())
        if self.settings.bug == "text body":  # no bug: a str body is allowed, sent as UTF-8
            return HttpRequest("POST", self.settings.url, {"Content-Type": "application/json"},
                               orjson.dumps(numbers).decode() + " ")
        return HttpRequest.json("POST", self.settings.url, numbers)

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse) -> Any:
        if self.settings.bug == "outcomes":
            return ["fine"] * len(payloads)
        if self.settings.bug == "rejected outcomes":  # an Outcome is any DestinationError
            return [EventRejected("the vendor refused it")] * len(payloads)
        if self.settings.bug == "blames others":  # and names no event at fault
            return [RetryableError("refused for the others", caused_by_others=True)
                    for _ in payloads]
        return None


class BuggyPlugin:
    @hookimpl
    def router_register_destinations(self, register):
        register(Buggy)


def router_with(tmp_path, server_url: str, bug: str) -> Router:
    config = {"storage": f"sqlite:///{tmp_path / 'router.db'}",
              "egress": {"allow_private_addresses": True},
              "destinations": [
                  {"name": "good", "plugin": "webhook", "settings": {"url": f"{server_url}/good"},
                   "delivery": FAST_RETRIES},
                  {"name": "buggy", "plugin": "buggy",
                   "settings": {"url": f"{server_url}/buggy", "bug": bug},
                   "delivery": {**FAST_RETRIES, "batch_size": 10, "batch_wait": "200ms",
                                "max_attempts": 2}}]}
    loaded = parse_config(orjson.dumps(config).decode(), file="test.yaml", env={})
    return Router(loaded, registry=create_registry(extra_plugins=(BuggyPlugin(),)))


@dataclass
class Run:
    results: list[RouteResult]
    server: FakeDestinationServer
    letters: list[DeadLetter]
    delivered: float
    """Jobs of the buggy destination delivered, as the metrics count them."""

    def sent(self, path: str) -> list[int]:
        return sorted(n for request in self.server.requests_to(path) for n in request.json)


async def run(tmp_path, bug: str, count: int) -> Run:
    """``count`` events through a router whose ``buggy`` destination has ``bug``, beside a
    healthy webhook, until nothing is left to deliver."""
    async with FakeDestinationServer() as server:
        router = router_with(tmp_path, server.url, bug)
        async with router:
            results = await router.route_many([track(n) for n in range(count)])
            assert await router.drain(timeout=20)
            letters = await router.storage.dead_letters(DeadLetterFilter())
            delivered = router.delivery_metrics.delivered.get("buggy")
    assert len(server.requests_to("/good")) == count  # the healthy destination: everything
    return Run(results, server, letters, delivered)


@pytest.mark.parametrize("bug", ["group", "exit"])
async def test_a_translation_bug_costs_that_event_for_that_destination(tmp_path, bug, caplog):
    # A group that is not a str once killed the destination's batching for every event
    # after it; a SystemExit from translate ended intake for everyone.
    with caplog.at_level(logging.ERROR, logger="router"):
        done = await run(tmp_path, bug, 5)
    assert done.results[2].status_of("buggy").status is Status.INVALID
    assert "buggy failed" in done.results[2].status_of("buggy").reason
    # the reason names only the exception's type; the operator's log says what it said
    said = {"exit": "SystemExit: 3", "group": "TypeError: translate returned item 0"}[bug]
    logged = [record.getMessage() for record in caplog.records
              if "failed to translate" in record.getMessage()]
    assert len(logged) == 1
    assert logged[0].startswith(f"destination buggy failed to translate event m-2: {said}")
    assert done.sent("/buggy") == [0, 1, 3, 4]


async def test_a_request_that_cannot_be_built_is_dead_lettered_not_left_leased(tmp_path):
    # build_request returned None: the batch once failed deep in the transport, stayed
    # leased with nothing recorded, and drain() never ended.
    done = await run(tmp_path, "none", 3)
    assert len(done.letters) == 3
    assert all("buggy failed to build a request: TypeError" in letter.reason
               for letter in done.letters)


async def test_one_event_a_plugin_cannot_send_costs_only_that_event(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="router.delivery"):
        done = await run(tmp_path, "one event", 6)
    assert done.sent("/buggy") == [0, 1, 3, 4, 5]  # the batch split around it
    assert [letter.message_id for letter in done.letters] == ["m-2"]
    assert "cannot send event 2" in caplog.text and TOKEN not in caplog.text


async def test_outcomes_that_are_not_outcomes_are_judged_by_the_status(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="router.delivery"):
        done = await run(tmp_path, "outcomes", 3)
    assert (done.letters, done.delivered) == ([], 3)
    # The plugin's bug is the operator's to know: said in the log, not only worked around.
    assert "destination buggy: read_response failed; judging HTTP 200 by its status" \
        in caplog.text


async def test_an_outcome_of_any_destination_error_is_permanent(tmp_path):
    done = await run(tmp_path, "rejected outcomes", 2)
    assert [letter.reason for letter in done.letters] == ["the vendor refused it"] * 2


async def test_events_all_refused_for_each_other_count_their_attempts(tmp_path):
    # caused_by_others with no event at fault beside it: sent again at once and never
    # counted, they went round for ever; they are ordinary retries (max_attempts 2 here).
    done = await run(tmp_path, "blames others", 3)
    assert [letter.attempts for letter in done.letters] == [2, 2, 2]
    assert {letter.reason for letter in done.letters} == {
        "gave up after 2 attempts; last: refused for the others"}


async def test_a_request_not_built_for_the_others_counts_its_attempts(tmp_path):
    # build_request raising caused_by_others fails every event alike, none at fault: its
    # retries went again at once, never counted, and drain() never ended.
    done = await run(tmp_path, "build blames others", 3)
    assert [letter.attempts for letter in done.letters] == [2, 2, 2]
    assert {letter.reason for letter in done.letters} == {
        "gave up after 2 attempts; last: refused for the others"}


async def test_a_plugin_blocking_the_event_loop_is_named_in_the_log(tmp_path, caplog,
                                                                    monkeypatch):
    # Nothing can stop such a plugin, and it holds up every destination and /health; the
    # watchdog at least says where the loop is stuck, and when it turns again.
    monkeypatch.setattr(runtime, "STALL_WARNING_SECONDS", 0.2)
    with caplog.at_level(logging.WARNING, logger="router"):
        await run(tmp_path, "sleep", 3)
    stalled, resumed = [record.getMessage() for record in caplog.records
                        if "event loop" in record.getMessage()]
    assert "has not turned for" in stalled
    assert "intake, delivery and /health wait until it does" in stalled  # one process here
    assert "tests/test_misbehaving_plugins.py" in stalled and "in translate" in stalled
    assert "turned again after" in resumed


async def test_a_str_body_is_sent_as_utf8(tmp_path):
    done = await run(tmp_path, "text body", 3)
    assert (done.sent("/buggy"), done.letters) == ([0, 1, 2], [])


async def test_a_str_body_without_a_content_type_is_sent_as_utf8_text(tmp_path):
    # Turned into bytes before aiohttp saw it, it went as application/octet-stream, where
    # aiohttp sends a str as text/plain; charset=utf-8.
    done = await run(tmp_path, "untyped text body", 2)
    assert done.sent("/buggy") == [0, 1]
    assert {request.headers["Content-Type"] for request in done.server.requests_to("/buggy")
            } == {"text/plain; charset=utf-8"}


def test_a_str_body_is_shown_by_the_dry_run(tmp_path):
    # router send --dry-run ended with an AttributeError on a str body.
    router = router_with(tmp_path, "http://127.0.0.1:9", "text body")
    [result] = cli.dry_run(router, [track(7)])
    [request] = router.requests_for(result.status_of("buggy"))
    assert request.body == b"[7] "
    for printer in (cli._print_table, cli._print_json):
        shown = io.StringIO()
        printer(router, 0, cli._shown(result), shown, requests=True)
        assert "[7]" in shown.getvalue()


def test_a_value_error_from_init_refuses_the_settings_rather_than_report_a_bug(tmp_path):
    with pytest.raises(ConfigError) as caught:
        router_with(tmp_path, "http://127.0.0.1:9", "refuses")
    assert caught.value.field == "destinations.1.settings"
    assert caught.value.message == "buggy: this url and this bug do not go together"


@pytest.mark.parametrize("bug, where", [
    ("settings", "failed checking its settings: RuntimeError"),
    ("init", "failed to start: RuntimeError"),
    ("endpoints", "failed to list its endpoints: KeyError"),
])
def test_a_plugin_failing_at_load_is_a_config_error_without_its_secret(tmp_path, bug, where):
    with pytest.raises(ConfigError) as caught:
        router_with(tmp_path, "http://127.0.0.1:9", bug)
    assert caught.value.field == "destinations.1.settings"
    assert where in str(caught.value)
    assert TOKEN not in str(caught.value)
