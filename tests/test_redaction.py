"""What is shown of requests (dry runs, dead letters, logs) never carries a credential."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import orjson
import pytest
from pydantic import BaseModel, SecretStr

from router.delivery.retry import classify_status
from router.redaction import (REDACTED, Masker, cut_at_first_url, redacted_url, secret_values,
                              values_found_in)

ROOT = Path(__file__).resolve().parents[1]


class Nested(BaseModel):
    key: SecretStr


class Settings(BaseModel):
    token: SecretStr
    nested: list[Nested]
    headers: dict[str, SecretStr]
    plain: str = "not-a-secret-value"


def test_every_secret_str_is_found_and_a_bearer_token_counts_alone():
    settings = Settings(token="tok-0001-abcdef", nested=[Nested(key="nested-key-0001")],
                        headers={"Authorization": "Bearer header-token-0001"})
    found = set(secret_values(settings))
    assert {"tok-0001-abcdef", "nested-key-0001", "Bearer header-token-0001",
            "header-token-0001"} <= found
    assert "not-a-secret-value" not in found


def test_a_word_of_a_secret_counts_alone_from_8_characters_on():
    # mutation audit: the bound at 7 or 9 characters went unnoticed
    assert set(secret_values(SecretStr("Bearer abcdefgh"))) == {"Bearer abcdefgh", "abcdefgh"}
    assert set(secret_values(SecretStr("Bearer abcdefg"))) == {"Bearer abcdefg"}


def test_only_values_that_may_be_credentials_are_masked_wherever_found():
    # What the config took from the environment and put in a destination's settings: "POST",
    # "EU", a port or a flag masked everywhere would garble bodies and logs (mutation audit:
    # dropping the length check, or taking exactly 8 characters as too short, went unnoticed)
    settings = {"url": "https://h.example/in/abcdefgh/abcdefg?region=EU&port=12345678",
                "method": "POST", "flags": ["true", "1234567.5", {"deep": ["k-0001-listed"]}]}
    assert values_found_in(settings, ["abcdefgh", "abcdefg", "EU", "POST", "12345678",
                                      "1234567.5", "true", "k-0001-listed"]) == [
        "abcdefgh", "k-0001-listed"]


def test_a_secret_of_4_characters_is_masked_and_one_of_3_is_not():
    # shorter values would mask ordinary text (mutation audit: a bound of 3 went unnoticed)
    assert Masker(["abcd"]).mask("xabcdx abc") == f"x{REDACTED}x abc"
    assert Masker(["abc"]).mask("xabcdx abc") == "xabcdx abc"


def test_a_json_body_shown_has_the_secret_masked_in_every_string_key_and_list():
    # What `router dlq list --json` and a dry run show of a payload (mutation audit: strings
    # inside a list left unmasked, and numbers shown as null, went unnoticed)
    masker = Masker(["sk_live_ABCDEFGH"])
    body = orjson.dumps({"k": "sk_live_ABCDEFGH", "sk_live_ABCDEFGH": {"n": 1.5},
                         "list": ["Bearer sk_live_ABCDEFGH", 2, None, True, ["sk_live_ABCDEFGH"]]})
    assert masker.mask_json(body) == {
        "k": REDACTED, REDACTED: {"n": 1.5},
        "list": [f"Bearer {REDACTED}", 2, None, True, [REDACTED]]}
    assert masker.mask_json(b"not json: sk_live_ABCDEFGH \xff") == \
        f"not json: {REDACTED} \ufffd"


@pytest.mark.parametrize("name", ["Authorization", "proxy-authorization", "X-API-Key", "api-key",
                                  "X-Auth-Token", "Cookie"])
def test_a_credential_header_is_shown_masked_whole(name):
    # mutation audit: x-auth-token and cookie shown as sent went unnoticed
    masker = Masker(["sk_live_ABCDEFGH"])
    assert masker.mask_headers({name: "session=plain-0001", "X-Trace": "t sk_live_ABCDEFGH"}) == \
        {name: REDACTED, "X-Trace": f"t {REDACTED}"}


def test_a_segment_of_a_secret_url_is_a_token_from_16_characters_or_8_with_digits():
    # mutation audit: each bound moved by one went unnoticed
    masker = Masker(["https://hooks.example/qwertyuiopasdfgh/zxcvbnmlkjhgfds/token123/tok1234"])
    assert masker.mask("qwertyuiopasdfgh zxcvbnmlkjhgfds token123 tok1234") == \
        f"{REDACTED} zxcvbnmlkjhgfds {REDACTED} tok1234"


def test_a_password_of_a_secret_url_is_masked_alone_from_8_characters():
    assert Masker(["https://svc:pass1234@hooks.example/in"]).mask("pass1234") == REDACTED
    assert Masker(["https://svc:pass123@hooks.example/in"]).mask("pass123") == "pass123"


def test_a_secret_url_that_urlsplit_refuses_is_still_masked_whole():
    # a bracket that does not close: no parts, and no crash building the masker (mutation
    # audit: the crash went unnoticed)
    masker = Masker(["https://[hooks.example/in/abcdefgh12345678"])
    assert masker.mask("at https://[hooks.example/in/abcdefgh12345678") == f"at {REDACTED}"


def test_a_masker_given_a_request_without_credentials_is_the_same_masker():
    masker = Masker(["sk_live_ABCDEFGH"])
    assert masker.with_credentials_of({"Content-Type": "application/json"}) is masker


def test_urls_lose_credential_query_values_and_passwords():
    masker = Masker(["ga4-secret-0001"])
    assert masker.mask_url("https://x.example/collect?id=G-1&api_secret=ga4-secret-0001") == \
        f"https://x.example/collect?id=G-1&api_secret={REDACTED}"
    assert masker.mask_url("https://hooks.example/in?token=abc&page=2") == \
        f"https://hooks.example/in?token={REDACTED}&page=2"
    assert redacted_url("redis://:pw-0001@cache:6379/0") == f"redis://:{REDACTED}@cache:6379/0"
    # unescaped @ and / in a password cut a parser's netloc short: still hidden whole
    assert redacted_url("redis://user:p@ss/w0rd@127.0.0.1:1/0") == \
        f"redis://user:{REDACTED}@127.0.0.1:1/0"
    assert redacted_url("sqlite:///var/router.db") == "sqlite:///var/router.db"
    assert redacted_url("redis://cache:6379/0") == "redis://cache:6379/0"
    # redis-py takes the password as a query parameter too
    assert redacted_url("redis://cache:6379/0?password=pw-0002&db=1") == \
        f"redis://cache:6379/0?password={REDACTED}&db=1"
    assert redacted_url("redis://u:pw-0003@cache/0?socket_timeout=5") == \
        f"redis://u:{REDACTED}@cache/0?socket_timeout=5"
    for name in ("code", "jwt", "access_jwt"):  # Azure Functions' key, JSON web tokens
        assert masker.mask_url(f"https://f.example/api/x?{name}=k-1&zip_code=10115") == \
            f"https://f.example/api/x?{name}={REDACTED}&zip_code=10115"


def test_credential_headers_a_request_carried_are_masked_in_an_echo_of_it():
    # Basic is base64 of "key:": derived from the secret, so not the secret's own text
    masker = Masker(["seg-key-0001"]).with_credentials_of(
        {"Authorization": "Basic c2VnLWtleS0wMDAxOg==", "Content-Type": "application/json"})
    echoed = '{"error": "bad auth", "headers": {"Authorization": "Basic c2VnLWtleS0wMDAxOg=="}}'
    assert "c2VnLWtleS0wMDAxOg" not in masker.mask(echoed)
    assert "application/json" not in masker.secrets
    # the credential alone, without its scheme, is masked too; the scheme's word is not
    # (mutation audit: either end of the split moved by one went unnoticed)
    assert masker.mask("Basic auth refused: c2VnLWtleS0wMDAxOg==") == \
        f"Basic auth refused: {REDACTED}"


def test_credential_query_values_a_request_carried_are_masked_in_an_echo_of_it():
    # A key written in a webhook URL's query (not a declared secret): the dead letter's URL
    # masked it, and the API's message quoting it back did not (review).
    masker = Masker().with_credentials_of(
        {}, "https://hooks.example/in?api_key=litqueryKEY12345abcdef&plan=pro&sig=a%2Bb0001")
    echoed = "Invalid credentials: api_key=litqueryKEY12345abcdef sig=a+b0001 plan=pro"
    assert masker.mask(echoed) == f"Invalid credentials: api_key={REDACTED} sig={REDACTED} plan=pro"
    # as it was sent, percent-encoded, too, and the parameters' names stay readable
    # (mutation audit: masking "&sig=" itself went unnoticed)
    assert masker.mask("POST /in?api_key=litqueryKEY12345abcdef&sig=a%2Bb0001&plan=pro") == \
        f"POST /in?api_key={REDACTED}&sig={REDACTED}&plan=pro"


def test_a_secret_is_masked_as_json_escapes_it_and_as_a_url_encodes_it():
    # An API that echoes the request answers with the secret escaped in its JSON, or as it
    # was percent-encoded on the wire (security review).
    masker = Masker(['sig"Secret-0001', "pct token+0001"])
    echoed = ('{"X-Signing-Secret": "sig\\"Secret-0001", '
              '"line": "POST /catch/pct%20token+0001/ HTTP/1.1", "q": "t=pct+token%2B0001"}')
    assert masker.mask(echoed) == (f'{{"X-Signing-Secret": "{REDACTED}", '
                                   f'"line": "POST /catch/{REDACTED}/ HTTP/1.1", '
                                   f'"q": "t={REDACTED}"}}')


def test_a_secret_is_masked_as_other_json_writers_escape_it():
    # Python's json writes é as \u00e9, PHP writes / as \/, Go writes & as \u0026 (review)
    masker = Masker(["clé/secret&0001"])
    for echoed in ('"cl\\u00e9/secret&0001"', '"cl\\u00e9\\/secret&0001"',
                   '"clé\\/secret&0001"', '"clé/secret\\u00260001"',
                   '"cl%c3%a9%2fsecret%260001"'):
        assert masker.mask(echoed) == f'"{REDACTED}"', echoed


def test_a_secret_is_masked_whatever_its_case_once_it_is_long_enough():
    # An API that lower-cases what it echoes ("invalid key: sk_live_ab12...") showed the key.
    masker = Masker(["sk_LIVE_Ab12Cd34", "Key1"])
    assert masker.mask("invalid key sk_live_ab12cd34, SK_LIVE_AB12CD34") == \
        f"invalid key {REDACTED}, {REDACTED}"
    # Short secrets stay case-sensitive: "key1" is an ordinary word as often as not.
    assert masker.mask("Key1 key1") == f"{REDACTED} key1"
    # where lower-casing changes the length (İ is two characters lower-cased), still masked,
    # and the text around it kept as it was
    assert masker.mask("İİ SK_live_AB12cd34 İ") == f"İİ {REDACTED} İ"


def test_ordinary_text_beside_a_secret_url_stays_readable():
    # Dates, versions, words and short passwords of a URL are not credentials: masked, every
    # timestamp of a dead letter read "**REDACTED**T12:00:00Z" (review).
    from router.redaction import passwords_of_urls_in
    whole = Masker(["https://api.example/v1/2024-06-01/events?page=10&api-version=2024-06-01"])
    assert whole.mask("2024-06-01T12:00:00Z page 10 v1 events") == \
        "2024-06-01T12:00:00Z page 10 v1 events"
    settings = {"url": "https://admin:admin@hooks.example/hooks/customer-events/page2024",
                "other": "https://HOST-FROM-ENV.example/hooks/orders-2024x/"}
    parts = passwords_of_urls_in(settings)
    assert parts == [base64.b64encode(b"admin:admin").decode()]


def test_a_secret_url_is_masked_by_its_credential_parts_too():
    # A Slack webhook URL is a secret whole; the echo of a request shows its path, not it.
    masker = Masker(["https://svc:pass-0001@hooks.example/services/T0001/B0001/"
                     "XXXXsecrettoken0001?key=query-token-0001&page=2"])
    basic = base64.b64encode(b"svc:pass-0001").decode()
    echoed = (f"POST /services/T0001/B0001/XXXXsecrettoken0001?key=query-token-0001&page=2 "
              f"Authorization: Basic {basic} password pass-0001")
    assert masker.mask(echoed) == (f"POST /services/T0001/B0001/{REDACTED}?key={REDACTED}"
                                   f"&page=2 Authorization: Basic {REDACTED} password "
                                   f"{REDACTED}")
    # words of a path are not credentials: they stay readable wherever else they appear
    assert Masker(["https://hooks.example/services/webhooks/T0-token-0001"]).mask(
        "services and webhooks") == "services and webhooks"


def test_dry_run_masks_a_token_in_a_webhook_url(tmp_path):
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": "memory://", "destinations": [{
        "name": "hook", "plugin": "webhook",
        "settings": {"url": "https://hooks.example/in?token=${HOOK_TOKEN}"}}]}))
    completed = subprocess.run(
        [sys.executable, "-m", "router", "send", "-c", str(config), "--dry-run", "--json",
         str(ROOT / "tests" / "fixtures" / "events" / "identify_merge.json")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOOK_TOKEN": "url-token-0001", "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr
    assert "url-token-0001" not in completed.stdout + completed.stderr
    (line,) = [orjson.loads(text) for text in completed.stdout.splitlines()]
    assert line["requests"][0]["url"] == f"https://hooks.example/in?token={REDACTED}"


async def test_a_dead_letter_keeps_no_basic_credentials_an_api_echoed(tmp_path):
    from router.destination import basic_auth
    from router.storage.base import DeadLetterFilter
    from router.testing import Answer, FakeDestinationServer
    from tests.delivery_helpers import FAST_RETRIES, router_for, track

    header = basic_auth("seg-write-key-0001")
    async with FakeDestinationServer() as server:
        server.script([Answer(400, body={"error": "refused", "echo": {"Authorization": header}})])
        router = router_for(tmp_path, [{
            "name": "seg", "plugin": "segment", "delivery": FAST_RETRIES,
            "settings": {"write_key": "seg-write-key-0001", "base_url": server.url}}])
        async with router:
            await router.route(track(1))
            assert await router.drain(timeout=10)
            (letter,) = await router.storage.dead_letters(DeadLetterFilter())
    assert server.requests[0].headers["Authorization"] == header  # what was echoed
    assert "refused" in letter.response
    assert header.split()[1] not in orjson.dumps([letter.request, letter.response]).decode()


async def test_a_failure_reason_quoting_the_request_credentials_is_masked(tmp_path, caplog):
    # Mixpanel names why each record failed; an API quoting the request's Basic header back
    # put it into the failure log line and the dead letter's reason.
    from router.storage.base import DeadLetterFilter
    from router.testing import Answer, FakeDestinationServer
    from tests.delivery_helpers import FAST_RETRIES, router_for, track

    def echo(request):
        auth = request.headers.get("Authorization", "")
        return Answer(400, body={
            "code": 400, "status": "Bad Request", "num_records_imported": 0,
            "failed_records": [{"index": 0, "insert_id": "m-1", "field": "properties.time",
                                "message": f"bad auth {auth}"}]})

    async with FakeDestinationServer(handler=echo) as server:
        router = router_for(tmp_path, [{
            "name": "mp", "plugin": "mixpanel", "delivery": FAST_RETRIES,
            "settings": {"project_token": "token-0001", "api_secret": "mp-secret-0001",
                         "base_url": server.url}}])
        with caplog.at_level(logging.WARNING, logger="router.delivery"):
            async with router:
                await router.route(track(1))
                assert await router.drain(timeout=10)
                (letter,) = await router.storage.dead_letters(DeadLetterFilter())
    encoded = server.requests[0].headers["Authorization"].split()[1]
    assert "bad auth" in letter.reason and "properties.time" in letter.reason
    assert encoded not in letter.reason
    assert "bad auth" in caplog.text and encoded not in caplog.text


def echo_request(request):
    """An API that answers 400 quoting the request line and headers back."""
    from router.testing import Answer
    headers = {str(name): value for name, value in request.headers.items()}
    return Answer(400, body={"error": "bad request", "line": f"POST {path_and_query(request)}",
                             "headers": headers})


def path_and_query(request) -> str:
    return request.path + (f"?{urlencode(list(request.query.items()))}" if request.query else "")


async def test_dead_letters_and_logs_keep_no_part_of_a_secret_url_an_api_echoed(
        tmp_path, caplog):
    # Slack's whole URL is its secret, and a webhook's may come whole from the environment
    # or hold a password: the echo showed the path's token, the query's key and the Basic
    # header aiohttp built from the password, none of which is the secret's whole text.
    from router.config import parse_config
    from router.routing import Router
    from router.storage.base import DeadLetterFilter
    from router.testing import FakeDestinationServer
    from tests.delivery_helpers import track

    async with FakeDestinationServer(handler=echo_request) as server:
        port = server.url.rsplit(":", 1)[1]
        env = {"SLACK_URL": f"{server.url}/services/T0001/B0001/SLACKSECRET0001",
               "HOOK_URL": f"{server.url}/hooks/PATHTOKEN0001?api_key=QUERYKEY0001",
               "HOOK_PASSWORD": "BASICPASS0001"}
        config = parse_config(
            "storage: memory://\negress: {allow_private_addresses: true}\ndestinations:\n"
            "  - {name: slack, plugin: slack, settings: {url: '${SLACK_URL}'},"
            " delivery: {max_attempts: 1}}\n"
            "  - {name: hook, plugin: webhook, settings: {url: '${HOOK_URL}'},"
            " delivery: {max_attempts: 1}}\n"
            "  - {name: basic, plugin: webhook, settings: {url: 'http://svc:${HOOK_PASSWORD}"
            f"@127.0.0.1:{port}/b'}}, delivery: {{max_attempts: 1}}}}\n", env=env)
        with caplog.at_level(logging.DEBUG):
            async with Router(config) as router:
                await router.route(track(1))
                assert await router.drain(timeout=10)
                letters = await router.storage.dead_letters(DeadLetterFilter())
    assert sorted(letter.destination for letter in letters) == ["basic", "hook", "slack"]
    echoed = [path_and_query(request) for request in server.requests] + [
        request.headers["Authorization"].split()[1] for request in server.requests
        if "Authorization" in request.headers]
    assert len(echoed) == 4  # three paths, and the Basic header built from the password
    shown = caplog.text + orjson.dumps([(letter.reason, letter.request, letter.response)
                                        for letter in letters]).decode()
    assert "bad request" in shown
    for text in ("SLACKSECRET0001", "PATHTOKEN0001", "QUERYKEY0001", "BASICPASS0001",
                 echoed[-1]):
        assert text not in shown, text


@pytest.mark.parametrize("text, cut", [
    ("Can not write request body for http://127.0.0.1:4/hook?token=abc&x=1",
     "Can not write request body for http://127.0.0.1:4/…"),
    ("message='Bad status', url='https://user:pa@ss@h.example:8443/p?t=1'",
     "message='Bad status', url='https://h.example:8443/…"),
    ("https://h.example/a b?key=SECRET", "https://h.example/…"),  # unencoded space
    ("https://h.example/p?key=SEC'RET and more", "https://h.example/…"),
    ("(https://h.example/p?k=SECRET), then", "(https://h.example/…"),
    ("http://[::1]:8080/x?k=SECRET", "http://[::1]:8080/…"),
    # where the host is cannot be told: only the scheme stays
    ("https://user:pa/SECRET@h.example/x", "https://…"),
    ("https://h.example/p?email=SECRET@b.example", "https://…"),
    ("https://h.example\\SECRET?k=1", "https://h.example/…"),
    ("no address here", "no address here"),
])
def test_a_quoted_url_keeps_its_scheme_and_host_and_nothing_after(text, cut):
    assert cut_at_first_url(text) == cut
    assert "SECRET" not in cut_at_first_url(text) and "pa@ss" not in cut_at_first_url(text)


@pytest.mark.parametrize("location, shown", [
    ("https://new.example.com/hooks/T0/B0/secret?token=abc", " (to https://new.example.com/…)"),
    ("//other.example/p?token=abc", " (to //other.example/…)"),
    ("/moved?token=abc", " (to a location on the same host)"),
    (None, ""),
])
def test_a_redirect_reason_names_only_where_it_points(location, shown):
    headers = {"location": location} if location is not None else {}
    outcome = classify_status(301, headers, frozenset(), now=0.0)
    assert outcome is not None
    assert outcome.reason == f"HTTP 301{shown}: redirects are not followed"
