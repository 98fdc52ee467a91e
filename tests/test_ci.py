"""CI's own scripts (.ci/): what they choose on machines other than this one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def supported_minors() -> list[int]:
    """The Python 3 minor versions pyproject.toml's classifiers name."""
    text = (ROOT / "pyproject.toml").read_text()
    return sorted(int(m) for m in re.findall(r'"Programming Language :: Python :: 3\.(\d+)"',
                                              text))


def fake_python(path: Path, minor: int) -> Path:
    """An interpreter that is Python 3.<minor> to whatever ``-c`` code asks sys.version_info
    (the real one, this test's, runs the code)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -c ] || exit 1\n'
        f'exec {sys.executable} -c "\n'
        "import sys\n"
        "class V(tuple):\n"
        f"    major, minor, micro, releaselevel, serial = 3, {minor}, 0, 'final', 0\n"
        f"sys.version_info = V((3, {minor}, 0, 'final', 0))\n"
        'exec(sys.argv[1])" "$2"\n')
    path.chmod(0o755)
    return path


def newest_python(path: str) -> Path | None:
    """What .ci/newest-python chooses with ``path`` as PATH, resolved as make would."""
    chosen = subprocess.run([str(ROOT / ".ci" / "newest-python")], capture_output=True,
                            text=True, check=True, timeout=60,
                            env={"PATH": path, "HOME": "/nonexistent"}).stdout.strip()
    found = shutil.which(chosen, path=path)
    return Path(found) if found else None


def test_ci_runs_the_lowest_floors_on_a_python_the_path_has_without_pyenv(tmp_path):
    # The loop looked for python3.1[1-9] as a glob, which names files of the working
    # directory, not of PATH: without pyenv, a python3.13 on PATH went unseen and
    # make test-lowest ran on python3.
    bin_ = tmp_path / "bin"
    newest = supported_minors()[-1]
    fake_python(bin_ / "python3", supported_minors()[0])
    expected = fake_python(bin_ / f"python3.{newest}", newest)
    assert newest_python(f"{bin_}:/usr/bin:/bin") == expected


def test_ci_leaves_out_a_python_newer_than_the_project_supports(tmp_path):
    # The newest the machine had, whatever it was: a pyenv Python newer than pyproject.toml's
    # classifiers (a 3.14 added to the machine) would be chosen, where the oldest releases of
    # the dependencies have no wheels (pydantic-core's need Rust to build), and CI failed on
    # no change of the project's.
    bin_, root = tmp_path / "bin", tmp_path / "pyenv"
    newest = supported_minors()[-1]
    fake_python(bin_ / "python3", supported_minors()[0])
    (bin_ / "pyenv").write_text(f'#!/bin/sh\n[ "$1" = root ] && echo {root}\n')
    (bin_ / "pyenv").chmod(0o755)
    expected = fake_python(root / "versions" / f"3.{newest}.1" / "bin" / "python3", newest)
    fake_python(root / "versions" / f"3.{newest + 1}.0" / "bin" / "python3", newest + 1)
    assert newest_python(f"{bin_}:/usr/bin:/bin") == expected
