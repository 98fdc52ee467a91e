"""Where durable state lives: the dedup window, the spool of deliveries, the dead letters.

``storage_for_url(url)`` picks the backend from the config's ``storage`` URL.
"""

from __future__ import annotations

from pathlib import Path

from router.storage.base import DeadLetter, Job, NewJob, Storage


def storage_for_url(url: str, *, base_dir: Path | None = None) -> Storage:
    """The storage for a config URL (not yet opened: ``await storage.open()``)."""
    if url.startswith("memory://"):
        from router.storage.memory import MemoryStorage
        return MemoryStorage()
    if url.startswith("sqlite:///"):
        from router.storage.sqlite import SqliteStorage
        return SqliteStorage.from_url(url, base_dir=base_dir or Path.cwd())
    if url.startswith("redis://"):
        from router.storage.redis import RedisStorage
        return RedisStorage.from_url(url)
    raise ValueError(f"unsupported storage URL: {url}")


__all__ = ["DeadLetter", "Job", "NewJob", "Storage", "storage_for_url"]
