"""SQLite's errors said as the router's own: a full disk is ``StorageFull``; a disk that
fails, a spool this process may not write, no file descriptor left, a lock held too long or
a damaged file, ``StorageUnavailable`` (``_storage_error``)."""

from __future__ import annotations

import errno
import os
import resource
import sqlite3
from pathlib import Path

from router.errors import StorageFull, StorageUnavailable
from router.storage.sqlite.writer import LOCK_TIMEOUT

SALVAGE_ADVICE = ("stop every router process that uses it, then run `router salvage -c "
                  "CONFIG`, which keeps a copy of the damaged file and puts back every row "
                  "that can still be read (docs/storage.md, 'A damaged spool')")


def _storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk is ``StorageFull``; a disk that fails or is read-only, a spool another
    process has held locked for ``LOCK_TIMEOUT`` (a stopped ``router dlq``, a process
    paused mid-commit), or a damaged spool file, ``StorageUnavailable`` (intake answers 503,
    "try later", and delivery puts the jobs back); anything else as it is."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_CORRUPT:
        return StorageUnavailable(
            f"the spool {path} is damaged ({exc}): {SALVAGE_ADVICE}")
    if primary == sqlite3.SQLITE_FULL or (primary is None and "full" in str(exc).lower()):
        return StorageFull(f"the spool's disk is full: {exc}")
    if primary == sqlite3.SQLITE_CANTOPEN and (why := _no_descriptor_left()):
        return StorageUnavailable(f"{why}: {exc}")  # not the disk: ulimit -n
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN) and (
            why := _not_writable(path)):
        return StorageUnavailable(f"{why}: {exc}")  # not the disk: permissions or a mount
    if primary in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return StorageUnavailable(f"the spool's disk cannot be read or written: {exc}")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
            primary is None and "locked" in str(exc).lower()):
        return StorageUnavailable(f"another process has held the spool locked for over "
                                  f"{LOCK_TIMEOUT:g} s: {exc}")
    return exc


def _not_writable(path: Path) -> str | None:
    """Why this process may not write the spool, when that is why SQLite could not: a
    directory it may not write (SQLite makes its ``-wal`` and ``-shm`` files beside the
    spool), a spool file it may not write, or a read-only mount. Said as a disk fault, it
    sent operators to their disks (deployment audit). None when none of these holds."""
    for target, kind, access in ((path.parent, "directory", os.W_OK | os.X_OK),
                                 (path, "file", os.W_OK)):
        try:
            if not target.exists():
                continue
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                return f"the spool's {kind} {target} is on a read-only file system"
            if not os.access(target, access):
                return (f"this user (uid {os.geteuid()}) may not write the spool's {kind} "
                        f"{target}: SQLite writes the spool and its -wal and -shm files there")
        except OSError:
            continue
    return None


def _no_descriptor_left() -> str | None:
    """Why SQLite could not open a file when the process has no descriptor left (EMFILE,
    ENFILE), else None: said as a disk fault, it sent operators to their disks, not to
    ``ulimit -n``. Checked by opening one more file, at the moment of the error."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return (f"this process has no file descriptor left to open the spool's files "
                    f"({exc.strerror}; its limit is {soft}): raise the limit (ulimit -n), or "
                    "lower server.max_connections or the destinations' concurrency")
    return None
