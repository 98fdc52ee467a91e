"""A damaged spool file (reliability.md R12): bytes changed on disk, a WAL cut mid-frame, a
page SQLite cannot read.

The router delivers every intact event and moves what the damage reached to the dead
letters with a reason that says so, instead of sending changed bytes (another messageId,
another amount) or failing every lease of the destination for ever; a file whose pages are
damaged is refused at start, and ``router salvage`` puts back what can be read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router.cli import main
from router.errors import ConfigError
from router.storage.base import DeadLetterFilter
from router.storage.sqlite import LAYOUT, PAGE_SIZE, SqliteStorage
from router.testing.fake_server import FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook

EVENTS = 300
BATCH = 100  # a route_many call: one bundle a destination


async def queue_events(spool: Path, *, copy_to: Path | None = None, batch: int = BATCH,
                       **delivery: object) -> None:
    """Route ``EVENTS`` events, ``batch`` a call, into ``spool`` for a destination nobody
    listens to; with ``copy_to``, copy the files while the router still has them open (what
    a kill -9 leaves: the last commits in the WAL)."""
    down = FakeDestinationServer()
    await down.start()
    url = down.url
    await down.stop()
    router = router_for(spool.parent, [webhook("hook", url, backoff_initial="10s", **delivery)],
                        storage=f"sqlite:///{spool}", deliver=False)
    async with router:
        for start in range(0, EVENTS, batch):
            await router.route_many([track(n) for n in range(start, start + batch)])
        if copy_to is not None:
            for suffix in ("", "-wal"):
                shutil.copyfile(f"{spool}{suffix}", f"{copy_to}{suffix}")


async def deliver_all(spool: Path, **delivery: object) -> tuple[list[dict], list]:
    """Start a router on ``spool`` with its destination up; what reached it (each event's
    messageId and property n) and the dead letters."""
    async with FakeDestinationServer() as server:
        router = router_for(spool.parent, [webhook("hook", server.url, **delivery)],
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


def salvage(spool: Path) -> int:
    """``router salvage`` with a config naming ``spool``; its exit status."""
    config = spool.with_name("router.json")
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{spool}", "destinations": []}))
    return main(["salvage", "-c", str(config)])


def change_byte(path: Path, near: bytes, offset: int, new: bytes) -> None:
    """Change the byte at ``offset`` in the one place ``near`` appears in the file."""
    data = bytearray(path.read_bytes())
    assert data.count(near) == 1
    position = data.index(near) + offset
    data[position:position + 1] = new
    path.write_bytes(bytes(data))


def damage_the_root_page(spool: Path, table: str = "lanes") -> None:
    """Break the count of cells of the root page of ``table`` (``lanes`` has one page)."""
    with contextlib.closing(sqlite3.connect(spool)) as connection:
        (root,) = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                                     (table,)).fetchone()
    data = bytearray(spool.read_bytes())
    page = (root - 1) * PAGE_SIZE
    assert data[page] in (0x0D, 0x05)  # a page of a table, leaf or interior
    data[page + 3] ^= 0x7F
    spool.write_bytes(bytes(data))


@pytest.mark.parametrize("ordered", [False, True], ids=["bundled", "ordered"])
async def test_an_event_whose_bytes_changed_on_disk_is_dead_lettered_not_sent(tmp_path,
                                                                              caplog, ordered):
    # Before the checksums, `"n":150` with its 5 made a 6 still parsed: the destination got
    # messageId m-150 with n 160. An ordered destination's jobs are rows of `jobs`, each with
    # a checksum of its own.
    spool = tmp_path / "router.db"
    await queue_events(spool, ordered=ordered)
    change_byte(spool, b'{"n":150}', len('{"n":1'), b"6")
    with caplog.at_level(logging.ERROR, logger="router.storage"):
        received, letters = await deliver_all(spool, ordered=ordered)
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
    # Their bodies are lost with the list: a replay once sent them as empty requests.
    storage = SqliteStorage(spool)
    await storage.open(recover=False)
    try:
        assert await storage.replay(DeadLetterFilter(), now=0) == 0
        assert len(await storage.dead_letters(DeadLetterFilter(), limit=1000)) == BATCH
    finally:
        await storage.close()


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


async def test_a_spool_with_a_damaged_page_is_refused_at_start_then_salvaged(tmp_path, capsys):
    # SQLite stops at a damaged page ("database disk image is malformed"); before, the
    # router failed to start with that bare message, and the sqlite3 shell's .recover fails
    # on this spool ("SQL logic error"), so the queued events had no way back.
    spool = tmp_path / "router.db"
    await queue_events(spool, batch=10)  # 30 bundles, a few to a page of the table
    data = bytearray(spool.read_bytes())
    page = data.index(b'["m-150",') // PAGE_SIZE * PAGE_SIZE  # where bundle m-150..159 is
    assert data[page] == 0x0D  # a leaf page of a table
    data[page + 3] ^= 0x7F  # its count of cells
    spool.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match=r"router\.db is damaged \(.*\): stop every router "
                                          r"process that uses it, then run `router salvage"):
        await router_for(tmp_path, [webhook("hook", "http://127.0.0.1:9/")],
                         storage=f"sqlite:///{spool}").start()

    assert salvage(spool) == 0
    said = capsys.readouterr().out
    assert "bundles: " in said and "stretch(es) could not be read" in said
    (kept,) = tmp_path.glob("router.db.damaged-*[0-9]Z")
    assert kept.read_bytes() == bytes(data)  # the damaged file, as it was

    with contextlib.closing(sqlite3.connect(spool)) as salvaged:
        (put_back,) = salvaged.execute("SELECT SUM(id - first_id + 1) FROM bundles").fetchone()
        (remembered,) = salvaged.execute("SELECT count(*) FROM seen").fetchone()
    assert 0 < put_back < EVENTS and remembered == EVENTS  # one page of bundles lost
    received, letters = await deliver_all(spool)
    numbers = delivered_intact(received)
    assert len(numbers) == put_back and 150 not in numbers and letters == []
    assert numbers[0] == 0 and numbers[-1] == EVENTS - 1  # read on past the damage
    assert salvage(spool) == 0
    assert "intact, nothing to salvage" in capsys.readouterr().out


async def test_router_check_storage_finds_the_damage_a_router_would_refuse(tmp_path, capsys):
    # It opened the file without the check a starting router makes, and said "OK" of a
    # spool that router would refuse.
    spool = tmp_path / "router.db"
    await queue_events(spool)
    config = spool.with_name("router.json")
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{spool}", "destinations": []}))
    check = ["check", "--storage", "-c", str(config)]
    assert await asyncio.to_thread(main, check) == 0
    capsys.readouterr()

    damage_the_root_page(spool, "bundles")
    assert await asyncio.to_thread(main, check) != 0
    said = capsys.readouterr().err
    assert "router.json" in said and "storage" in said
    assert "router.db is damaged" in said and "router salvage -c CONFIG" in said
    assert len(said.strip().splitlines()) == 1  # SQLite's findings span lines of their own


async def test_a_lane_whose_destination_was_lost_keeps_its_number(tmp_path, capsys):
    # The jobs of a bundle carry no destination: it is the lane's row in `lanes` that says
    # whose they are. Lost, the lane's number must stay taken, or the next destination to
    # get a lane would take that number, and deliver another destination's events.
    spool = tmp_path / "router.db"
    await queue_events(spool)
    damage_the_root_page(spool)
    assert salvage(spool) == 0
    assert (f"{EVENTS} job(s) of a destination whose name was lost are dead letters of "
            "'(unreadable lane 1)'") in capsys.readouterr().out
    received, letters = await deliver_all(spool)  # "hook" gets a lane of its own, empty
    assert received == [] and len(letters) == EVENTS
    assert {letter.destination for letter in letters} == {"(unreadable lane 1)"}
    assert sorted(int(letter.message_id[2:]) for letter in letters) == list(range(EVENTS))
    assert all("lost with its row of the lanes table" in letter.reason for letter in letters)


async def test_a_lost_lane_row_is_named_again_by_the_jobs_that_name_it(tmp_path, capsys):
    # An ordered destination's jobs are rows of `jobs`, each with its destination.
    spool = tmp_path / "router.db"
    await queue_events(spool, ordered=True)
    damage_the_root_page(spool)
    assert salvage(spool) == 0
    assert "lanes: 0 row(s) put back; 1 stretch(es)" in capsys.readouterr().out
    received, letters = await deliver_all(spool, ordered=True)
    assert delivered_intact(received) == list(range(EVENTS)) and letters == []


async def test_salvage_of_a_layout_1_spool_keeps_the_columns_it_has(tmp_path, capsys):
    # Asked for the columns layout 2 added, the damaged file answered "no such column",
    # which the salvage took for damage: every row of jobs and dead_letters was dropped.
    spool = tmp_path / "router.db"
    await queue_events(spool, ordered=True)
    with contextlib.closing(sqlite3.connect(spool)) as connection, connection:
        connection.execute("ALTER TABLE jobs DROP COLUMN body_crc")
        connection.execute("ALTER TABLE dead_letters DROP COLUMN first_attempt_at")
        connection.execute("PRAGMA user_version = 1")
    damage_the_root_page(spool, "seen")
    assert salvage(spool) == 0
    assert f"jobs: {EVENTS} row(s) put back\n" in capsys.readouterr().out
    received, letters = await deliver_all(spool, ordered=True)
    assert delivered_intact(received) == list(range(EVENTS)) and letters == []


async def test_damage_that_only_an_index_shows_is_refused_and_salvaged(tmp_path, capsys):
    # A changed destination name in a row of jobs passes quick_check but not the index
    # that holds the old name: the router started, then failed every completion.
    spool = tmp_path / "router.db"
    await queue_events(spool, ordered=True)
    data = bytearray(spool.read_bytes())
    leaf = next(start for start in range(PAGE_SIZE, len(data), PAGE_SIZE)  # of jobs' rows
                if data[start] == 0x0D and b'{"n":' in data[start:start + PAGE_SIZE])
    row = data.index(b"hook", leaf)
    data[row + 3:row + 4] = b"m"
    spool.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="is damaged"):
        await router_for(tmp_path, [webhook("hook", "http://127.0.0.1:9/", ordered=True)],
                         storage=f"sqlite:///{spool}").start()
    assert salvage(spool) == 0
    assert f"jobs: {EVENTS} row(s) put back" in capsys.readouterr().out
    storage = SqliteStorage(spool)
    await storage.open()  # as a router opens it: the check passes now
    await storage.close()


async def test_salvage_refuses_while_a_router_delivers(tmp_path, capsys):
    spool = tmp_path / "router.db"
    await queue_events(spool)
    router = router_for(tmp_path, [webhook("hook", "http://127.0.0.1:9/")],
                        storage=f"sqlite:///{spool}")
    async with router:
        assert salvage(spool) == 1
    assert "a router is delivering from" in capsys.readouterr().err


async def test_a_page_the_disk_cannot_read_is_an_io_error_not_damage(tmp_path):
    # SQLite lists a page the disk failed to read (EIO) among integrity_check's findings:
    # the router called an intact file damaged and advised `router salvage`, which, under
    # the same errors, rewrote it (I/O fault audit, with libfiu).
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the EIO shim")
    shim = tmp_path / "fail_pread.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim),
                    str(Path(__file__).parent / "fixtures" / "fail_pread.c"), "-ldl"],
                   check=True, timeout=60)
    spool = tmp_path / "router.db"
    await queue_events(spool)
    config = spool.with_name("router.json")
    config.write_bytes(orjson.dumps({"storage": f"sqlite:///{spool}", "destinations": []}))
    check = [sys.executable, "-m", "router", "check", "--storage", "-c", str(config)]
    bad_sectors = {"LD_PRELOAD": str(shim), "FAIL_PREAD_PATH": str(spool),
                   "FAIL_PREAD_FROM": str(3 * PAGE_SIZE)}
    failed = subprocess.run(check, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **bad_sectors})
    assert failed.returncode != 0
    assert "disk I/O error" in failed.stderr and "unable to get the page" in failed.stderr
    assert "damaged" not in failed.stderr and "salvage" not in failed.stderr
    intact = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert intact.returncode == 0, intact.stderr
