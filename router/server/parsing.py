"""Strict JSON for the ingest API, and the checks each event passes before it is routed.

Python's ``json`` accepts things we must not: ``NaN`` and ``Infinity`` (not JSON, and they
break every destination), numbers that overflow to infinity, duplicate keys (which value wins
differs between parsers, so the event would mean different things to different systems), and
nesting so deep that it ends in ``RecursionError``. ``parse_json`` refuses all of these with a
400 and a precise reason. The stdlib parser is used rather than orjson because it can report
duplicate keys; it costs about 3 ms for a full 500 KB batch.

What can only be judged per event is checked by ``check_event``, so that in a batch only the
offending event is rejected: nesting deeper than ``MAX_DEPTH``, ``\\u0000`` in a string (many
destinations store text where NUL is not allowed), lone surrogates and integers beyond 64
bits (they cannot be encoded again, and the storage keeps every payload as JSON), and the
32 KB limit per event, measured on the event as the client sent it (see ``check_event``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from router.events import MAX_EVENT_BYTES
from router.server.problems import Problem

MAX_DEPTH = 64
"""How deeply an event's objects and arrays may nest. Real events use a handful of levels."""


class Refused:
    """What stands in a parsed batch for a value that is not valid JSON for an event (a
    ``NaN``, a number that overflows, an object with a key twice), so that only the event
    holding it is rejected: Python's ``json.dumps`` writes ``float('nan')`` as ``NaN``, and
    segment-analytics-python, which does not retry a 400, dropped the whole batch."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message


def parse_json(data: bytes) -> Any:
    """The JSON document in ``data``; ``Problem`` 400 naming what is wrong with it."""
    document, refused = _parse(data)
    if refused:
        raise Problem(400, refused[0].code, refused[0].message)
    return document


def parse_batch_json(data: bytes) -> tuple[Any, bool]:
    """Like ``parse_json`` for a batch body, except that a value refused inside one of its
    events is left in place as a ``Refused`` (find it with ``refused_in``), for that event
    alone to be rejected; the flag says whether there is any. One elsewhere (in the batch's
    own ``context``, say) still refuses the whole body."""
    document, refused = _parse(data)
    if refused:
        outside = dict(document) if isinstance(document, dict) else document
        if isinstance(outside, dict) and isinstance(outside.get("batch"), list):
            outside["batch"] = []
        problem = refused_in(outside)
        if problem is not None:
            raise Problem(400, problem.code, problem.message)
    return document, bool(refused)


def refused_in(value: Any) -> Refused | None:
    """The first ``Refused`` inside ``value``, at any depth, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Refused):
            return item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _parse(data: bytes) -> tuple[Any, list[Refused]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, "invalid_utf8",
                      f"the body is not valid UTF-8 (at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is harmless; json.loads refuses it
    refused: list[Refused] = []

    def refuse(code: str, message: str) -> Refused:
        refused.append(Refused(code, message))
        return refused[-1]

    def constant(name: str) -> Any:
        return refuse("invalid_json", f"{name} is not valid JSON (numbers must be finite)")

    def finite_float(text: str) -> Any:
        number = float(text)
        if not math.isfinite(number):
            return refuse("invalid_json", "a number in the body is too large for a double")
        return number

    def unique_keys(pairs: list[tuple[str, Any]]) -> Any:
        result = dict(pairs)
        if len(result) != len(pairs):
            duplicate = _first_repeated(key for key, _ in pairs)
            return refuse("duplicate_key", f"an object has the key {_short(duplicate)!r} "
                          "more than once")
        return result

    try:
        return json.loads(text, parse_constant=constant, parse_float=finite_float,
                          object_pairs_hook=unique_keys), refused
    except RecursionError:
        raise Problem(400, "too_deep", "the JSON nests too deeply to read (an event may nest "
                      f"{MAX_DEPTH} levels at most)") from None
    except json.JSONDecodeError as exc:
        raise Problem(400, "invalid_json", f"malformed JSON: {exc.msg} "
                      f"(line {exc.lineno}, column {exc.colno})") from None
    except ValueError:  # an integer of thousands of digits (int_max_str_digits)
        raise Problem(400, "invalid_json", "a number in the body is too large") from None


def _first_repeated(keys: Iterable[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return ""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one event is refused before routing; ``too_large`` makes a single call a 413."""

    reason: str
    too_large: bool = False


BATCH_FIELDS_ALLOWANCE = 1024
"""How far a batch's own ``sentAt``, ``context`` and ``integrations``, merged into an event at
the size limit, may take it over: a ``sentAt`` is about 40 bytes, a library's context a few
hundred."""


def check_event(event: Any, *, max_bytes: int = MAX_EVENT_BYTES, sent: Any = None
                ) -> Rejection | int:
    """Why ``event`` may not be routed, or, when it may, the size the 32 KB limit applies to
    (which the router then takes as measured instead of serializing the event again).

    ``sent`` is the event as the client sent it in a batch, before the batch's ``sentAt``
    and ``context`` were merged in: the size limit holds for that, as Segment applies it and
    as client libraries measure their events (every one of them puts ``sentAt`` on the
    batch, so an event at the limit would go over it only here). What the merge adds may
    take it over the limit by ``BATCH_FIELDS_ALLOWANCE`` at most: a large batch ``context``
    would otherwise be stored again with every event of the batch."""
    if not isinstance(event, dict):
        return Rejection("an event must be a JSON object")
    try:
        data = orjson.dumps(event)
    except TypeError as exc:
        return Rejection(_unencodable(str(exc)))
    # The serialized bytes rule out the common case cheaply: no escaped NUL, and fewer
    # brackets than the depth limit. Only an event that fails either is walked.
    if b"\\u0000" in data or data.count(b"{") + data.count(b"[") > MAX_DEPTH:
        reason = structure_problem(event)
        if reason is not None:
            return Rejection(reason)
    size = len(data)
    if max_bytes < size <= max_bytes + BATCH_FIELDS_ALLOWANCE and sent is not None \
            and sent is not event:
        size = len(orjson.dumps(sent))  # measured again only for the rare event over the limit
    if size > max_bytes:
        return Rejection(f"the event is {size} bytes, over the {max_bytes // 1024} KB limit",
                         too_large=True)
    return size


def structure_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> str | None:
    """Nesting deeper than ``max_depth`` or a NUL character in a key or string, else None.

    Iterative, so that depth itself cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str) and "\x00" in key or isinstance(child, str) and "\x00" in child:
                return "contains a NUL character (\\u0000), which destinations cannot store"
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return None


def _unencodable(message: str) -> str:
    if "surrogate" in message:
        return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair)"
    if "Integer" in message:
        return "an integer is outside the 64-bit range"
    if "Recursion" in message:
        return f"nested deeper than {MAX_DEPTH} levels"
    return "the event cannot be encoded as JSON"


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
