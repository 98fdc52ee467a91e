"""What a process costs, as ``/metrics`` shows it: CPU, memory, open files, start time.

Read from Linux's ``/proc`` when scraped, for the serving process and for its delivery
process alike (the parent knows the child's id, so no message has to carry the figures).
Where ``/proc`` is missing (macOS), or the process has just gone, there are no figures and
the metrics have no series, rather than wrong ones.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from functools import cache

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcessStats:
    cpu_seconds: float
    """User and system CPU time, since the process started."""
    resident_bytes: int
    virtual_bytes: int
    start_time: float
    """Seconds since the epoch."""
    open_fds: int
    max_fds: int | None
    """The soft limit on open files (``ulimit -n``); None when unlimited or unknown."""


def read_process(pid: int | str = "self") -> ProcessStats | None:
    """The figures of process ``pid`` (this one by default), or None where they cannot be
    read."""
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as file:
            stat = file.read()
        with open(f"{base}/statm", "rb") as file:
            virtual_pages, resident_pages = file.read().split()[:2]
        open_fds = len(os.listdir(f"{base}/fd"))
        max_fds = _soft_open_files_limit(f"{base}/limits")
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count from after it.
    fields = stat[stat.rindex(b")") + 2:].split()
    user_ticks, system_ticks, start_ticks = int(fields[11]), int(fields[12]), int(fields[19])
    return ProcessStats(
        cpu_seconds=(user_ticks + system_ticks) / _TICKS,
        resident_bytes=int(resident_pages) * _PAGE, virtual_bytes=int(virtual_pages) * _PAGE,
        start_time=_boot_time() + start_ticks / _TICKS, open_fds=open_fds, max_fds=max_fds)


def _soft_open_files_limit(path: str) -> int | None:
    with open(path, encoding="ascii") as file:
        for line in file:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return int(soft) if soft.isdigit() else None
    return None


@cache
def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as file:
        for line in file:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise ValueError("no btime in /proc/stat")


@cache
def build_info() -> dict[str, str]:
    """The labels of ``router_build_info``: the installed package's version and Python's."""
    try:
        version = importlib.metadata.version("event-router")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "unknown"
    return {"version": version, "python": platform.python_version()}
