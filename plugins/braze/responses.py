"""What Braze's answers mean per payload: objects refused inside a 2xx, and when a 429 may
be retried."""

from __future__ import annotations

from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

from router import HttpResponse, Outcome, Payload, PermanentError, RetryableError


def refused_items(payloads: Sequence[Payload], errors: list[Any]) -> list[Outcome]:
    """A 2xx with ``errors`` (201 for /users/track) accepted every object except those listed
    by array and index (``{"type", "input_array", "index"}``, Braze "API errors"). An error
    that names no object fails nothing: the others were accepted, and resending them would
    record them twice."""
    position: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for number, payload in enumerate(payloads):
        for key, items in payload.body.items():
            for _ in items:
                position[(key, seen.get(key, 0))] = number
                seen[key] = seen.get(key, 0) + 1
    outcomes: list[Outcome] = [None] * len(payloads)
    for error in errors:
        if not isinstance(error, dict):
            continue
        index = error.get("index")
        if type(index) is not int:  # a list would not hash; a bool is not a position
            continue
        refused = position.get((str(error.get("input_array")), index))
        if refused is not None:
            outcomes[refused] = PermanentError(f"Braze refused it: {error.get('type', 'invalid')}")
    return outcomes


def rate_limited(payloads: Sequence[Payload], response: HttpResponse
                 ) -> list[Outcome] | None:
    """Braze's 429 says when to come back in ``X-RateLimit-Retry-After`` (seconds), which the
    core reads itself (and pauses the whole destination); when only ``X-RateLimit-Reset`` (an
    epoch time) is there, the wait is measured from the response's ``Date``."""
    headers = {name.lower(): value for name, value in response.headers.items()}
    if "x-ratelimit-retry-after" in headers or "retry-after" in headers:
        return None
    try:
        reset = float(headers["x-ratelimit-reset"])
        now = parsedate_to_datetime(headers["date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    wait = max(reset - now, 0.0)
    return [RetryableError("HTTP 429: Braze rate limit", retry_after=wait) for _ in payloads]
