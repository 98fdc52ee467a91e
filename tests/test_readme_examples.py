"""The README's examples run as written, and every config example in the docs loads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_embedding_example_is_the_file_that_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert block == (ROOT / "examples" / "embed.py").read_text().split('"""\n\n', 1)[1]


def test_the_embedding_example_routes_an_event(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed.py")], cwd=tmp_path, timeout=120,
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr
    lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines())
    assert lines["webhook"].startswith("send")
    assert lines["Slack"].startswith("skipped")  # off by default, not named by the event
    assert (tmp_path / "var" / "router.db").exists()  # accepted durably before returning


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
