"""What the callgrind drivers (``bench.callgrind_one_per_request``, ``bench.callgrind_route``,
``bench.callgrind_translate``) share: running a driver again under
``valgrind --tool=callgrind --instr-atstart=no``, switching the instrumentation on and off
around the part they count, and reading back the instructions callgrind counted.

Wall-clock rates on a shared 2-core machine move by ±10 % from run to run; callgrind counts
instructions, which do not depend on the load, so a change can be weighed to a fraction of
a percent. A driver runs itself with ``--inner`` under valgrind (``under_callgrind``); its
inner run prints its result as JSON on its last line of output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.delivery import ROOT

UNDER_VALGRIND = "valgrind" in os.environ.get("LD_PRELOAD", "") or any(
    "vgpreload" in line for line in Path("/proc/self/maps").read_text().splitlines())


def instrumentation(on: bool) -> None:
    """Switch callgrind's instrumentation for this process. ``callgrind_control`` reaches it
    through vgdb, which forces its way in (ptrace) while this process waits, blocked: a wait
    that ran code (a loop polling the child) was counted, for as long as the machine's load
    made it last, and moved the count by ±0.5 %. Nothing to do outside valgrind, which lets
    ``--inner`` alone check a driver."""
    if not UNDER_VALGRIND:
        return
    said = subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                          check=False).stdout.decode()
    if "OK." not in said:  # it exits 0 when it finds no such process
        raise RuntimeError(f"callgrind_control failed: {said}")


def instructions_in(path: Path) -> int:
    """The total callgrind counted (its ``totals:`` line; ``summary:`` counts only what
    was collected before the last dump, none here)."""
    found = re.search(r"^totals:\s*(\d+)", path.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"no totals in {path}")
    return int(found.group(1))


def under_callgrind(module: str, arguments: list[str], out: Path) -> tuple[dict[str, Any], int]:
    """Run ``python -m module *arguments --inner`` under callgrind (instrumentation off at
    start, so only what the driver switches on is counted); returns the JSON its inner run
    printed last, and the instructions counted."""
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}", sys.executable, "-m", module, *arguments,
               "--inner"]
    # A fixed hash seed: with a random one, which names collide in dicts and in the type
    # attribute cache changes from run to run, and the count with it (by ±0.2 %).
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, check=True)
    return orjson.loads(run.stdout.splitlines()[-1]), instructions_in(out)
