"""The ``router`` command (contract, "Command line"), run as users run it: ``python -m router``
in a subprocess, from a working directory of its own."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from yarl import URL

from tests.plugin_helpers import install_plugin
from tests.signal_helpers import as_from_a_terminal

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "events"
SECRET = "sk_live_CANARY_9d3e55aa"
REDACTED = "**REDACTED**"
LINE_KEYS = {"event_index", "message_id", "destination", "status", "reason"}

CONFIG = """\
storage: sqlite:///state/router.db
destinations:
  - name: webhook
    plugin: webhook
    settings:
      url: https://hooks.example/in
      headers:
        Authorization: "Bearer ${HOOK_SECRET}"
        X-Custom-Token: "${HOOK_SECRET}"
  - name: Orders
    plugin: webhook
    filter: {types: [track], events: ["Order *"]}
    settings:
      url: https://hooks.example/orders
      method: PUT
      body: >-
        {"order": {{ event.properties.order_id | default(none) | tojson }},
        "total": {{ event.properties.revenue | default(0) }}}
  - name: Audit
    plugin: webhook
    default_on: false
    settings: {url: "https://audit.example/in"}
  - name: Paused
    plugin: webhook
    enabled: false
    settings: {url: "https://paused.example/in"}
"""
DESTINATIONS = ["webhook", "Orders", "Audit"]


def run(*args: str, cwd: Path, stdin: bytes | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HOOK_SECRET": SECRET, **(env or {})}
    completed = subprocess.run([sys.executable, "-m", "router", *args], cwd=cwd,
                               input=stdin.decode() if stdin is not None else None,
                               capture_output=True, text=True, env=full_env, timeout=60)
    return completed


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "router.yaml").write_text(CONFIG)
    return tmp_path


def dry_run(workdir: Path, source: str | Path, *extra: str, stdin: bytes | None = None
            ) -> tuple[list[dict], subprocess.CompletedProcess[str]]:
    completed = run("send", "-c", "router.yaml", str(source), "--dry-run", "--json", *extra,
                    cwd=workdir, stdin=stdin)
    assert "Traceback" not in completed.stderr, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    return lines, completed


def assert_no_secret(completed: subprocess.CompletedProcess[str]) -> None:
    assert SECRET not in completed.stdout
    assert SECRET not in completed.stderr


# -- check -----------------------------------------------------------------------------------------

def test_check_lists_the_destinations(workdir):
    completed = run("check", "-c", "router.yaml", cwd=workdir)
    assert completed.returncode == 0, completed.stderr
    assert "OK" in completed.stdout
    for name in DESTINATIONS:
        assert name in completed.stdout
    assert "off by default" in completed.stdout
    assert "Paused" in completed.stdout and "disabled" in completed.stdout
    assert_no_secret(completed)
    assert not (workdir / "state").exists(), "check opens no storage"


def test_check_accepts_the_example_config(tmp_path):
    completed = run("check", "-c", str(ROOT / "config" / "router.yaml"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "webhook" in completed.stdout and "Order alerts" in completed.stdout


@pytest.mark.parametrize("broken, line, field", [
    (CONFIG.replace("url: https://hooks.example/in", "url: ftp://hooks.example/in"), 6,
     "destinations.0.settings.url"),
    (CONFIG.replace("default_on: false", "default_on: sometimes"), 21, "destinations.2.default_on"),
    (CONFIG.replace("plugin: webhook\n    default_on", "plugin: webhoook\n    default_on"), 20,
     "destinations.2.plugin"),
    (CONFIG.replace("| default(0) }}", "| default(0) %}"), 16,
     "destinations.1.settings.body"),
    ("storage: memory://\ndedup:\n  window: 12 parsecs\n", 3, "dedup.window"),
])
def test_check_fails_on_a_broken_config_naming_file_and_line(tmp_path, broken, line, field):
    (tmp_path / "broken.yaml").write_text(broken)
    completed = run("check", "-c", "broken.yaml", cwd=tmp_path)
    assert completed.returncode != 0
    assert f"broken.yaml:{line}:" in completed.stderr
    assert field in completed.stderr
    assert "Traceback" not in completed.stderr
    assert_no_secret(completed)


def test_check_fails_on_a_missing_env_variable(workdir):
    env = {k: v for k, v in os.environ.items() if k != "HOOK_SECRET"}
    completed = subprocess.run([sys.executable, "-m", "router", "check", "-c", "router.yaml"],
                               cwd=workdir, capture_output=True, text=True, env=env, timeout=60)
    assert completed.returncode != 0
    assert "router.yaml:8:" in completed.stderr and "HOOK_SECRET" in completed.stderr


# -- send --dry-run --json ----------------------------------------------------------------------

def test_dry_run_json_on_a_fixture_prints_exact_requests_with_secrets_masked(workdir):
    lines, completed = dry_run(workdir, FIXTURES / "order_completed.json")
    assert completed.returncode == 0, completed.stderr
    assert [line["destination"] for line in lines] == DESTINATIONS
    assert all(LINE_KEYS <= set(line) for line in lines)
    assert {line["event_index"] for line in lines} == {0}
    assert {line["message_id"] for line in lines} == {"msg-order-50314b8e9bcf"}
    by_name = {line["destination"]: line for line in lines}

    hook = by_name["webhook"]
    assert hook["status"] == "send"
    (request,) = hook["requests"]
    assert set(request) == {"method", "url", "headers", "body"}
    assert request["method"] == "POST" and request["url"] == "https://hooks.example/in"
    assert request["headers"]["Authorization"] == REDACTED
    assert request["headers"]["X-Custom-Token"] == REDACTED
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]  # the JSON value, not a string
    assert body["messageId"] == "msg-order-50314b8e9bcf"
    assert body["properties"]["revenue"] == 25.0 and body["properties"]["currency"] == "EUR"

    orders = by_name["Orders"]
    assert orders["status"] == "send"
    assert orders["requests"] == [{"method": "PUT", "url": "https://hooks.example/orders",
                                   "headers": {"Content-Type": "application/json"},
                                   "body": {"order": "50314b8e9bcf000000000000",
                                            "total": 25.0}}]
    assert by_name["Audit"]["status"] == "skipped" and by_name["Audit"]["reason"]
    assert REDACTED in completed.stdout
    assert_no_secret(completed)


def test_a_secret_from_the_environment_in_a_plain_url_is_masked_too(workdir):
    # A webhook URL is not a secret field, but one that carries a token in its path (as
    # Zapier's and Slack's do) takes it from the environment: that is what gets masked.
    (workdir / "router.yaml").write_text(
        "destinations:\n"
        "  - name: zap\n"
        "    plugin: webhook\n"
        "    settings: {url: 'https://hooks.example/catch/${HOOK_SECRET}/'}\n")
    lines, completed = dry_run(workdir, FIXTURES / "order_completed.json")
    assert completed.returncode == 0, completed.stderr
    (request,) = lines[0]["requests"]
    assert request["url"] == f"https://hooks.example/catch/{REDACTED}/"
    assert_no_secret(completed)


def test_dry_run_masks_secrets_not_ordinary_values_from_the_environment(workdir):
    # `true` and `POST` from the environment are not credentials: masked everywhere, they
    # garbled the bodies (a masked `true` is not JSON). A key with a quote in it is masked
    # although the JSON text escapes it.
    quoted_key = 'amp"key\\0001'
    (workdir / "router.yaml").write_text(
        "destinations:\n"
        "  - name: hook\n"
        "    plugin: webhook\n"
        "    settings: {url: 'https://hooks.example/in', method: '${HOOK_METHOD}'}\n"
        "  - name: amp\n"
        "    plugin: amplitude\n"
        "    settings: {api_key: '${AMP_KEY}', use_batch_endpoint: '${AMP_BATCH}'}\n")
    event = {"type": "track", "event": "Parcel Sent", "userId": "user-0001",
             "properties": {"via": "POST office", "flag": True}}
    completed = run("send", "-c", "router.yaml", "-", "--dry-run", "--json", cwd=workdir,
                     stdin=json.dumps(event).encode(),
                     env={"HOOK_METHOD": "POST", "AMP_KEY": quoted_key, "AMP_BATCH": "true"})
    assert completed.returncode == 0, completed.stderr
    lines = {line["destination"]: line for line in map(json.loads, completed.stdout.splitlines())}
    (hook,) = lines["hook"]["requests"]
    assert hook["method"] == "POST"
    assert hook["body"]["properties"] == {"via": "POST office", "flag": True}
    (amp,) = lines["amp"]["requests"]
    assert amp["url"].endswith("/batch")
    assert amp["body"]["api_key"] == REDACTED
    assert quoted_key not in completed.stdout
    assert json.dumps(quoted_key)[1:-1] not in completed.stdout


def test_dry_run_of_every_fixture_masks_secrets(workdir):
    from router.input import read_events
    events = [event for path in sorted(FIXTURES.glob("*.json"))
              for event in read_events(path.read_bytes())]
    data = "\n".join(json.dumps(event) for event in events).encode()
    lines, completed = dry_run(workdir, "-", stdin=data)
    assert sorted({line["event_index"] for line in lines}) == list(range(len(events)))
    assert all(LINE_KEYS <= set(line) for line in lines)
    assert all(line["status"] in ("send", "skipped", "duplicate", "invalid") for line in lines)
    for line in lines:
        if line["status"] == "send":
            assert line["requests"]
            for request in line["requests"]:
                assert {"method", "url", "headers", "body"} <= set(request)
    assert_no_secret(completed)


def test_dry_run_integrations_map_reasons(workdir):
    lines, _ = dry_run(workdir, FIXTURES / "newsletter_signup.json")
    by_name = {line["destination"]: line for line in lines}
    assert by_name["webhook"]["status"] == "send"       # named with true
    assert by_name["Orders"]["status"] == "skipped"     # "All": false
    assert "All" in by_name["Orders"]["reason"]
    assert by_name["Audit"]["status"] == "skipped"


def test_dry_run_of_a_batch_reports_the_invalid_event_alone(workdir):
    lines, completed = dry_run(workdir, FIXTURES / "batch.json")
    assert sorted({line["event_index"] for line in lines}) == [0, 1, 2, 3]
    invalid = [line for line in lines if line["event_index"] == 1]
    assert len(invalid) == 1
    assert invalid[0]["destination"] is None
    assert invalid[0]["status"] == "invalid"
    assert "event" in invalid[0]["reason"]
    for index in (0, 2, 3):
        assert [line["destination"] for line in lines if line["event_index"] == index] == \
            DESTINATIONS
    last = {line["destination"]: line for line in lines if line["event_index"] == 3}
    assert last["Orders"]["status"] == "send"
    # the batch's shared context reaches each event
    first_hook = next(line for line in lines if line["event_index"] == 0
                      and line["destination"] == "webhook")
    assert first_hook["requests"][0]["body"]["context"]["library"]["name"] == "analytics-node"
    assert_no_secret(completed)


def test_a_dry_run_fails_when_one_destination_refuses_an_event_and_says_which(workdir):
    # Valid for the router, "$25.00" is no amount for the Orders template (reads_amounts):
    # the dry run exited 0, and a script then ran the real send (plugin author audit).
    order = {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": "m-1",
             "properties": {"order_id": "o-1", "revenue": "$25.00"}}
    lines, completed = dry_run(workdir, "-", stdin=json.dumps(order).encode())
    assert completed.returncode == 1, completed.stderr
    by_name = {line["destination"]: line for line in lines}
    assert by_name["webhook"]["status"] == "send" and by_name["webhook"]["requests"]
    assert by_name["Orders"]["status"] == "invalid"
    why = "properties.revenue: expected a number or a numeric string"
    assert by_name["Orders"]["reason"] == why
    assert f"event 0 (messageId 'm-1') refused by Orders: {why}" in completed.stderr
    table = run("send", "-c", "router.yaml", "-", "--dry-run", cwd=workdir,
                stdin=json.dumps(order).encode())
    assert table.returncode == 1 and "POST https://hooks.example/in" in table.stdout
    assert f"refused by Orders: {why}" in table.stderr
    assert_no_secret(table)
    # The send itself fails the same way: nothing would ever deliver it to Orders.
    only_orders = {**order, "messageId": "m-2", "integrations": {"All": False, "Orders": True}}
    sent = run("send", "-c", "router.yaml", "-", "--wait", "1s", cwd=workdir,
               stdin=json.dumps(only_orders).encode())
    assert sent.returncode == 1 and f"refused by Orders: {why}" in sent.stderr, sent.stderr


def test_dry_run_reports_a_repeated_message_id_as_duplicate(workdir):
    order = {"type": "track", "event": "Order Completed", "userId": "u", "messageId": "same",
             "properties": {"order_id": "o-1", "revenue": 5}}
    events = [order, {"type": "identify", "userId": "u", "messageId": "other"}, order]
    (workdir / "events.json").write_text(json.dumps(events))
    lines, _ = dry_run(workdir, "events.json")
    first = [line for line in lines if line["event_index"] == 0]
    third = [line for line in lines if line["event_index"] == 2]
    assert [line["status"] for line in first] == ["send", "send", "skipped"]
    assert [line["destination"] for line in third] == DESTINATIONS
    assert {line["status"] for line in third} == {"duplicate"}
    assert all("same" in line["reason"] for line in third)
    assert {line["status"] for line in lines if line["event_index"] == 1} <= {"send", "skipped"}


def test_dry_run_reads_json_lines_from_stdin(workdir):
    data = (b'{"type": "identify", "userId": "u1", "messageId": "l1"}\n'
            b'this is not json\n'
            b'\n'
            b'{"type": "page", "anonymousId": "a1", "messageId": "l3"}\n')
    lines, completed = dry_run(workdir, "-", stdin=data)
    assert [line["message_id"] for line in lines if line["event_index"] == 0] == ["l1"] * 3
    bad = [line for line in lines if line["event_index"] == 1]
    assert len(bad) == 1 and bad[0]["destination"] is None and bad[0]["status"] == "invalid"
    # the file's line, once: orjson's own "line 1 column 1" was about the line alone
    assert bad[0]["reason"].startswith("line 2, column 1: not JSON: ")
    assert "line 1" not in bad[0]["reason"]
    assert {line["message_id"] for line in lines if line["event_index"] == 2} == {"l3"}


def test_a_jsonl_file_whose_first_line_is_bad_is_still_read_line_by_line(workdir):
    # From stdin, a bad first line looks like a document cut short, refused whole; a .jsonl
    # file says what it is.
    (workdir / "events.jsonl").write_bytes(
        b'{"type": "track",\n'
        b'{"type": "page", "anonymousId": "a1", "messageId": "j2"}\n')
    lines, completed = dry_run(workdir, "events.jsonl")
    bad = [line for line in lines if line["event_index"] == 0]
    assert len(bad) == 1 and "line 1" in bad[0]["reason"]
    assert {line["message_id"] for line in lines if line["event_index"] == 1} == {"j2"}


def test_dry_run_refuses_an_event_over_32_kb(workdir):
    event = {"type": "track", "event": "Big", "userId": "u",
             "properties": {"blob": "x" * (33 * 1024)}}
    (workdir / "big.json").write_text(json.dumps(event))
    lines, completed = dry_run(workdir, "big.json")
    (line,) = lines
    assert line["destination"] is None and line["status"] == "invalid"
    assert "32 KB" in line["reason"]
    assert completed.returncode != 0


def test_dry_run_table_output_masks_secrets_too(workdir):
    completed = run("send", "-c", "router.yaml", str(FIXTURES / "order_completed.json"),
                    "--dry-run", cwd=workdir)
    assert completed.returncode == 0, completed.stderr
    assert "https://hooks.example/in" in completed.stdout
    assert REDACTED in completed.stdout
    assert_no_secret(completed)


def test_dry_run_table_shows_a_template_body_exactly_as_it_is_sent(tmp_path):
    # Parsed and written again, a body lost what the receiver gets: the receiver's "1.10"
    # showed as 1.1, a whole number too large for a float as 1e+20 (templates audit).
    (tmp_path / "router.yaml").write_text(
        "storage: memory://\ndestinations:\n  - name: Orders\n    plugin: webhook\n"
        "    settings:\n      url: https://hooks.example/orders\n"
        "      body: '{\"schema\": 1.10, \"big\": 100000000000000000000, "
        "\"order\": {{ event.properties.order_id | tojson }}}'\n"
        "  - name: plain\n    plugin: webhook\n    settings: {url: https://hooks.example/in}\n")
    event = {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": "m-1",
             "properties": {"order_id": "o-1"}}
    completed = run("send", "-c", "router.yaml", "-", "--dry-run", cwd=tmp_path,
                    stdin=json.dumps(event).encode())
    assert completed.returncode == 0, completed.stderr
    assert '{"schema": 1.10, "big": 100000000000000000000, "order": "o-1"}' in completed.stdout
    assert '"type": "track"' in completed.stdout  # the webhook's own JSON, indented as before


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dry_run_does_not_create_the_storage(workdir):
    dry_run(workdir, FIXTURES / "batch.json")
    assert not (workdir / "state").exists()


@pytest.mark.parametrize("router_running", [False, True])
async def test_dry_run_names_a_duplicate_of_what_the_storage_already_took(
        workdir, router_running):
    # It said "send" for an event that the real send then dropped as a duplicate (contract
    # audit). Read beside a router that has the spool open (its WAL), or from a spool at rest,
    # which then stays byte for byte as it was.
    from router.storage.base import Acceptance, NewJob
    from router.storage.sqlite import SqliteStorage

    store = SqliteStorage(workdir / "state" / "router.db")
    await store.open()
    try:
        await store.accept([Acceptance("default", "taken", [NewJob("webhook", "taken", "u", "",
                                                                   b"{}")])],
                           window=3600, now=time.time())
        if not router_running:
            await store.close()
        before = tree_digest(workdir / "state")
        events = b"\n".join(b'{"type": "track", "event": "A", "userId": "u", "messageId": "%s"}'
                            % message_id for message_id in (b"taken", b"fresh"))
        lines, _ = await asyncio.to_thread(dry_run, workdir, "-", stdin=events)
        lines_elsewhere, _ = await asyncio.to_thread(dry_run, workdir, "-", "--source", "ios",
                                                     stdin=events)
    finally:
        await store.close()
    by_id = {(line["message_id"], line["destination"]): line for line in lines}
    assert by_id["taken", "webhook"]["status"] == "duplicate"
    assert "already accepted within the dedup window" in by_id["taken", "webhook"]["reason"]
    assert by_id["taken", "webhook"]["requests"] == []
    assert by_id["fresh", "webhook"]["status"] == "send"
    assert {line["status"] for line in lines_elsewhere} >= {"send"}  # dedup is per source
    assert all(line["status"] != "duplicate" for line in lines_elsewhere)
    if not router_running:
        assert tree_digest(workdir / "state") == before


async def test_dry_run_leaves_an_existing_storage_unchanged(workdir):
    from router.storage.base import Acceptance, NewJob
    from router.storage.sqlite import SqliteStorage

    store = SqliteStorage(workdir / "state" / "router.db")
    await store.open()
    await store.accept([Acceptance("default", "already", [NewJob("webhook", "already", "u", "",
                                                                 b"{}")])],
                       window=3600, now=1.0)
    await store.close()
    before = tree_digest(workdir / "state")
    assert before

    lines, _ = dry_run(workdir, FIXTURES / "batch.json")
    assert any(line["status"] == "send" for line in lines)
    assert tree_digest(workdir / "state") == before


def test_every_json_line_has_the_contract_keys(workdir):
    lines, _ = dry_run(workdir, FIXTURES / "batch.json")
    for line in lines:
        assert set(line) == LINE_KEYS | {"requests"}
        if line["status"] != "send":
            assert line["requests"] == []


def test_check_does_not_print_the_storage_password(tmp_path):
    (tmp_path / "redis.yaml").write_text(
        "storage: redis://:${REDIS_PASSWORD}@localhost:6379/0\n"
        "destinations:\n  - name: hook\n    plugin: webhook\n"
        "    settings: {url: 'https://hooks.example/in'}\n")
    completed = run("check", "-c", "redis.yaml", cwd=tmp_path, env={"REDIS_PASSWORD": SECRET})
    assert completed.returncode == 0, completed.stderr
    assert "hook" in completed.stdout
    assert_no_secret(completed)


def test_check_with_storage_opens_it_and_says_what_is_wrong_at_its_line(tmp_path):
    # Offline by default; with --storage, what `router serve` would meet at start.
    (tmp_path / "router.yaml").write_text("storage: sqlite:////proc/no-such/router.db\n")
    assert run("check", "-c", "router.yaml", cwd=tmp_path).returncode == 0
    completed = run("check", "-c", "router.yaml", "--storage", cwd=tmp_path)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert "router.yaml:1: storage: cannot open the storage" in completed.stderr
    assert "OK" not in completed.stdout  # said once the storage check has passed
    (tmp_path / "router.yaml").write_text("storage: sqlite:///var/router.db\n")
    completed = run("check", "-c", "router.yaml", "--storage", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "storage: opened" in completed.stdout


def test_check_with_storage_fails_when_intake_would_be_refused_for_want_of_room(tmp_path):
    # A spool on a disk smaller than min_free_bytes passed the check, and the router then
    # refused every event from its first.
    (tmp_path / "router.yaml").write_text(
        "storage: sqlite:///var/router.db?min_free_bytes=1000000000000000000\n")
    completed = run("check", "-c", "router.yaml", "--storage", cwd=tmp_path)
    assert completed.returncode == 1, completed.stdout
    assert "OK" not in completed.stdout
    assert completed.stderr.startswith("error: router.yaml:1: storage: the storage "
                                       "cannot be used now: the spool's disk has")
    assert "kept for delivery (?min_free_bytes=)" in completed.stderr


def test_check_with_storage_refuses_a_redis_that_evicts(tmp_path):
    from tests.redis_helpers import start_redis_server, stop

    import redis

    (tmp_path / "redis").mkdir()
    process, port = start_redis_server(tmp_path / "redis")
    try:
        with redis.Redis(port=port) as client:
            client.config_set("maxmemory-policy", "allkeys-lru")
        (tmp_path / "router.yaml").write_text(f"storage: redis://127.0.0.1:{port}/0\n")
        completed = run("check", "-c", "router.yaml", "--storage", cwd=tmp_path)
    finally:
        stop(process)
    assert completed.returncode == 1
    assert "router.yaml:1: storage:" in completed.stderr
    assert "maxmemory-policy is allkeys-lru" in completed.stderr


# -- plugins ---------------------------------------------------------------------------------------

def test_plugins_lists_webhook_with_its_settings(tmp_path):
    completed = run("plugins", cwd=tmp_path)
    assert completed.returncode == 0
    lines = completed.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("webhook"))
    assert "event-router" in lines[start]
    block = "\n".join(lines[start + 1:start + 5])
    for field in ("url", "method", "headers", "body"):
        assert field in block
    assert "required" in block
    # what the field's name and description leave out: the values allowed, the default
    method = next(line for line in lines[start + 1:start + 5] if "method" in line)
    assert method.endswith('(one of "POST", "PUT", "PATCH"; default "POST")')
    # every setting's column lines up, the longest names included (plugin author audit)
    settings = [re.match(r"    \S+ +(required|optional) ", line)
                for line in lines if line.startswith("    ")]
    assert all(settings) and len({found.start(1) for found in settings if found}) == 1


def test_plugins_json_gives_settings_fields(tmp_path):
    completed = run("plugins", "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    webhook = next(row for row in rows if row["name"] == "webhook")
    assert webhook["package"] == "event-router" and webhook["version"]
    fields = {field["name"]: field for field in webhook["settings"]}
    assert set(fields) == {"url", "method", "headers", "body"}
    assert fields["url"]["required"] is True
    assert fields["method"]["required"] is False
    assert (fields["method"]["choices"], fields["method"]["default"]) == (
        ["POST", "PUT", "PATCH"], "POST")
    assert "default" not in fields["url"] and "choices" not in fields["url"]
    assert all(field["description"] for field in fields.values())


def test_help_lists_the_commands(tmp_path):
    completed = run("--help", cwd=tmp_path)
    assert completed.returncode == 0
    for command in ("check", "send", "plugins", "serve", "dlq"):
        assert command in completed.stdout


def test_version_names_the_installed_release_and_python(tmp_path):
    completed = run("--version", cwd=tmp_path)
    assert completed.returncode == 0
    assert completed.stdout == (f"router {importlib.metadata.version('event-router')} "
                                f"(Python {platform.python_version()})\n")


def test_example_config_dry_run_works_offline(tmp_path):
    # A dry run that one destination refuses exits 1: without the fixture's fixed timestamp
    # (GA4 and Meta refuse an event days old), and with the page and browser that Meta's
    # website events need.
    order = json.loads((FIXTURES / "order_completed.json").read_text())
    del order["timestamp"]
    order["context"] |= {"page": {"url": "https://shop.example/checkout"}, "userAgent": "curl"}
    completed = run("send", "-c", str(ROOT / "config" / "router.yaml"), "-", "--dry-run",
                    "--json", cwd=tmp_path, stdin=json.dumps(order).encode(),
                    env={"WEBHOOK_TOKEN": SECRET})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert {line["destination"] for line in lines} == {
        "webhook", "Amplitude", "Mixpanel", "Google Analytics 4", "Meta", "Slack", "Order alerts"}
    alert = next(line for line in lines if line["destination"] == "Order alerts")
    assert alert["requests"][0]["body"] == {"text": "New order 50314b8e9bcf000000000000: 25.0 EUR"}
    assert_no_secret(completed)
    assert not (tmp_path / "var").exists()



def test_a_json_file_with_a_syntax_error_sends_nothing(workdir):
    # Read line by line, the lines that parse alone would be sent and the rest reported
    (workdir / "broken.json").write_text(
        '[\n  {"type": "track", "event": "A", "userId": "u1"}\n'
        '  {"type": "track", "event": "B", "userId": "u2"}\n]\n')
    completed = run("send", "-c", "router.yaml", "broken.json", "--dry-run", "--json",
                    cwd=workdir)
    assert completed.returncode == 1 and completed.stdout == ""
    assert "broken.json: cannot read events: not JSON" in completed.stderr
    assert "line 3" in completed.stderr and "nothing was sent" in completed.stderr
    empty = run("send", "-c", "router.yaml", "-", "--dry-run", cwd=workdir, stdin=b"\n")
    assert empty.returncode == 0 and "Traceback" not in empty.stderr  # no events, no error


def test_a_storage_that_cannot_be_opened_is_reported_at_its_config_line(workdir):
    (workdir / "blocked").write_text("a file where the spool's directory should be")
    (workdir / "bad.yaml").write_text(
        "destinations: []\nstorage: sqlite:///blocked/router.db\n")
    (workdir / "ev.json").write_text('{"type": "track", "event": "A", "userId": "u1"}')
    completed = run("send", "-c", "bad.yaml", "ev.json", cwd=workdir)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert "bad.yaml:2: storage: cannot open the storage sqlite:///blocked/router.db" \
        in completed.stderr


def test_a_bad_wait_is_a_usage_error(workdir):
    completed = run("send", "-c", "router.yaml", "-", "--wait", "soon", cwd=workdir,
                    stdin=b"{}")
    assert completed.returncode == 2 and "expected a duration" in completed.stderr


async def test_send_says_what_became_of_each_event_within_its_wait(tmp_path):
    # Not only "queued": the table says delivered or dead-lettered (with why), and a dead
    # letter makes the command fail, so a script sending events learns of it.
    from router.testing import FakeDestinationServer

    async with FakeDestinationServer() as server:
        server.script([400], path="/bad")
        (tmp_path / "router.json").write_text(json.dumps({
            "storage": f"sqlite:///{tmp_path / 'router.db'}",
            "egress": {"allow_private_addresses": True},
            "destinations": [
                {"name": "good", "plugin": "webhook", "settings": {"url": f"{server.url}/ok"}},
                {"name": "bad", "plugin": "webhook", "settings": {"url": f"{server.url}/bad"}}]}))
        (tmp_path / "ev.json").write_text(json.dumps(
            {"type": "track", "event": "Signed Up", "userId": "u-1", "messageId": "m-1"}))
        completed = await asyncio.to_thread(run, "send", "-c", "router.json", "ev.json",
                                            "--wait", "20s", cwd=tmp_path)
        # --json: the contract's fields on every line, whose requests only a dry run lists
        # (contract audit: the key was missing)
        as_json = await asyncio.to_thread(run, "send", "-c", "router.json", "-", "--json",
                                          "--wait", "20s", cwd=tmp_path,
                                          stdin=b'{"type": "track", "event": "A", "userId": '
                                                b'"u-1", "messageId": "m-2"}')
    assert completed.returncode == 1, completed.stderr
    rows = {line.split()[0]: line for line in completed.stdout.splitlines()[1:] if line.strip()}
    assert rows["good"].split()[1:] == ["send", "delivered"]
    assert "dead-lettered: " in rows["bad"] and "400" in rows["bad"]
    lines = {line["destination"]: line for line in map(json.loads, as_json.stdout.splitlines())}
    assert all(set(line) == LINE_KEYS | {"requests"} for line in lines.values())
    assert (lines["good"]["status"], lines["good"]["reason"]) == ("send", "delivered")
    assert lines["good"]["requests"] == []



def test_send_on_a_disk_without_room_says_so_without_a_traceback(tmp_path):
    (tmp_path / "router.yaml").write_text(
        'storage: "sqlite:///spool.db?min_free_bytes=1000000000000000000"\n'
        "destinations:\n  - name: hook\n    plugin: webhook\n"
        '    settings: {url: "https://hook.example/in"}\n')
    (tmp_path / "event.json").write_text('{"type": "track", "event": "E", "userId": "u1"}')
    completed = run("send", "-c", "router.yaml", "event.json", "--wait", "1", cwd=tmp_path)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "error: the storage cannot be used now" in completed.stderr
    assert "kept for delivery" in completed.stderr


# -- a plugin that fails while a dry run builds its requests -----------------------------------

FAILING_PLUGINS = {
    # build_request raises for identify events only, quoting its setting-like value
    "zboom": """
        class Boom(Probe):
            plugin_name = "zboom"

            def build_request(self, payloads):
                if payloads[0].body["type"] == "identify":
                    raise KeyError("name")
                return super().build_request(payloads)

        @hookimpl
        def router_register_destinations(register):
            register(Boom)
    """,
    # reads its body as a dict, which delivery never gives an opaque_bodies plugin
    "zopaque": """
        class Opaque(Probe):
            plugin_name = "zopaque"
            opaque_bodies = True

            def build_request(self, payloads):
                return HttpRequest.json("POST", "https://example.com/" + payloads[0].body["id"],
                                        [p.body for p in payloads])

        @hookimpl
        def router_register_destinations(register):
            register(Opaque)
    """,
}


def test_dry_run_reports_a_plugin_failing_to_build_a_request_and_shows_the_rest(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name, source in FAILING_PLUGINS.items():
        install_plugin(site, name, source)
    (tmp_path / "router.yaml").write_text(
        "storage: memory://\ndestinations:\n"
        "  - {name: hook, plugin: webhook, settings: {url: 'https://hooks.example/in'}}\n"
        "  - {name: boom, plugin: zboom}\n  - {name: opaque, plugin: zopaque}\n")
    events = b'[{"type": "identify", "userId": "u1", "messageId": "m-1"},' \
             b' {"type": "track", "event": "X", "userId": "u1", "messageId": "m-2"}]'
    completed = run("send", "-c", "router.yaml", "-", "--dry-run", "--json", cwd=tmp_path,
                    stdin=events, env={"PYTHONPATH": str(site)})
    assert "Traceback" not in completed.stderr, completed.stderr
    lines = {(line["event_index"], line["destination"]): line for line in
             map(json.loads, completed.stdout.splitlines())}
    assert lines[(0, "boom")]["status"] == "invalid"
    assert lines[(0, "boom")]["reason"] == "zboom failed to build a request: KeyError"
    assert lines[(1, "boom")]["status"] == "send"  # only the event it fails on
    assert lines[(0, "hook")]["status"] == lines[(1, "hook")]["status"] == "send"
    # built from the body as delivery reads it back from the spool: a Fragment, no dict
    assert lines[(1, "opaque")]["reason"] == "zopaque failed to build a request: TypeError"
    assert "destination boom: zboom failed to build a request: KeyError: 'name'" in \
        completed.stderr  # the message for the operator, in the log, on one line


# -- an operator's terminal, pipes and keys (CLI audit) ----------------------------------------

def test_the_table_prints_control_characters_of_an_event_as_escapes(workdir):
    # A client's messageId or event name could clear the screen or forge a line.
    event = {"type": "track", "event": "Order \x1b[2J\x1b]0;pwned\x07", "userId": "u-1",
             "messageId": "m-1\nevent 9: forged"}
    (workdir / "ev.json").write_text(json.dumps(event))
    completed = run("send", "-c", "router.yaml", "ev.json", "--dry-run", cwd=workdir)
    assert "\x1b" not in completed.stdout and "\x07" not in completed.stdout
    assert ("event 0: track Order \\x1b[2J\\x1b]0;pwned\\x07  (messageId m-1\\x0aevent 9: "
            "forged)") in completed.stdout.splitlines()


def test_a_byte_order_mark_is_read_past(workdir):
    event = {"type": "track", "event": "Signed Up", "userId": "u-1", "messageId": "m-1"}
    for name, text in (("ev.json", json.dumps(event)), ("ev.jsonl", json.dumps(event) + "\n")):
        (workdir / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        lines, completed = dry_run(workdir, name)
        assert completed.returncode == 0, completed.stdout
        assert {line["status"] for line in lines} == {"send", "skipped"}


def test_a_terminal_that_cannot_write_a_character_gets_its_escape_not_a_traceback(workdir):
    (workdir / "ev.json").write_text(json.dumps(
        {"type": "track", "event": "Café ☕", "userId": "u-1", "messageId": "m-1"}))
    completed = run("send", "-c", "router.yaml", "ev.json", "--dry-run", cwd=workdir,
                    env={"PYTHONIOENCODING": "ascii"})
    assert completed.returncode == 0 and "Traceback" not in completed.stderr
    assert "Caf\\xe9 \\u2615" in completed.stdout


def test_numbers_out_of_range_and_options_a_command_would_ignore_are_usage_errors(workdir):
    for args, complaint in ((("serve", "-c", "router.yaml", "--port", "70000"), "0 to 65535"),
                            (("dlq", "list", "-c", "router.yaml", "--limit",
                              "99999999999999999999"), "at least 1"),
                            (("dlq", "bury", "-c", "router.yaml", "--destination", "old",
                              "--since", "1h"), "takes every job queued")):
        completed = run(*args, cwd=workdir)
        assert completed.returncode == 2 and complaint in completed.stderr, completed.stderr
        assert "Traceback" not in completed.stderr


def test_a_source_the_config_does_not_have_is_pointed_out(workdir):
    (workdir / "ev.json").write_text(json.dumps(
        {"type": "track", "event": "A", "userId": "u-1", "messageId": "m-1"}))
    completed = run("send", "-c", "router.yaml", "ev.json", "--dry-run", "--source", "webiste",
                    cwd=workdir)
    assert "note: the config has no sources; 'webiste' has a dedup window of its own" \
        in completed.stderr
    quiet = run("send", "-c", "router.yaml", "ev.json", "--dry-run", cwd=workdir)
    assert "note" not in quiet.stderr


async def test_ctrl_c_while_waiting_for_delivery_says_the_events_are_queued(tmp_path):
    # It exited 130 without a word; sent again, the events went twice.
    from router.testing import Answer, FakeDestinationServer

    async with FakeDestinationServer(default=Answer(200, delay=30)) as server:
        (tmp_path / "router.json").write_text(json.dumps({
            "storage": f"sqlite:///{tmp_path / 'router.db'}",
            "egress": {"allow_private_addresses": True},
            "destinations": [{"name": "slow", "plugin": "webhook",
                              "settings": {"url": server.url}}]}))
        (tmp_path / "ev.jsonl").write_text("".join(json.dumps(
            {"type": "track", "event": "A", "userId": "u-1"}) + "\n" for _ in range(3)))
        process = subprocess.Popen(
            [sys.executable, "-m", "router", "send", "-c", "router.json", "ev.jsonl"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=as_from_a_terminal)
        try:
            await server.wait_for(1, timeout=30)  # accepted, and being delivered
            process.send_signal(signal.SIGINT)
            _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted: 3 event(s) were already accepted and queued" in stderr
    assert "Traceback" not in stderr


def test_a_large_file_is_routed_a_chunk_at_a_time(workdir):
    # Held whole, 100,000 events took 1 GB (CLI audit); 20,000 took 227 MB, and take 77 MB a
    # chunk at a time. Order and numbering run on across chunks, and so does the dedup.
    count = 20_000
    lines = [json.dumps({"type": "track", "event": "Order Completed", "userId": f"u{n % 50}",
                         "messageId": f"m-{n % (count - 1)}",  # the last repeats the first
                         "properties": {"revenue": 10, "title": "x" * 100}})
             for n in range(count)]
    (workdir / "many.jsonl").write_text("\n".join(lines) + "\n")
    measured = subprocess.run(
        # VmHWM, not ru_maxrss: Linux keeps that across exec, so it would say pytest's size
        [sys.executable, "-c", "import re, sys\nfrom router.cli import main\n"
         "code = main(sys.argv[1:])\nsys.stdout.flush()\nstatus = open('/proc/self/status')"
         ".read()\nprint(re.search(r'VmHWM:\\s+(\\d+)', status)[1], file=sys.stderr)\n"
         "sys.exit(code)", "send", "-c", "router.yaml", "many.jsonl", "--dry-run", "--json"],
        cwd=workdir, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOOK_SECRET": SECRET, "PYTHONPATH": str(ROOT)})
    assert measured.returncode == 0, measured.stderr
    printed = [json.loads(line) for line in measured.stdout.splitlines()]
    webhook = [line for line in printed if line["destination"] == "webhook"]
    assert [line["event_index"] for line in webhook] == list(range(count))
    assert [line["status"] for line in webhook[-2:]] == ["send", "duplicate"]
    peak_kb = int(measured.stderr.split()[-1])
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb // 1024} MB"


def test_json_lines_are_utf_8_whatever_the_terminal_encodes(workdir):
    # Through a Latin-1 stdout, "é" became a byte no JSON reader takes (deployment audit).
    (workdir / "ev.json").write_text(json.dumps(
        {"type": "track", "event": "Café ✓", "userId": "u-1", "messageId": "m-é"}))
    completed = subprocess.run(
        [sys.executable, "-m", "router", "send", "-c", "router.yaml", "ev.json", "--dry-run",
         "--json"], cwd=workdir, capture_output=True, timeout=60,
        env={**os.environ, "HOOK_SECRET": SECRET, "PYTHONIOENCODING": "latin-1"})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.decode("utf-8").splitlines()]
    assert {line["message_id"] for line in lines} == {"m-é"}


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("source, stdin", [("-", b""), ("empty.jsonl", None),
                                           ("empty.json", None)])
def test_an_input_with_no_events_says_so(workdir, source, stdin, dry_run):
    # It printed nothing and exited 0, which looks the same as events all sent.
    (workdir / "empty.jsonl").write_text("\n")
    (workdir / "empty.json").write_text("[]")
    completed = run("send", "-c", "router.yaml", source, *(["--dry-run"] if dry_run else []),
                    cwd=workdir, stdin=stdin)
    assert completed.returncode == 0 and completed.stdout == ""
    where = "standard input" if source == "-" else source
    assert f"note: {where} holds no events" in completed.stderr


def test_a_closed_standard_input_is_said_plainly(workdir):
    completed = subprocess.run(
        [sys.executable, "-m", "router", "send", "-c", "router.yaml"], cwd=workdir,
        capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.close(0),
        env={**os.environ, "HOOK_SECRET": SECRET})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert "standard input is closed" in completed.stderr


async def test_ctrl_c_at_any_point_of_a_long_send_says_exactly_what_is_queued(tmp_path):
    # A chunk being routed when Ctrl-C came was committed all the same, and not counted: it
    # said 1,000 fewer than were queued; after the routing, it said nothing (review).
    from router.storage.sqlite import SqliteStorage

    (tmp_path / "router.yaml").write_text(
        f"storage: sqlite:///{tmp_path}/router.db\negress: {{allow_private_addresses: true}}\n"
        "destinations:\n  - {name: hook, plugin: webhook, settings: {url: "
        "'http://127.0.0.1:9/in'}}\n")
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(
        {"type": "track", "event": "A", "userId": f"u{n}", "messageId": f"m-{n}"}) + "\n"
        for n in range(20_000)))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "send", "-c", "router.yaml", "many.jsonl", "--wait",
        "0s", cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=as_from_a_terminal)
    try:
        while not (tmp_path / "router.db").exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # somewhere in the routing, or after it
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    said = err.decode()
    if process.returncode == 0:
        pytest.skip("the send ended before Ctrl-C came")
    assert process.returncode == 130, said
    storage = SqliteStorage(tmp_path / "router.db")
    await storage.open(recover=False)
    try:
        queue = (await storage.stats(now=time.time())).queues.get("hook")
        queued = queue.pending if queue else 0
    finally:
        await storage.close()
    assert f"interrupted: {queued} event(s) were already accepted and queued" in said, said


# -- the egress rule: a dry run refuses what delivery refuses (S6) ------------------------------

# Where each event asks a plugin to send; the plugin takes the URL from the event's own options,
# so nothing checks it at config load and only the dry run's check and the transport stand in
# the way (one rule for the preview and for delivery: tokentimer-core #70's button that said yes
# while real alerts were refused).
_MAPPED = URL("http://[::ffff:127.0.0.1]:9/").host
"""The IPv4-mapped address as the reason names it: as yarl writes it, which its releases
differ on (``::ffff:7f00:1``, ``::ffff:127.0.0.1``)."""
REFUSED_URLS = {
    "http://2130706433:9/": "127.0.0.1 is a loopback address",
    "http://0177.0.0.1:9/": "127.0.0.1 is a loopback address",
    "http://0x7f000001:9/": "127.0.0.1 is a loopback address",
    "http://0.0.0.0:9/": "0.0.0.0 is the unspecified address",
    "http://localhost:9/": "localhost is a loopback host name",
    "http://[::ffff:127.0.0.1]:9/": f"{_MAPPED} embeds 127.0.0.1, which is a loopback address",
    "gopher://127.0.0.1:9/_FLUSHALL": "only http and https URLs are allowed, not 'gopher'",
    "file:///etc/passwd": "only http and https URLs are allowed, not 'file'",
}
TO_ITS_OPTION = """
    class ToItsOption(Probe):
        def translate(self, event, options):
            return [Payload({"url": options["url"]})]

        def build_request(self, payloads):
            return HttpRequest.json("POST", payloads[0].body["url"], {})

    @hookimpl
    def router_register_destinations(register):
        register(ToItsOption)
"""


def test_a_dry_run_refuses_each_address_as_delivery_does_and_for_the_same_reason(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "zurl", TO_ITS_OPTION)
    (tmp_path / "router.yaml").write_text(
        "storage: sqlite:///router.db\ndestinations:\n  - {name: anywhere, plugin: zurl}\n")
    events = "\n".join(json.dumps({"type": "track", "event": "E", "userId": "u-1",
                                   "messageId": f"m-{n}",
                                   "integrations": {"anywhere": {"url": url}}})
                       for n, url in enumerate(REFUSED_URLS)).encode()
    said = {}
    for mode in ("--dry-run", "--wait=30s"):
        completed = run("send", "-c", "router.yaml", "-", "--json", mode, cwd=tmp_path,
                        stdin=events, env={"PYTHONPATH": str(site)})
        assert "Traceback" not in completed.stderr, completed.stderr
        said[mode] = [(line["status"], line["reason"])
                      for line in map(json.loads, completed.stdout.splitlines())]
    expected = [f"egress refused: {reason}" for reason in REFUSED_URLS.values()]
    assert [reason for _, reason in said["--dry-run"]] == expected
    assert [reason for _, reason in said["--wait=30s"]] == [f"dead-lettered: {reason}"
                                                            for reason in expected]
