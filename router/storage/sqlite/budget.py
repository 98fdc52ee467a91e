"""The room a spool may take: ``max_bytes``, and ``min_free_bytes`` kept free on its disk
for delivery (``Budget._check_budget``, which refuses new work beyond them)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from router.errors import StorageFull
from router.storage.base import amount_of_bytes

MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space on the spool's disk below which intake is refused, kept for delivery."""


class Budget:
    """The spool's budget of room, checked at each accept and by ``ping``."""

    # The storage's state they use, which ``SqliteStorage.__init__`` sets and describes:
    path: Path
    _wal_path: Path
    max_bytes: int | None
    min_free_bytes: int
    _page_size: int

    def _check_budget(self, connection: sqlite3.Connection) -> None:
        """Refuse new work (``StorageFull``) when the spool has reached ``max_bytes``, or
        when it has less than ``min_free_bytes`` of room: delivery needs room to write what
        becomes of the work already accepted (the WAL, retries, dead letters), and on a disk
        filled to the last byte it could record nothing, and stopped.

        The room is the disk's free space, plus the pages free inside the spool (what
        delivery has freed: the file keeps its size, and new work takes them first), less
        what the next checkpoint will add to the file: the pages the WAL holds beyond the
        file's end, which a long read (a backup, a ``sqlite3`` shell) keeps from being copied
        home while intake goes on. With the free space alone, the WAL grew to 194 MB beside
        64 MB free, the checkpoint after the read took the last byte, and delivery could
        record nothing again (disk audit); and once a backlog had drained, its room stayed
        inside the file, and intake stayed refused with an empty queue (soak).

        The WAL file's size bounds that growth, so while the disk has room beyond it the
        spool's own figures are not read (two pragmas, 5.6 µs an accept call)."""
        free = _disk_free_bytes(self.path)
        if self.max_bytes is None and free - _file_size(self._wal_path) >= self.min_free_bytes:
            return
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        (free_pages,) = connection.execute("PRAGMA freelist_count").fetchone()
        size = self._page_size
        growth = max(0, pages * size - _file_size(self.path))
        if free + free_pages * size - growth < self.min_free_bytes:
            inside = (f" and {amount_of_bytes(free_pages * size)} inside the spool"
                      if free_pages else "")
            added = (f", less the {amount_of_bytes(growth)} its next checkpoint adds to the "
                     "spool" if growth >= 2**20 else "")
            raise StorageFull(f"the spool's disk has {amount_of_bytes(free)} free{inside}"
                              f"{added}, under the {amount_of_bytes(self.min_free_bytes)} kept "
                              "for delivery (?min_free_bytes=)")
        if self.max_bytes is not None and (pages - free_pages) * size >= self.max_bytes:
            raise StorageFull(f"the spool has reached its budget of {self.max_bytes} bytes")


def _disk_free_bytes(path: Path) -> int:
    disk = os.statvfs(path.parent)
    return disk.f_bavail * disk.f_frsize


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
