"""The docs' examples run as written: the README's embedding example, the curl examples and the
answers they show, docs/testing-plugins.md's tests; and every config example in the docs loads."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_embedding_example_is_the_file_that_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert block == (ROOT / "examples" / "embed.py").read_text().split('"""\n\n', 1)[1]


def test_the_embedding_example_routes_an_event_and_waits_for_its_delivery(tmp_path):
    # As a user runs it beside `make serve`'s sink: the default config, its sink's port
    # moved to a free one.
    port = _free_port()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "router.yaml").write_text(
        (ROOT / "config" / "router.yaml").read_text().replace("127.0.0.1:9900",
                                                              f"127.0.0.1:{port}"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sink = subprocess.Popen([sys.executable, "-m", "router.testing.sink", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_port(port)
        completed = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "embed.py")], cwd=tmp_path, timeout=120,
            capture_output=True, text=True, env=env)
    finally:
        sink.kill()
        received, _ = sink.communicate(timeout=10)
    assert completed.returncode == 0, completed.stderr
    lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
    assert lines["webhook"].startswith("send")
    assert lines["Slack"].startswith("skipped")  # off by default, not named by the event
    assert all(not outcome.startswith("invalid") for outcome in lines.values())
    assert lines["delivered:"] == "True"
    assert "POST /webhook" in received and "POST /ga4/" in received


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _yaml_blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, block in enumerate(re.findall(r"```yaml\n(.*?)```", path.read_text(),
                                                  re.S)):
            yield pytest.param(block, id=f"{path.relative_to(ROOT)}-{number}")


@pytest.mark.parametrize("block", list(_yaml_blocks()))
def test_every_yaml_example_in_the_docs_loads(block):
    # A whole config is checked as it is; a fragment (a destination entry, one section)
    # inside a minimal config around it. Every ${VAR} is given a value.
    from router.config import parse_config
    from router.destinations import build_destinations, egress_policy
    from router.registry import create_registry

    env = {name: "https://hooks.example/in" if name.endswith("URL") else f"value-{name}"
           for name in re.findall(r"\$\{(\w+)", block)}
    if re.match(r"\s*-\s+name:", block):
        text = "storage: memory://\ndestinations:\n" + block
    elif re.search(r"^(storage|destinations|server|sources|egress|dedup|delivery):", block,
                   re.M):
        text = block
    else:
        pytest.skip("not a config")
    loaded = parse_config(text, file="example.yaml", env=env)
    build_destinations(loaded, create_registry(), egress_policy(loaded.config))


def test_the_examples_of_testing_plugins_run_and_their_tests_pass():
    # docs/testing-plugins.md's examples test examples/router-acme. Run in order in one
    # namespace, as a reader pastes them (a fragment uses what an earlier block imported),
    # then each plain test function they define is called. The blocks that need an event
    # loop (the fake server's) and the conformance suite (which the acme package's own
    # tests run) are left out.
    from router_acme import Acme

    namespace: dict = {"Acme": Acme, "__name__": "testing_plugins_examples"}
    text = (ROOT / "docs" / "testing-plugins.md").read_text()
    for block in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M):
        if "await" not in block:
            # A name no file has: inspect (hypothesis asks it) would read the .md as Python,
            # which Python 3.13's tokenizer refuses with an error, where 3.11's got on.
            exec(compile(block, "<docs/testing-plugins.md>", "exec"), namespace)
    tests = {name: value for name, value in namespace.items()
             if name.startswith("test_") and callable(value) and name != "test_conformance"}
    assert {"test_an_order_is_an_acme_purchase",
            "test_every_track_keeps_its_message_id"} <= set(tests)
    for test in tests.values():
        test()


def _curl_examples():
    # Each shell block with curl in README.md and docs/http-api.md, cut where an answer is
    # shown: a `# {...}` line after a command, or at the end of its line.
    for path in (ROOT / "README.md", ROOT / "docs" / "http-api.md"):
        for block in re.findall(r"^```sh\n(.*?)^```", path.read_text(), re.S | re.M):
            if "curl" in block:
                yield pytest.param(block, id=str(path.relative_to(ROOT)))


def _steps(block: str) -> list[tuple[str, str | None]]:
    """The block as (commands, the answer shown after them or None), in order."""
    steps: list[tuple[str, str | None]] = []
    lines: list[str] = []
    for line in block.splitlines():
        inline = re.match(r"(curl .*?)\s+# (\{.*)$", line)
        if inline:
            steps.append(("\n".join([*lines, inline.group(1)]), inline.group(2)))
            lines = []
        elif line.startswith("# {"):
            steps.append(("\n".join(lines), line[2:]))
            lines = []
        elif not line.startswith("#"):
            lines.append(line)
        elif any(line.strip() for line in lines):  # a comment between commands
            steps.append(("\n".join(lines), None))
            lines = []
    if any(line.strip() for line in lines):
        steps.append(("\n".join(lines), None))
    return steps


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("block", list(_curl_examples()))
def test_the_curl_examples_get_the_answers_shown(block, tmp_path):
    # Run as written against `router serve` with the quick start's write key, on a free
    # port instead of 8080; `...` in a shown answer stands for the rest of it, and a
    # `(401)` after it is the status.
    port = _free_port()
    (tmp_path / "router.yaml").write_text(
        f"server: {{port: {port}}}\nstorage: memory://\n"
        "sources: [{name: website, write_keys: [demo-write-key]}]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "router", "serve", "-c", "router.yaml"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        block = block.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        variables = "\n".join(re.findall(r"^[A-Z]+=.*$", block, re.M))
        for commands, shown in _steps(block):
            status = re.search(r"\s+\((\d{3})\)$", shown or "")
            script = (f"{variables}\n{commands}" if not status else
                      f"{variables}\n{commands.rstrip()} -w ' (%{{http_code}})'")
            completed = subprocess.run(["bash", "-c", f"set -e\n{script}"], capture_output=True,
                                       text=True, timeout=30)
            assert completed.returncode == 0, (commands, completed.stderr)
            if shown is not None:
                pattern = ".*".join(re.escape(part) for part in
                                    re.sub(r"\s+\(\d{3}\)$", "", shown).split("..."))
                if status:
                    pattern += re.escape(f" ({status.group(1)})")
                assert re.fullmatch(pattern, completed.stdout.strip()), (commands,
                                                                        completed.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
