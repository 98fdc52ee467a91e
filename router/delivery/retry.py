"""The retry policy's pure rules: what a response means by its status, how long one event
waits before its next attempt, when it gives up, and how long a destination rests.

Pure functions with the clock and the random source passed in, so they are tested exactly.
Not every decision lives here: when a whole destination pauses or rests (after
``FAILURES_BEFORE_PAUSE`` failures, a ``Retry-After`` on every event, a spent rate-limit
budget, a 429 without a wait), which users are held back, and which refusals split a batch
(``SPLIT_STATUSES``) are decided by the delivery worker (``sending``: ``_judge``; ``health``:
``_note_health``, ``_rest_after_throttle``, ``_hold_back_throttled_users``), with the
durations from here; and the transport sends a request once more itself after the
keep-alive race (``transport.RESEND_WITHIN``), without spending an attempt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from router.destination import DeliveryDefaults, Outcome
from router.errors import PermanentError, RetryableError
from router.redaction import cut_at_first_url

MAX_RETRY_AFTER = 15 * 60.0
"""A ``Retry-After`` beyond this is capped: an API asking for a day is not trusted to mean it,
and the event's own ``max_age`` decides when to give up."""

MAX_DESTINATION_REST = 30.0
"""The longest a destination that keeps failing rests before it is tried again, whatever its
``backoff_max`` (which still bounds each event's own wait). A probe every 30 s costs a down
API a few requests; resting up to ``backoff_max`` (5 min by default) left a destination
that had come back idle for minutes, and with its backlog filling the storage, intake
refused every event meanwhile (100 s in a soak with a full Redis)."""

API_MESSAGE_SHOWN = 200
"""Characters of an API's own error message shown after the status in a failure's reason."""
API_MESSAGE_READ = 16 * 1024
"""A JSON body longer than this is not parsed for its message (the dead letter keeps it)."""
_MESSAGE_KEYS = ("message", "error_description", "error", "detail", "errors", "title")

MAX_LOCATION_SHOWN = 200
"""Characters of a redirect's ``Location`` read for its reason, which shows only its scheme
and host: enough to see where the destination moved."""

# Vendor rate-limit headers that say when to come back, in seconds (Braze, others).
_RETRY_AFTER_HEADERS = ("retry-after", "x-ratelimit-retry-after", "x-rate-limit-retry-after")


def classify_status(status: int, headers: Mapping[str, str], retry_on: frozenset[int],
                    *, now: float, body: bytes = b"",
                    mask: Callable[[str], str] | None = None) -> Outcome:
    """The default judgement of a response by its status: 2xx delivered, ``retry_on``
    retried (no sooner than ``Retry-After``), anything else permanent. The reason carries
    the API's own message when its body has one (``HTTP 400: Invalid API key``): "HTTP 400"
    alone told an operator reading `router dlq list` nothing (router chaining audit).
    ``mask`` hides the secrets in it, before it is cut (a secret cut short is no longer
    found)."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400 and status not in retry_on:
        return PermanentError(f"HTTP {status}{_redirected_to(headers.get('location'))}: "
                              "redirects are not followed")
    said = what_the_api_said(body, mask=mask)
    reason = f"HTTP {status}: {said}" if said else f"HTTP {status}"
    if status in retry_on:
        return RetryableError(reason, retry_after=retry_after(headers, now=now))
    return PermanentError(reason)


def what_the_api_said(body: bytes, *, mask: Callable[[str], str] | None = None
                      ) -> str | None:
    """The message of a JSON error answer (``{"error": "..."}``, ``{"message": "..."}``,
    ``{"error": {"message": "..."}}``, ``{"errors": [{"detail": "..."}]}``, ...): masked
    with ``mask``, then on one line of printable characters (no terminal escapes reach
    `router dlq list`), cut to ``API_MESSAGE_SHOWN``. None for any other body."""
    if not body or len(body) > API_MESSAGE_READ or not body.lstrip().startswith(b"{"):
        return None
    try:
        found: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for _ in range(3):  # {"error": {"message": ...}}, {"errors": [{"detail": ...}]}
        if isinstance(found, list):
            found = found[0] if found else None
        if isinstance(found, dict):
            found = next((found[key] for key in _MESSAGE_KEYS if found.get(key)), None)
        if isinstance(found, str):
            masked = mask(found) if mask is not None else found
            message = " ".join("".join(character if character.isprintable() else " "
                                       for character in masked).split())
            if len(message) > API_MESSAGE_SHOWN:
                message = message[:API_MESSAGE_SHOWN] + "…"
            return message or None
    return None


def _redirected_to(location: str | None) -> str:
    if not location:
        return ""
    location = location[:MAX_LOCATION_SHOWN].strip()
    if location.startswith("//"):  # another host, the same scheme
        return f" (to {cut_at_first_url('http:' + location).removeprefix('http:')})"
    if "://" not in location:
        return " (to a location on the same host)"
    return f" (to {cut_at_first_url(location)})"


def retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds to wait from ``Retry-After`` (delta-seconds or an HTTP-date) or a vendor's
    equivalent header; None when there is none or it cannot be read. An HTTP-date is a
    moment on the server's clock, so it is measured from the response's ``Date`` when there
    is one: ours may be an hour off (a 15-minute pause, or none at all)."""
    lowered = _case_insensitive(headers)
    for name in _RETRY_AFTER_HEADERS:
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            moment = _http_date(value)
            if moment is None:
                continue
            server_now = _http_date(lowered.get("date", ""))
            seconds = moment - (now if server_now is None else server_now)
        if not math.isfinite(seconds):  # "nan" would slip past every comparison
            continue
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


_REMAINING_HEADERS = ("x-ratelimit-remaining", "x-rate-limit-remaining", "ratelimit-remaining")
_RESET_HEADERS = ("x-ratelimit-reset", "x-rate-limit-reset", "ratelimit-reset")
EPOCH_RESET_AFTER = 1e9
"""A reset above this is a moment (epoch seconds, as Braze's and GitHub's are), not a
number of seconds from now (as the IETF draft's ``RateLimit-Reset`` is)."""


def budget_spent(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds until the API's rate-limit window resets, when its answer says no request
    of the window is left (``X-RateLimit-Remaining: 0``, on a success too, as Braze sends
    it); None otherwise. Sent on, the next requests of the window would only be refused.
    A moment is measured from the response's ``Date``, as a ``Retry-After`` date is."""
    lowered = _case_insensitive(headers)
    remaining = _first_of(lowered, _REMAINING_HEADERS)
    if remaining is None or remaining.strip() != "0":
        return None
    reset = _first_of(lowered, _RESET_HEADERS)
    if reset is None:
        return None
    try:
        seconds = float(reset)
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    if seconds > EPOCH_RESET_AFTER:
        server_now = _http_date(lowered.get("date", ""))
        seconds -= now if server_now is None else server_now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _first_of(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The value of the first of ``names`` that ``headers`` has (asked of every answer: a
    loop, not a generator)."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def _case_insensitive(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` to look up by lower-case names: aiohttp's answers are already (every
    response is looked at, so they are not copied); a plain dict is copied lower-cased."""
    if isinstance(headers, (CIMultiDictProxy, CIMultiDict)):
        return headers
    return {name.lower(): value for name, value in headers.items()}


def _http_date(text: str) -> float | None:
    """An HTTP-date as a timestamp (UTC when it names no zone); None when it is not one, or
    when its zone overflows (``+99999999999``)."""
    try:
        moment = parsedate_to_datetime(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (TypeError, ValueError, OverflowError):
        return None


def backoff(attempt: int, delivery: DeliveryDefaults, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS's "full jitter"): a random wait between 0
    and ``initial * 2^(attempt-1)``, capped, so retries of many events spread out."""
    ceiling = min(delivery.backoff_max, delivery.backoff_initial * 2 ** min(attempt - 1, 30))
    return rng.uniform(0, ceiling)


def destination_pause(failures_in_a_row: int, delivery: DeliveryDefaults,
                      rng: random.Random) -> float:
    """How long a destination rests after failing ``failures_in_a_row`` batches: exponential
    with "equal jitter" (at least half the step), so a dead destination is probed ever
    more rarely, up to ``backoff_max`` or ``MAX_DESTINATION_REST``, whichever is shorter,
    and at once again after its first success."""
    step = min(delivery.backoff_max, MAX_DESTINATION_REST,
               delivery.backoff_initial * 2 ** min(failures_in_a_row - 1, 30))
    return step / 2 + rng.uniform(0, step / 2)


def next_attempt_at(attempt: int, error: RetryableError, delivery: DeliveryDefaults, *,
                    now: float, rng: random.Random) -> float:
    """When to try again: the backoff, but never before the server's ``Retry-After``."""
    wait = backoff(attempt, delivery, rng)
    if error.retry_after is not None:
        wait = max(wait, min(error.retry_after, MAX_RETRY_AFTER))
    return now + wait


def exhausted(attempts: int, age_at_next: float, delivery: DeliveryDefaults) -> str | None:
    """Why to give up instead of retrying, or None: the attempts are used up, or the event
    would be older than its maximum age at the next attempt."""
    if attempts >= delivery.max_attempts:
        return f"gave up after {attempts} attempts"
    if age_at_next > delivery.max_age:
        return too_old(delivery, "the next attempt")
    return None


def too_old(delivery: DeliveryDefaults, before: str) -> str:
    """Why a job gave up for its age, ``before`` what."""
    return (f"gave up: older than the maximum age ({shown_duration(delivery.max_age)}) "
            f"before {before}")


def shown_duration(seconds: float) -> str:
    """``4 h``, ``30 min``, ``90 s``: a duration as a reason shows it."""
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
