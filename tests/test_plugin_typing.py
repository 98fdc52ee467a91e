"""What a plugin author's own type checker says of the plugin API: the example plugin, as
copied to start a package, passes ``mypy --strict`` (README: the router ships ``py.typed``
so that plugins are checked against its annotations).

Run without pydantic's mypy plugin, as a plugin author's bare ``mypy --strict`` (and
pyright) checks: both see pydantic models only through ``dataclass_transform``, which reads
a field's default from ``Field(default=...)`` alone, never from ``Field``'s first
positional argument."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy_strict(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    # --follow-imports silent: the router is type-checked as it is installed (its own
    # checks are `make lint`'s), and only the plugin's errors are reported.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.devnull, "--strict",
         "--follow-imports", "silent", "--cache-dir", str(cache), "--no-error-summary",
         str(path)],
        cwd=ROOT, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300)


def test_the_example_plugin_passes_mypy_strict(tmp_path: Path):
    # DeliveryDefaults(batch_size=100, ...) was refused, "Missing named argument 'timeout'"
    # and twelve more, while its fields gave their defaults positionally to Field().
    checked = mypy_strict(ROOT / "examples" / "router-acme" / "router_acme.py", tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
