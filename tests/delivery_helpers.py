"""Building routers for delivery tests: YAML in, a started router out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from router.config import parse_config
from router.registry import create_registry
from router.routing import Router

FAST_RETRIES = {"backoff_initial": "20ms", "backoff_max": "100ms", "timeout": "2s"}


def router_for(tmp_path: Path, destinations: list[dict[str, Any]], *,
               storage: str | None = None, deliver: bool = True, **top: Any) -> Router:
    """A router over a SQLite file in ``tmp_path`` (or ``storage``), loopback allowed."""
    config = {"storage": storage or f"sqlite:///{tmp_path / 'router.db'}",
              "egress": {"allow_private_addresses": True},
              "destinations": destinations, **top}
    loaded = parse_config(orjson.dumps(config).decode(), file="test.yaml", env={})
    return Router(loaded, registry=create_registry(), deliver=deliver)


def webhook(name: str, url: str, **delivery: Any) -> dict[str, Any]:
    return {"name": name, "plugin": "webhook", "settings": {"url": url},
            "delivery": {**FAST_RETRIES, **delivery}}


def track(n: int, user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Tested", "userId": user, "messageId": f"m-{n}",
            "properties": {"n": n}, **extra}


async def fill_the_disk(storage: Any, full: bool) -> None:
    """A ``SqliteStorage`` whose disk has no room left, to SQLite itself: it answers
    SQLITE_FULL when the file would grow (``max_page_count``), as on a real full disk."""
    def operation(connection: Any) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count={pages if full else 1 << 30}")
    await storage._call(operation, writes=False)  # the one private call: the writer's connection


def lease_large_and_short(router: Router, destination: str, *, lease_for: float) -> None:
    """Make the next lease of ``router``'s worker for ``destination`` large, as if its
    destination had been fast, and ``lease_for`` seconds long (300 s at least in
    production): what the tests of a worker's lease upkeep need. Their one reach into a
    running worker."""
    worker = router._delivery.workers[destination]
    worker.lease_for = lease_for
    worker.delivered_per_second = 1e6
