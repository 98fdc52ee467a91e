"""Durability: accepted work survives kill -9, and a backlog waits on disk, not in memory."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router.testing.fake_server import Answer, FakeDestinationServer

WORKER = Path(__file__).with_name("durability_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, storage: Path, urls: dict[str, str], *, own_process: bool = False,
                 **delivery) -> Path:
    config = {"storage": f"sqlite:///{storage}", "egress": {"allow_private_addresses": True},
              "delivery": {"own_process": own_process},
              "destinations": [{"name": name, "plugin": "webhook", "settings": {"url": url},
                                "delivery": {"backoff_initial": "50ms", "backoff_max": "200ms",
                                             **delivery}}
                               for name, url in urls.items()]}
    path.write_bytes(orjson.dumps(config))
    return path


async def start_worker(*args: str, env: dict[str, str] | None = None
                       ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


async def exited(pid: int, timeout: float) -> bool:
    for _ in range(int(timeout / 0.05)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("own_process", [False, True], ids=["one-process", "own-process"])
async def test_kill_9_mid_delivery_loses_nothing(tmp_path, own_process):
    """Kafka Connect's hard-bounce test in small: kill -9 while three destinations are
    being fed; after a restart every acknowledged event reaches every destination, and the
    only duplicates are re-sends of the same messageId. With a delivery process, the router
    is killed and its delivery process stops by itself."""
    total = 3000
    servers = [FakeDestinationServer() for _ in range(3)]
    for server in servers:
        await server.start()
        server.default = Answer(200, delay=0.01)  # a downstream that takes 10 ms
    try:
        config = write_config(tmp_path / "router.json", tmp_path / "spool.db",
                              {f"d{i}": server.url for i, server in enumerate(servers)},
                              own_process=own_process)
        worker = await start_worker("route", str(config), str(total), "100")
        acknowledged = 0
        while acknowledged < total:
            line = await asyncio.wait_for(worker.stdout.readline(), 60)
            assert line, "worker exited early"
            acknowledged = int(line.split()[1])
        await servers[0].wait_for(total // 3, timeout=60)  # well into delivery
        delivery_processes = children_of(worker.pid)
        assert len(delivery_processes) == (1 if own_process else 0)
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        for pid in delivery_processes:  # orphaned: it sees the pipe close and stops
            assert await exited(pid, timeout=30), "the delivery process outlived the router"
        delivered_before = [len(s.requests) for s in servers]
        assert min(delivered_before) < total, "killed too late: nothing left to resume"

        restart = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "send", "-c", str(config), os.devnull,
            "--wait", "120s", cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(restart.wait(), 150) == 0

        expected = {f"crash-{n}" for n in range(total)}
        for server in servers:
            ids = [request.json["messageId"] for request in server.requests]
            assert set(ids) >= expected, f"lost: {sorted(expected - set(ids))[:5]}"
            assert set(ids) <= expected  # duplicates only ever repeat an accepted messageId
            duplicates = len(ids) - len(set(ids))
            print(f"{server.url}: {len(ids)} requests, {duplicates} duplicates")
    finally:
        for server in servers:
            await server.stop()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_with_synchronous_full_an_event_is_on_the_disk_before_it_is_acknowledged(
        tmp_path, synchronous):
    """docs/storage.md: `?synchronous=full` survives an OS crash or power loss, NORMAL a
    crash of the process only. What makes the difference is whether the WAL is synced
    before intake answers: counted here by a shim around fsync and fdatasync, between one
    acknowledged chunk of events and the next. With NORMAL, SQLite syncs the WAL at
    checkpoints only (none in a run this short)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the sync-counting shim")
    shim, log = tmp_path / "count_wal_syncs.so", tmp_path / "syncs.log"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim),
                    str(Path(__file__).parent / "fixtures" / "count_wal_syncs.c"), "-ldl"],
                   check=True, timeout=60)
    async with FakeDestinationServer(default=Answer(200, delay=60)) as stalled:
        # Its requests hang: delivery records nothing while the chunks are accepted.
        config = write_config(tmp_path / "router.json", tmp_path / "spool.db",
                              {"hook": stalled.url}, timeout="120s")
        data = orjson.loads(config.read_bytes())
        data["storage"] += f"?synchronous={synchronous}"
        config.write_bytes(orjson.dumps(data))
        worker = await start_worker("route", str(config), "100", "20",
                                    env={"LD_PRELOAD": str(shim), "SYNC_LOG": str(log)})
        try:
            for _ in range(5):
                line = await asyncio.wait_for(worker.stdout.readline(), 60)
                assert line.startswith(b"accepted"), line
        finally:
            worker.kill()
            await worker.wait()
    # The worker logs each acknowledgement after the syncs of its commit (the shim logs a
    # sync as it starts): the syncs between two acknowledgements are the later chunk's.
    syncs_between: list[int] = []
    for line in log.read_text().splitlines():
        if line.startswith("accepted "):
            syncs_between.append(0)
        elif syncs_between:
            syncs_between[-1] += 1
    syncs_between = syncs_between[:-1]  # what came after the last one is no chunk's
    assert len(syncs_between) == 4
    if synchronous == "full":
        assert min(syncs_between) >= 1, syncs_between  # each chunk synced first
    else:
        assert syncs_between == [0, 0, 0, 0], syncs_between


async def start_serving(config: Path, port: int) -> asyncio.subprocess.Process:
    """``router serve`` on ``port``, once it says it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "serve", "-c", str(config), "--port", str(port),
        cwd=config.parent, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    while b"destinations:" not in await asyncio.wait_for(process.stdout.readline(), 30):
        assert process.returncode is None, "router serve exited at start"
    return process


async def test_kill_9_during_http_intake_loses_no_acknowledged_event(tmp_path):
    """A client sends batches while the router is killed with kill -9: every event answered
    200 reaches the destination after a restart, and a batch whose answer never came, sent
    again as client libraries do, is neither lost nor doubled by the dedup window."""
    import aiohttp

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with FakeDestinationServer() as server:
        config = write_config(tmp_path / "router.json", tmp_path / "spool.db",
                              {"hook": server.url})
        data = orjson.loads(config.read_bytes())
        data["sources"] = [{"name": "web", "write_keys": ["wk-durable"]}]
        config.write_bytes(orjson.dumps(data))
        auth = {"Authorization": "Basic " + base64.b64encode(b"wk-durable:").decode()}
        batches = [[{"type": "track", "event": "E", "userId": f"u{n % 7}",
                     "messageId": f"ingest-{n}"} for n in range(start, start + 20)]
                   for start in range(0, 2000, 20)]
        acknowledged: set[str] = set()
        unanswered: list[list[dict]] = []
        router = await start_serving(config, port)
        async with aiohttp.ClientSession() as session:
            for number, batch in enumerate(batches):
                if number == 40:
                    router.send_signal(signal.SIGKILL)  # with requests still coming
                try:
                    async with session.post(f"http://127.0.0.1:{port}/v1/batch", headers=auth,
                                            json={"batch": batch}) as answer:
                        assert answer.status == 200
                        acknowledged.update(event["messageId"] for event in batch)
                except aiohttp.ClientError:
                    unanswered.append(batch)
            await router.wait()
            assert len(acknowledged) >= 40 * 20 and unanswered, "killed too late or too early"
            router = await start_serving(config, port)
            try:
                for batch in unanswered:  # the client's retry
                    async with session.post(f"http://127.0.0.1:{port}/v1/batch", headers=auth,
                                            json={"batch": batch}) as answer:
                        assert answer.status == 200
                every = {event["messageId"] for batch in batches for event in batch}
                for _ in range(600):
                    if {request.json["messageId"] for request in server.requests} >= every:
                        break
                    await asyncio.sleep(0.1)
            finally:
                router.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(router.wait(), 30) == 0
    ids = [request.json["messageId"] for request in server.requests]
    assert set(ids) == every  # the acknowledged ones, and the retried ones
    assert acknowledged <= set(ids)


async def test_a_backlog_for_a_dead_destination_waits_on_disk(tmp_path):
    """200,000 events held for a destination that refuses connections: the process's memory
    stays within a fixed budget, because the backlog lives in the SQLite spool."""
    server = FakeDestinationServer()
    await server.start()
    dead_url = server.url
    await server.stop()  # nothing listens there now
    config = write_config(tmp_path / "router.json", tmp_path / "spool.db", {"dead": dead_url},
                          max_attempts=1000, max_age="1d")
    worker = await start_worker("backlog", str(config), "200000")
    output, _ = await asyncio.wait_for(worker.communicate(), 300)
    assert worker.returncode == 0
    peak = float(output.decode().split()[-1])
    print(f"peak RSS with a 200,000-event backlog: {peak} MB")
    assert peak < 200, f"memory grew with the backlog: {peak} MB"


async def test_a_backup_taken_while_the_router_runs_delivers_every_queued_event(tmp_path):
    """storage.md's way to back up a running spool: SQLite's online backup (the sqlite3
    shell's ``.backup``, Python's ``Connection.backup``). A plain copy of the ``.db`` file
    leaves behind what is still in the WAL: events already answered 200."""
    import sqlite3
    from contextlib import closing

    from tests.delivery_helpers import router_for, track, webhook

    down = FakeDestinationServer()
    await down.start()
    down_url = down.url
    await down.stop()  # nothing listens there: the backlog stays queued
    spool = tmp_path / "router.db"
    backup = tmp_path / "restored" / "router.db"
    backup.parent.mkdir()
    running = router_for(tmp_path, [webhook("hook", down_url, backoff_initial="10s")],
                         storage=f"sqlite:///{spool}")
    async with running:
        await running.route_many([track(n) for n in range(300)])
        with closing(sqlite3.connect(spool)) as source, \
                closing(sqlite3.connect(backup)) as target:
            source.backup(target)
        # What a plain copy of the .db alone holds: the accepted events are in the WAL.
        assert Path(f"{spool}-wal").stat().st_size > 0
    async with FakeDestinationServer() as up:
        restored = router_for(tmp_path, [webhook("hook", up.url)], storage=f"sqlite:///{backup}")
        async with restored:
            assert await restored.drain(timeout=20)
        received = [request.json["messageId"] for request in up.requests]
    assert sorted(received) == sorted(f"m-{n}" for n in range(300))
