"""Reading events from files and stdin for ``router send``: a JSON object, a JSON array, a
``/v1/batch`` body, or JSON Lines. A line of JSON Lines that does not parse is reported, not
fatal; a document (an array, or an object over several lines) that does not parse is
refused whole, since reading its lines one by one would send whichever of them happen to
parse on their own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson


class UnreadableDocument(ValueError):
    """The input is one JSON document that does not parse; ``str()`` says where."""


class Unreadable:
    """A piece of input that is not JSON, kept in sequence so indexes stay true."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_events(data: bytes, *, json_lines: bool = False) -> Iterator[Any]:
    """Every event in ``data``, in order; an ``Unreadable`` where a JSON Lines line is bad.
    ``UnreadableDocument`` when ``data`` is one document with a syntax error. Empty input
    holds no events (``router send /dev/null`` delivers what an earlier run left queued).

    ``json_lines`` says the input is JSON Lines (a ``.jsonl`` or ``.ndjson`` file), even when
    its first line is the bad one; otherwise the input tells. A UTF-8 byte order mark, which
    Windows tools write, is read past."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    if not data.strip():
        return
    if json_lines:
        yield from _json_lines(data)
        return
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not _is_json_lines(data):
            raise UnreadableDocument(f"not JSON: {exc.msg} at line {exc.lineno}, column "
                                     f"{exc.colno}") from None
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


def _is_json_lines(data: bytes) -> bool:
    """JSON Lines has an object on each line, so its first line parses by itself; an array,
    or an object spread over several lines, does not."""
    first = next((line for line in data.splitlines() if line.strip()), b"")
    if first.lstrip().startswith(b"["):
        return False
    try:
        orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return True


def _json_lines(data: bytes) -> Iterator[Any]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            # orjson counts lines and columns within the line it was given
            yield Unreadable(f"line {number}, column {exc.colno}: not JSON: {exc.msg}")
