"""A private redis-server for tests: on a free loopback port, no RDB, no AOF, stopped by
its pid. The machine's shared Redis on 6379 is never touched."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = Path(os.environ.get("ROUTER_TEST_REDIS_SERVER", "/usr/bin/redis-server"))
"""The server the tests start: set ``ROUTER_TEST_REDIS_SERVER`` (an absolute path) to run
them against another version, or against Valkey (docs/storage.md)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop our own server by its pid: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def start_redis_server(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server working in ``directory``, answering PING; its process and port."""
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is not installed")
    for _ in range(3):  # another process may grab the free port first: try another one
        port = _free_port()
        with open(directory / "redis.log", "ab") as log_file:
            process = subprocess.Popen(
                [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(directory),
                 "--daemonize", "no", "--loglevel", "warning"],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=directory)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(port):
                return process, port
            time.sleep(0.05)
        stop(process)
    pytest.fail(f"redis-server did not start: {(directory / 'redis.log').read_text()}")
