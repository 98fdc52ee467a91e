"""The demo sink ``make serve`` starts: it prints what destinations send, credentials masked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_sink_prints_each_request_with_credentials_masked():
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "router.testing.sink", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert "sink: printing" in sink.stdout.readline()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/ga4/mp/collect?measurement_id=G-1&api_secret=s3cret-0001",
            data=b'{"api_key": "k3y-0001", "writeKey": "wk-0001", "events": [{"name": '
                 b'"purchase", "properties": {"$token": "t0k-0001", "keywords": "shoes", '
                 b'"monkey": "george"}}]}', method="POST",
            headers={"Authorization": "Bearer t0ken-0001", "Content-Type": "application/json"})
        for _ in range(50):  # the server may need a moment after printing its banner
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    assert answer.status == 200
                break
            except OSError:
                time.sleep(0.1)
        sink.terminate()
        output, _ = sink.communicate(timeout=10)
    finally:
        if sink.poll() is None:
            sink.kill()
    assert "POST /ga4/mp/collect?measurement_id=G-1&api_secret=**REDACTED**" in output
    assert '"name": "purchase"' in output
    assert "s3cret-0001" not in output and "t0ken-0001" not in output
    # credentials in the body, by their field names (newcomer audit: Amplitude's api_key)
    assert "k3y-0001" not in output and "t0k-0001" not in output
    assert "wk-0001" not in output  # camelCase too
    assert '"keywords": "shoes"' in output and '"monkey": "george"' in output


def test_the_sink_runs_without_the_testing_extras():
    # `python -m router.testing.sink`, which config/router.yaml points at, failed on a plain
    # install: router.testing imported the conformance suite, and with it hypothesis.
    script = ("import runpy, sys; sys.modules['hypothesis'] = None; "
              "sys.argv = ['sink', '--help']; "
              "runpy.run_module('router.testing.sink', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                               text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr
    assert "--port" in completed.stdout


def test_the_conformance_suite_is_still_there_when_asked_for():
    from router import testing
    from router.testing import conformance

    assert testing.check_destination is conformance.check_destination
    assert testing.conformance_test is conformance.conformance_test
