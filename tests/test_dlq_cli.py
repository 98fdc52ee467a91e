"""``router dlq list|replay|purge|bury`` on the SQLite spool a router left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from router.storage.base import DeadLetterFilter
from router.testing import Answer, FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook
from tests.redis_helpers import start_redis_server, stop

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dlq-secret-token-0001"


def dlq(*args: str, config: Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "dlq", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=config.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own, on a free loopback port."""
    process, port = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


async def test_list_replay_and_purge_dead_letters(tmp_path):
    async with FakeDestinationServer() as bad, FakeDestinationServer() as good:
        bad.script([Answer(400, body={"error": f"bad token {TOKEN}"})] * 6)  # replays fail too
        hook = webhook("bad", bad.url)
        hook["settings"]["headers"] = {"Authorization": f"Bearer {TOKEN}"}
        destinations = [hook, webhook("good", good.url)]
        router = router_for(tmp_path, destinations)
        async with router:
            await router.route_many([track(1), track(2), track(3)])
            assert await router.drain(timeout=10)
        config = tmp_path / "router.json"
        config.write_bytes(orjson.dumps({
            "storage": f"sqlite:///{tmp_path / 'router.db'}",
            "egress": {"allow_private_addresses": True}, "destinations": destinations}))

        listed = dlq("list", "--json", config=config)
        assert listed.returncode == 0, listed.stderr
        letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert sorted(letter["message_id"] for letter in letters) == ["m-1", "m-2", "m-3"]
        assert {letter["destination"] for letter in letters} == {"bad"}
        # every field of the export, under its name (mutation audit: "request" renamed went
        # unnoticed)
        assert all(set(letter) == {"id", "destination", "message_id", "attempts", "failed_at",
                                   "first_attempt_at", "accepted_at", "reason", "status",
                                   "request", "response", "payload"} for letter in letters)
        assert all(letter["request"]["method"] == "POST" for letter in letters)
        assert all(letter["status"] == 400 and letter["attempts"] == 1 for letter in letters)
        # what the API said, its echo of the token masked (the reason was "HTTP 400" alone)
        assert {letter["reason"] for letter in letters} == {"HTTP 400: bad token **REDACTED**"}
        assert all(letter["accepted_at"] <= letter["first_attempt_at"] <= letter["failed_at"]
                   for letter in letters)
        assert TOKEN not in listed.stdout  # masked in the stored request and response
        assert "**REDACTED**" in listed.stdout
        newest = dlq("list", "--limit", "2", config=config).stdout.splitlines()
        assert [line.split()[0] for line in newest[:-1]] == [f"#{letter['id']}"
                                                             for letter in letters[1:]]
        assert newest[-1] == "2 dead letter(s), the newest; older ones are not shown " \
                             "(raise --limit)"
        exported = dlq("list", "--json", "--limit", "2", config=config)  # an export is told
        assert len(exported.stdout.splitlines()) == 2
        assert exported.stderr == "note: 2 dead letter(s), the newest; older ones are not " \
                                  "shown (raise --limit)\n"
        # all three failed within the last hour (mutation audit: --since counted into the
        # future, selecting nothing, went unnoticed)
        recent = dlq("list", "--json", "--since", "1h", config=config).stdout.splitlines()
        assert len(recent) == 3
        # None failed within the last 0 s: as "no filter", a purge took every letter.
        assert "purged 0" in dlq("purge", "--since", "0s", config=config).stdout

        replayed = dlq("replay", "--destination", "Good", config=config)
        assert "replayed 0" in replayed.stdout and replayed.stderr == ""  # a name it has
        # a name it does not have is said (mutation audit: the note said for the config's
        # own names instead went unnoticed)
        assert dlq("list", "--destination", "gone", config=config).stderr == (
            "note: the config has no destination named 'gone'; dead letters of a destination "
            "since removed are still listed\n")
        assert "replayed 3" in dlq("replay", "--destination", "bad", config=config).stdout
        assert dlq("list", "--json", config=config).stdout == ""

        async with router_for(tmp_path, destinations) as again:
            assert await again.drain(timeout=10)
        assert len(good.requests) == 3  # a replay never reaches the destination that succeeded
        assert len(bad.requests) == 6

        purged = dlq("purge", "--reason", "HTTP 400", config=config)
        assert "purged 3" in purged.stdout
        assert dlq("list", config=config).stdout.strip().endswith("0 dead letter(s)")


@pytest.mark.parametrize("storage, why", [
    # From the wrong directory, a relative sqlite path would make a new, empty spool
    ("sqlite:///var/router.db", "does not exist"),
    ("memory://", "keeps nothing"),
])
def test_a_storage_without_dead_letters_to_read_is_an_error_not_an_empty_list(tmp_path,
                                                                              storage, why):
    config = tmp_path / "router.yaml"
    config.write_text(f"storage: {storage}\n")
    listed = dlq("list", config=config)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr
    assert "router.yaml:1: storage:" in listed.stderr and why in listed.stderr
    assert not (tmp_path / "var" / "router.db").exists()


def test_bad_arguments_are_usage_errors(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text("storage: memory://\n")
    for args, complaint in ((("list", "--since", "bogus"), "expected a duration"),
                            (("list", "--limit", "-1"), "at least 1"),
                            # accepted and ignored, `purge --limit 5` purged every letter
                            (("purge", "--limit", "5"), "apply to `router dlq list` only"),
                            (("replay", "--json"), "apply to `router dlq list` only")):
        completed = dlq(*args, config=config)
        assert completed.returncode == 2 and complaint in completed.stderr
        assert "Traceback" not in completed.stderr


async def test_a_replay_leaves_the_letters_of_destinations_the_config_does_not_send_to(
        tmp_path):
    # Replayed, they went to queues no worker sends from, left the list, and the command
    # said only "replayed N".
    async with FakeDestinationServer() as server:
        server.default = Answer(400)
        destinations = [webhook(name, server.url) for name in ("kept", "gone", "off")]
        async with router_for(tmp_path, destinations) as router:
            await router.route_many([track(1)])
            assert await router.drain(timeout=10)
    destinations[2]["enabled"] = False
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                     "egress": {"allow_private_addresses": True},
                                     "destinations": [destinations[0], destinations[2]]}))
    replayed = dlq("replay", config=config)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == "replayed 1 dead letter(s)\n"
    assert "dead letters of 'gone', 'off' were not replayed" in replayed.stderr
    listed = [orjson.loads(line)
              for line in dlq("list", "--json", config=config).stdout.splitlines()]
    assert sorted(letter["destination"] for letter in listed) == ["gone", "off"]
    assert dlq("replay", "--destination", "GONE", config=config).stdout == \
        "replayed 0 dead letter(s)\n"


async def test_a_secret_a_body_template_put_in_the_payload_is_masked(tmp_path):
    secret = "body-secret-0001"
    template = '{"key": "%s", "event": {{ event.event | tojson }}}'
    async with FakeDestinationServer() as bad:
        bad.script([Answer(400, body={"error": "no"})] * 3)
        hook = webhook("bad", bad.url)
        hook["settings"]["body"] = template % secret
        async with router_for(tmp_path, [hook]) as router:
            await router.route_many([track(1)])
            assert await router.drain(timeout=10)
    hook["settings"]["body"] = template % "${BODY_SECRET}"  # as the operator's config has it
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                     "egress": {"allow_private_addresses": True},
                                     "destinations": [hook]}))
    listed = dlq("list", "--json", config=config, env={"BODY_SECRET": secret})
    assert listed.returncode == 0, listed.stderr
    (letter,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert secret not in listed.stdout
    assert letter["payload"] == '{"key": "**REDACTED**", "event": "Tested"}'  # rendered text


async def test_the_queue_of_a_destination_since_removed_is_said_at_start_and_can_be_buried(
        tmp_path, caplog):
    from router.server.run import _say_what_waits_for_no_destination
    old, kept = webhook("old-hook", "http://127.0.0.1:9/"), webhook("kept", "http://127.0.0.1:9/")
    async with router_for(tmp_path, [old, kept], deliver=False) as router:
        await router.route_many([track(1), track(2), track(3)])
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({  # "old-hook" renamed, or removed
        "storage": f"sqlite:///{tmp_path / 'router.db'}",
        "egress": {"allow_private_addresses": True}, "destinations": [kept]}))

    async with router_for(tmp_path, [kept], deliver=False) as router:
        await _say_what_waits_for_no_destination(router)
    warnings = [r.getMessage() for r in caplog.records if "wait in the storage" in r.getMessage()]
    assert warnings == ["3 job(s) wait in the storage for destination 'old-hook', which the "
                        "config does not have (removed, renamed or disabled): they are sent "
                        "once it is back (enabled, under that name), or `router dlq bury -c CONFIG "
                        "--destination old-hook` moves them to the dead letters"]

    refused = dlq("bury", "--destination", "KEPT", config=config)
    assert refused.returncode == 1 and "whose workers send its jobs" in refused.stderr
    buried = dlq("bury", "--destination", "Old-Hook", config=config)
    assert buried.returncode == 0, buried.stderr
    assert buried.stdout == "buried 3 job(s) of 'old-hook' in the dead letters\n"
    listed = dlq("list", "--json", "--destination", "old-hook", config=config)
    letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(letter["message_id"] for letter in letters) == ["m-1", "m-2", "m-3"]
    assert all("buried" in letter["reason"] for letter in letters)
    caplog.clear()
    async with router_for(tmp_path, [kept], deliver=False) as router:
        await _say_what_waits_for_no_destination(router)
        assert (await router.storage.stats(now=0)).queues["kept"].pending == 3  # untouched
    assert not [r for r in caplog.records if "wait in the storage" in r.getMessage()]


async def test_a_queue_renamed_only_in_case_is_said_and_can_be_buried(tmp_path, caplog):
    # Queues keep the very name, the config's names compare without case: "Amp" renamed
    # "amp" left Amp's jobs to no worker, and bury refused them as the config's own.
    from router.server.run import _say_what_waits_for_no_destination
    async with router_for(tmp_path, [webhook("Amp", "http://127.0.0.1:9/")],
                          deliver=False) as router:
        await router.route_many([track(1), track(2)])
    renamed = webhook("amp", "http://127.0.0.1:9/")
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                     "destinations": [renamed]}))
    async with router_for(tmp_path, [renamed], deliver=False) as router:
        await _say_what_waits_for_no_destination(router)
    assert any("2 job(s) wait in the storage for destination 'Amp', which the config now "
               "names 'amp'" in record.getMessage() for record in caplog.records)
    assert "whose workers send" in dlq("bury", "--destination", "amp", config=config).stderr
    buried = dlq("bury", "--destination", "Amp", config=config)
    assert buried.stdout == "buried 2 job(s) of 'Amp' in the dead letters\n", buried.stderr


async def test_bury_takes_the_queue_of_the_very_name_before_one_differing_in_case(tmp_path):
    # mutation audit: burying the first queue whose name matched without case, when one of
    # the very name was there too, went unnoticed
    for name, events in (("Amp", [track(1), track(2)]), ("amp", [track(3)])):
        async with router_for(tmp_path, [webhook(name, "http://127.0.0.1:9/")],
                              deliver=False) as router:
            await router.route_many(events)
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                     "destinations": []}))
    for name, count in (("amp", 1), ("Amp", 2)):
        buried = dlq("bury", "--destination", name, config=config)
        assert buried.stdout == f"buried {count} job(s) of {name!r} in the dead letters\n", \
            buried.stderr


async def test_a_letter_prints_as_one_line_whatever_its_message_id_holds(tmp_path):
    # A client's messageId cleared the operator's screen and forged a line (CLI audit).
    async with FakeDestinationServer() as bad:
        bad.default = Answer(400)
        destinations = [webhook("bad", bad.url)]
        router = router_for(tmp_path, destinations)
        async with router:
            await router.route(track(1, messageId="m-1\x1b[2J\n#2 forged status=200"))
            assert await router.drain(timeout=10)
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{tmp_path / 'router.db'}",
                                     "egress": {"allow_private_addresses": True},
                                     "destinations": destinations}))
    lines = dlq("list", config=config).stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "1 dead letter(s)"
    assert "m-1\\x1b[2J\\x0a#2 forged status=200 attempts=1" in lines[0]


def test_a_spool_whose_directory_cannot_be_entered_is_said_at_the_storage_line(
        tmp_path, monkeypatch):
    # As a user without the right to enter the spool's directory: a PermissionError
    # traceback (deployment audit). Run as root here, so the refusal is the kernel's stand-in.
    from router.config import load_config
    from router.dead_letters import require_spool
    from router.errors import ConfigError

    config = tmp_path / "router.yaml"
    config.write_text("storage: sqlite:///data/router.db\n")
    loaded = load_config(config)

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", refused)
    with pytest.raises(ConfigError) as caught:
        require_spool(loaded, tmp_path / "data" / "router.db", "nothing to read")
    assert str(caught.value).startswith(f"{config}:1: storage: cannot look for ")
    assert "Permission denied (run as a user who may read it)" in str(caught.value)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_replay_delivers_each_users_events_in_the_order_they_were_accepted(
        tmp_path, request, backend):
    # An ordered destination dead-lettered u1's events out of the order they were accepted
    # in: m-1 failed past order_hold_attempts and was retried while m-2 and m-3 were
    # refused, and m-2, replayed alone, was refused again. `router dlq replay` queued the
    # letters in the order they failed, and the destination got m-2 last (after m-3 and
    # m-1, which failed at about the same time, in either order).
    storage = (f"sqlite:///{tmp_path / 'router.db'}" if backend == "sqlite" else
               f"{request.getfixturevalue('redis_url')}?prefix=dlq-{uuid.uuid4().hex[:12]}")
    refusing = True
    running: list = []

    async def api(request) -> Answer:
        message_id = request.json["messageId"]
        if not refusing:
            return Answer(200)
        if message_id == "m-1" and not [  # retried until m-2 is a dead letter
                letter for letter in await running[0].storage.dead_letters(DeadLetterFilter())
                if letter.message_id == "m-2"]:
            return Answer(500)
        return Answer(400, body={"error": f"refused {message_id}"})

    async with FakeDestinationServer(handler=api) as server:
        destinations = [webhook("ordered", server.url, ordered=True, order_hold_attempts=1,
                                max_attempts=100)]
        config = tmp_path / "router.json"
        config.write_bytes(orjson.dumps({"storage": storage, "destinations": destinations,
                                         "egress": {"allow_private_addresses": True}}))

        async def deliver(*events) -> None:
            async with router_for(tmp_path, destinations, storage=storage) as router:
                running[:] = [router]
                await router.route_many(list(events))
                assert await router.drain(timeout=30)

        await deliver(track(1, user="u1"), track(11, user="u2"), track(2, user="u1"),
                      track(3, user="u1"), track(12, user="u2"))
        replayed = dlq("replay", "--reason", "refused m-2", config=config)
        assert replayed.stdout == "replayed 1 dead letter(s)\n", replayed.stderr
        await deliver()
        listed = dlq("list", "--json", config=config)
        letters = [orjson.loads(line)["message_id"] for line in listed.stdout.splitlines()]
        assert sorted(letters) == ["m-1", "m-11", "m-12", "m-2", "m-3"]
        assert letters[-1] == "m-2"  # and m-1's letter was written after m-2's first one

        refusing = False
        server.requests.clear()
        replayed = dlq("replay", config=config)
        assert replayed.stdout == "replayed 5 dead letter(s)\n", replayed.stderr
        await deliver()
    delivered = [r.json for r in server.requests if r.status == 200]
    assert [event["messageId"] for event in delivered if event["userId"] == "u1"] == [
        "m-1", "m-2", "m-3"]
    assert [event["messageId"] for event in delivered if event["userId"] == "u2"] == [
        "m-11", "m-12"]
