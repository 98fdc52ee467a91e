"""A damaged spool file (reliability.md R12): bytes changed on disk, a WAL cut mid-frame.

The router starts, delivers every intact event, and moves what the damage reached to the
dead letters with a reason that says so, instead of sending changed bytes (another
messageId, another amount) or failing every lease of the destination for ever."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
from pathlib import Path

import orjson

from router.storage.base import DeadLetterFilter
from router.storage.sqlite import LAYOUT
from router.testing.fake_server import FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook

EVENTS = 300
BATCH = 100  # a route_many call: one bundle a destination


async def queue_events(spool: Path, *, copy_to: Path | None = None) -> None:
    """Route ``EVENTS`` events, ``BATCH`` a call, into ``spool`` for a destination nobody
    listens to; with ``copy_to``, copy the files while the router still has them open (what
    a kill -9 leaves: the last commits in the WAL)."""
    down = FakeDestinationServer()
    await down.start()
    url = down.url
    await down.stop()
    router = router_for(spool.parent, [webhook("hook", url, backoff_initial="10s")],
                        storage=f"sqlite:///{spool}", deliver=False)
    async with router:
        for start in range(0, EVENTS, BATCH):
            await router.route_many([track(n) for n in range(start, start + BATCH)])
        if copy_to is not None:
            for suffix in ("", "-wal"):
                shutil.copyfile(f"{spool}{suffix}", f"{copy_to}{suffix}")


async def deliver_all(spool: Path) -> tuple[list[dict], list]:
    """Start a router on ``spool`` with its destination up; what reached it (each event's
    messageId and property n) and the dead letters."""
    async with FakeDestinationServer() as server:
        router = router_for(spool.parent, [webhook("hook", server.url)],
                            storage=f"sqlite:///{spool}")
        async with router:
            assert await router.drain(timeout=30)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=1000)
        received = [request.json for request in server.requests]
    return received, letters


def delivered_intact(received: list[dict]) -> list[int]:
    """The n of each event received, checking that each arrived as it was sent."""
    numbers = [event["properties"]["n"] for event in received]
    assert all(event["messageId"] == f"m-{event['properties']['n']}" for event in received)
    return sorted(numbers)


def change_byte(path: Path, near: bytes, offset: int, new: bytes) -> None:
    """Change the byte at ``offset`` in the one place ``near`` appears in the file."""
    data = bytearray(path.read_bytes())
    assert data.count(near) == 1
    position = data.index(near) + offset
    data[position:position + 1] = new
    path.write_bytes(bytes(data))


async def test_an_event_whose_bytes_changed_on_disk_is_dead_lettered_not_sent(tmp_path,
                                                                              caplog):
    # Before the checksums, `"n":150` with its 5 made a 6 still parsed: the destination got
    # messageId m-150 with n 160, and the test below with a changed messageId got it twice.
    spool = tmp_path / "router.db"
    await queue_events(spool)
    change_byte(spool, b'{"n":150}', len('{"n":1'), b"6")
    with caplog.at_level(logging.ERROR, logger="router.storage"):
        received, letters = await deliver_all(spool)
    assert delivered_intact(received) == [n for n in range(EVENTS) if n != 150]
    (letter,) = letters
    assert letter.message_id == "m-150" and letter.destination == "hook"
    assert letter.reason.startswith("damaged in the spool: its bytes on disk no longer match")
    assert b'{"n":160}' in letter.body  # kept as read, for the operator to see
    assert "1 job(s) of destination hook moved to the dead letters" in caplog.text


async def test_a_bundle_whose_list_of_events_is_unreadable_costs_only_its_own_events(
        tmp_path):
    # Before, the lease that read it failed, again every two seconds: the destination's
    # events after it were never sent, and drain() never ended.
    spool = tmp_path / "router.db"
    await queue_events(spool)
    with contextlib.closing(sqlite3.connect(spool)) as connection, connection:
        (bundle, packed), = connection.execute(
            "SELECT id, jobs FROM bundles ORDER BY id LIMIT 1 OFFSET 1").fetchall()
        header_byte = packed.index(b'"m-1') + 1
        damaged = packed[:header_byte] + b"M" + packed[header_byte + 1:]
        connection.execute("UPDATE bundles SET jobs = ? WHERE id = ?", (damaged, bundle))
    received, letters = await deliver_all(spool)
    assert delivered_intact(received) == [*range(BATCH), *range(2 * BATCH, EVENTS)]
    assert len(letters) == BATCH
    assert {letter.message_id for letter in letters} == {""}  # lost with the list
    assert all("list of events of its bundle is unreadable" in letter.reason
               for letter in letters)


async def test_bundles_written_before_the_checksums_are_still_delivered(tmp_path):
    # A spool of layout 1 holds bundles without CRCs: an upgrade delivers them unchecked.
    spool = tmp_path / "router.db"
    await queue_events(spool)
    with contextlib.closing(sqlite3.connect(spool)) as connection, connection:
        for bundle, first_id in connection.execute("SELECT id, first_id FROM bundles"
                                                   ).fetchall():
            connection.execute("UPDATE bundles SET jobs = ? WHERE id = ?",
                               (layout_1_bundle(connection, bundle, first_id), bundle))
        connection.execute("PRAGMA user_version = 1")
    received, letters = await deliver_all(spool)
    assert delivered_intact(received) == list(range(EVENTS)) and letters == []
    with contextlib.closing(sqlite3.connect(spool)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == LAYOUT == 2


def layout_1_bundle(connection: sqlite3.Connection, bundle: int, first_id: int) -> bytes:
    """The bundle as layout 1 wrote it: header length, header without CRCs, bodies."""
    (packed,) = connection.execute("SELECT jobs FROM bundles WHERE id = ?", (bundle,)
                                   ).fetchone()
    start = 12 + int.from_bytes(packed[4:8], "big")
    entries = orjson.loads(packed[12:start])
    header = orjson.dumps([entry[:4] for entry in entries])
    return len(header).to_bytes(4, "big") + header + packed[start:]


async def test_a_wal_cut_mid_frame_loses_only_the_commit_it_tore(tmp_path):
    # What a power loss can leave with synchronous=NORMAL: the WAL's last frame half
    # written. SQLite drops that transaction; the router starts and delivers the rest.
    spool = tmp_path / "router.db"
    crashed = tmp_path / "crashed" / "router.db"
    crashed.parent.mkdir()
    await queue_events(spool, copy_to=crashed)
    wal = Path(f"{crashed}-wal")
    size = wal.stat().st_size
    assert size > 32  # the commits are in the WAL, not yet in the database file
    with wal.open("r+b") as file:
        file.truncate(size - 100)  # inside the last frame: a page is 16 KB
    received, letters = await deliver_all(crashed)
    assert delivered_intact(received) == list(range(EVENTS - BATCH)) and letters == []
