"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
