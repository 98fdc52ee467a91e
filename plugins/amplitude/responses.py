"""What Amplitude's answers mean per event.

The HTTP V2 and Batch APIs refuse a whole request when some of its events are bad (400) or
some of its users or devices are throttled (429), and say which ones by their index in the
request ("HTTP V2 API": Response format). Amplitude's advice ("Batch and retry HTTP V2 API
requests") is to drop the events it names and send the rest again; throttled users and
devices wait 30 s. Amplitude's own Python SDK does the same (``ResponseProcessor``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from router import HttpResponse, Outcome, Payload, PermanentError, RetryableError

THROTTLE_PAUSE = 30.0
"""Seconds to leave a throttled user or device alone ("pause sending events for that user or
device for a period of 30 seconds before retrying")."""

MAX_DELETION_USERS = 100
"""User Privacy API: at most 100 user ids per deletion request."""

# Per-field maps of a 400: field name → indexes of the events it was wrong in.
_FIELD_PROBLEMS = (("events_with_invalid_fields", "invalid {field}"),
                   ("events_with_missing_fields", "missing {field}"),
                   ("events_with_invalid_id_lengths", "{field} too short"))
_RESENT = "not ingested: Amplitude refused the whole request because of other events in it"


def event_outcomes(payloads: Sequence[Payload], response: HttpResponse
                   ) -> list[Outcome] | None:
    """One outcome per event for a 400 or 429 that names events, users or devices; None
    (judge by status) otherwise, e.g. an invalid API key or a missing request field, which
    fail every event alike."""
    body = response.json()
    if not isinstance(body, dict):
        return None
    events = [payload.body for payload in payloads]
    if response.status == 400:
        return _bad_request(events, body)
    if response.status == 429:
        return _throttled(events, body)
    return None


def _bad_request(events: list[dict[str, Any]], body: dict[str, Any]) -> list[Outcome] | None:
    problems: dict[int, list[str]] = {}
    for key, template in _FIELD_PROBLEMS:
        by_field = body.get(key)
        if isinstance(by_field, dict):
            for name, indexes in by_field.items():
                for index in _indexes(indexes, len(events)):
                    problems.setdefault(index, []).append(template.format(field=name))
    silenced = set(_indexes(body.get("silenced_events"), len(events)))
    silenced_devices = _names(body.get("silenced_devices"))
    silenced.update(index for index, event in enumerate(events)
                    if event.get("device_id") in silenced_devices)
    throttled = set(_indexes(body.get("throttled_events"), len(events)))
    if not (problems or silenced or throttled):
        return None
    outcomes: list[Outcome] = []
    for index in range(len(events)):
        if index in problems:
            outcomes.append(PermanentError(
                "Amplitude refused the event: " + ", ".join(problems[index])))
        elif index in silenced:
            outcomes.append(PermanentError("Amplitude silenced the event's device_id (it sent "
                                           "too many events) and drops its events"))
        elif index in throttled:
            outcomes.append(RetryableError("Amplitude throttled the event's user or device",
                                           retry_after=THROTTLE_PAUSE,
                                           pause_destination=False))
        else:
            outcomes.append(RetryableError(_RESENT, caused_by_others=True))
    return outcomes


def _throttled(events: list[dict[str, Any]], body: dict[str, Any]) -> list[Outcome] | None:
    """Only the throttled users' and devices' events wait 30 s; the others were refused with
    them and go again at once, uncounted (``caused_by_others``; the core holds back the
    throttled users' other events meanwhile). Those over their daily quota will not pass
    today."""
    indexes = set(_indexes(body.get("throttled_events"), len(events)))
    users, devices = _names(body.get("throttled_users")), _names(body.get("throttled_devices"))
    quota_users = _names(body.get("exceeded_daily_quota_users"))
    quota_devices = _names(body.get("exceeded_daily_quota_devices"))
    throttled = [index in indexes or event.get("user_id") in users
                 or event.get("device_id") in devices for index, event in enumerate(events)]
    if not any(throttled):
        return None
    outcomes: list[Outcome] = []
    for event, is_throttled in zip(events, throttled):
        if not is_throttled:
            outcomes.append(RetryableError(_RESENT, caused_by_others=True))
        elif event.get("user_id") in quota_users or event.get("device_id") in quota_devices:
            outcomes.append(PermanentError("the event's user or device is over Amplitude's "
                                           "daily event quota"))
        else:
            outcomes.append(RetryableError("Amplitude throttled the event's user or device "
                                           "(over its events per second)",
                                           retry_after=THROTTLE_PAUSE,
                                           pause_destination=False))
    return outcomes


def deletion_outcomes(payloads: Sequence[Payload], response: HttpResponse,
                      retry_on: frozenset[int]) -> list[Outcome] | None:
    """A deletion request carries at most 100 users; the rest of a bigger batch was not sent
    and waits for a later request (see ``Amplitude.build_request``), whatever the answer to
    the first 100 was. ``retry_on`` judges a failed answer for the ones sent."""
    if len(payloads) <= MAX_DELETION_USERS:
        return None
    sent: Outcome = None
    if not 200 <= response.status < 300:
        reason = f"HTTP {response.status} from the User Privacy API"
        # The answer's Retry-After, in either form, is the core's to read.
        sent = RetryableError(reason) if response.status in retry_on else PermanentError(reason)
    return [sent] * MAX_DELETION_USERS + [
        RetryableError("not sent yet: Amplitude deletes at most 100 users per request",
                       retry_after=1.0)] * (len(payloads) - MAX_DELETION_USERS)


def _indexes(value: Any, count: int) -> Iterable[int]:
    """Valid event indexes from a list Amplitude returned (anything else is ignored)."""
    if not isinstance(value, list):
        return ()
    return (item for item in value
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < count)


def _names(value: Any) -> frozenset[str]:
    """Ids from a map of id → rate, or a list of ids (Amplitude uses both shapes)."""
    if isinstance(value, dict):
        return frozenset(key for key in value if isinstance(key, str))
    if isinstance(value, list):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()
