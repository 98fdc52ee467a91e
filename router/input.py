"""Reading events from files and stdin for ``router send``: a JSON object, a JSON array, a
``/v1/batch`` body, or JSON Lines. A line that does not parse is reported, not fatal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson


class Unreadable:
    """A piece of input that is not JSON, kept in sequence so indexes stay true."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_events(data: bytes) -> Iterator[Any]:
    """Every event in ``data``, in order; an ``Unreadable`` where a JSON Lines line is bad."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        yield from _json_lines(data)
        return
    if isinstance(document, list):
        yield from document
    elif isinstance(document, dict) and isinstance(document.get("batch"), list):
        yield from with_batch_defaults(document)
    else:
        yield document


def with_batch_defaults(body: dict[str, Any]) -> Iterator[Any]:
    """Events of a batch body, with the batch's ``context``, ``integrations`` and ``sentAt``
    as defaults (an event's own values win), as Segment's batch endpoint applies them.

    Shared by ``router send`` and the HTTP ``/v1/batch`` endpoint, so a batch means the same
    thing wherever it enters."""
    shared = {key: body[key] for key in ("context", "integrations", "sentAt") if key in body}
    for event in body["batch"]:
        if isinstance(event, dict) and shared:
            merged = dict(event)
            for key, value in shared.items():
                if key not in merged:
                    merged[key] = value
                elif isinstance(value, dict) and isinstance(merged[key], dict):
                    merged[key] = {**value, **merged[key]}
            yield merged
        else:
            yield event


def _json_lines(data: bytes) -> Iterator[Any]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield Unreadable(f"line {number} is not JSON: {exc}")
