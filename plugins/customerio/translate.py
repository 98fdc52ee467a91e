"""Events as Customer.io Track API v2 batch items: pure functions, one per call type.

Every item is one entry of ``POST /api/v2/batch``'s ``batch`` array: ``{"type": "person" |
"object", "action": ..., "identifiers": {...}, ...}`` (Customer.io "Track v2 API" reference).
The limits checked here are Customer.io's "Track API limits", as RudderStack's customerio
README restates them: they are checked before sending because a refused item only shows up
later as one line of a 207 answer.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from datetime import datetime, UTC
from typing import Any

import orjson

from router import Event, EventRejected, SkipEvent
from router.semantics import DEVICE_CREATED_OR_UPDATED, DEVICE_DELETED, semantic_action

MAX_ITEM_BYTES = 32 * 1024
"""Each item of a v2 batch must be 32 KB or smaller (Track v2 API, ``/api/v2/batch``)."""
MAX_EVENT_NAME_BYTES = 100
MAX_ID_BYTES = 150
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000

# A simple shape test, as Segment's customerio destination does (AD ``utils.ts``): an id that
# looks like an address names the person by ``email``, not by ``id``.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$", re.IGNORECASE)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = [first + second for first in _CROCKFORD for second in _CROCKFORD]
"""Every ten-bit value as its two Crockford base32 characters."""
_PAIR_SHIFTS = range(120, -1, -10)
"""A ULID's 26 characters are 130 bits: 13 pairs, the highest first."""
_CREATED_AT_TRAITS = ("createdAt", "created_at")
# The ISO-8601 shapes Segment's Customer.io destination converts (AD ``utils.ts`` isIsoDate, after
# segmentio/isostring): a date, optionally a time to the minute, seconds, up to 6 decimals and an
# offset. Anything looser ("2024", "10/03/2024", "2024-01-02T10") stays text.
_ISO_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?(\.\d{1,6})?(Z|[+-]\d{2}:?\d{2})?)?")


# --- identity ---------------------------------------------------------------------------------

def person_identifiers(user_id: str, *, field: str = "userId") -> dict[str, str]:
    """How Customer.io names a known person: ``cio_…`` is its own immutable id, an address
    is an ``email``, anything else an ``id`` (AD ``customerio/utils.ts`` resolveIdentifiers)."""
    if user_id.startswith("cio_"):
        return {"cio_id": user_id[len("cio_"):]}
    if _EMAIL.match(user_id):
        return {"email": user_id}
    check_bytes(user_id, MAX_ID_BYTES, field, "a person's id")
    return {"id": user_id}


def event_identifiers(event: Event) -> dict[str, str]:
    """The person an event/page/screen belongs to: the known person, else the anonymous id.

    Anonymous activity carries ``identifiers.anonymous_id``; it is merged into the person who
    is later identified with the same ``anonymous_id`` attribute (Customer.io "Anonymous
    events"; AD and RudderStack's v2 builders send it this way)."""
    if event.userId:
        return person_identifiers(event.userId)
    return {"anonymous_id": event.anonymousId or ""}


def dedup_id(message_id: str) -> str:
    """The event ``id`` Customer.io deduplicates on, from the messageId alone.

    The v2 reference asks for "a valid ULID". A messageId that already is one is kept; any
    other is hashed into one (128 bits of SHA-256 in ULID's Crockford base32), so a retried
    or replayed event always carries the same id while its timestamp may differ.
    """
    if _ULID.match(message_id):
        return message_id.upper()
    number = int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:16], "big")
    # Two characters (ten bits) a step, from a table: half the steps of one at a time, and a
    # list, which join takes as it is, rather than a generator.
    return "".join([_CROCKFORD_PAIRS[(number >> shift) & 1023] for shift in _PAIR_SHIFTS])


def unix_seconds(moment: datetime) -> int:
    """Customer.io takes timestamps as whole Unix seconds (AD ``utils.ts`` converts them)."""
    return int(moment.astimezone(UTC).timestamp())


def unix_timestamps(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` with every ISO-8601 date string as whole Unix seconds, in nested objects
    too (not in arrays), as Segment's Customer.io destination sends them ("Convert
    timestamps", on by default): Customer.io's segments and Liquid compare dates as numbers,
    and a date sent as text is only ever text to them. ``anonymous_id`` is an identifier, never
    a date, so it is kept as it is."""
    converted: dict[str, Any] = {}
    for name, value in attributes.items():
        if isinstance(value, str):
            value = _iso_as_unix_seconds(value) if name != "anonymous_id" else value
        elif isinstance(value, dict):
            value = unix_timestamps(value)
        converted[name] = value
    return converted


def _iso_as_unix_seconds(text: str) -> str | int:
    if not (len(text) >= 10 and text[4] == "-" and _ISO_DATE.fullmatch(text)):
        return text
    try:
        moment = datetime.fromisoformat(text)
        return unix_seconds(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    # Shaped like a date but not one ("2024-02-30"), or within hours of year 1 or 9999 (.NET's
    # DateTime.MinValue), which Unix seconds cannot hold: kept as the text it is.
    except (ValueError, OverflowError):
        return text


# --- limits -----------------------------------------------------------------------------------

def check_bytes(value: str, limit: int, field: str, what: str) -> None:
    """Reject the event when ``value`` is longer than Customer.io accepts."""
    size = len(value.encode())
    if size > limit:
        raise EventRejected(f"{field}: {what} is {size} bytes; Customer.io accepts at most "
                            f"{limit}")


def check_attributes(attributes: Mapping[str, Any], field: str) -> None:
    """Attribute names ≤150 bytes and values ≤1000 bytes (a string by its UTF-8 bytes, any
    other value by its JSON encoding): Customer.io's limits for person and object attributes."""
    for name, value in attributes.items():
        check_bytes(name, MAX_ATTRIBUTE_NAME_BYTES, f"{field}.{name}", "the attribute name")
        encoded = value.encode() if isinstance(value, str) else orjson.dumps(value)
        if len(encoded) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise EventRejected(f"{field}.{name}: the attribute value is {len(encoded)} bytes; "
                                f"Customer.io accepts at most {MAX_ATTRIBUTE_VALUE_BYTES}")


def check_item_size(item: Mapping[str, Any]) -> None:
    """One batch item may not exceed 32 KB, or the whole item is refused."""
    size = len(orjson.dumps(item))
    if size > MAX_ITEM_BYTES:
        raise EventRejected(f"the Customer.io item is {size} bytes; each item of a batch may "
                            f"be at most {MAX_ITEM_BYTES}")


# --- call types -------------------------------------------------------------------------------

def identify(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """Add or update a person. With both ids, ``anonymous_id`` goes along as an attribute:
    that is how Customer.io merges the anonymous activity into this person ("Merging
    anonymous activity": pass their anonymous_id when you identify them)."""
    email = event.traits.get("email")
    if event.userId:
        identifiers = person_identifiers(event.userId)
    elif isinstance(email, str) and _EMAIL.match(email):
        identifiers = {"email": email}
    else:
        raise SkipEvent("Customer.io identifies people by id or email; this identify has only "
                        "an anonymousId (its events are merged once the person is identified)")
    attributes = person_attributes(event.traits)
    if event.anonymousId:
        attributes["anonymous_id"] = event.anonymousId
    if options.get("update_only") is True:
        # ``_update: true`` updates an existing person and never creates one (v2 identify).
        attributes["_update"] = True
    check_attributes(attributes, "traits")
    return {"type": "person", "action": "identify", "identifiers": identifiers,
            "timestamp": unix_seconds(event.timestamp), "attributes": attributes}


def person_attributes(traits: Mapping[str, Any]) -> dict[str, Any]:
    """Traits as attributes; ``createdAt`` becomes Customer.io's ``created_at`` in Unix
    seconds, the form its segments compare dates in."""
    attributes = {name: value for name, value in traits.items()
                  if name not in _CREATED_AT_TRAITS}
    for name in _CREATED_AT_TRAITS:
        if traits.get(name) is not None:
            created = traits[name]
            attributes["created_at"] = (_iso_as_unix_seconds(created)
                                        if isinstance(created, str) else created)
            break
    return attributes


def track(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """A semantic event becomes the person operation it names; any other track an event
    named as it is, with the properties (revenue, currency, products[] included) as its
    ``attributes``: Customer.io has no revenue fields of its own."""
    action = semantic_action(event)
    if action is not None:
        return person_operation(event, action)
    if event.event in (DEVICE_CREATED_OR_UPDATED, DEVICE_DELETED):
        return device_operation(event)
    name = event.event or ""
    check_bytes(name, MAX_EVENT_NAME_BYTES, "event", "the event name")
    return _event_item(event, "event", name)


def page(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """A page view, named by its URL as Customer.io's page events are (v2 ``action: page``).

    The URL is not held to the 100-byte event-name limit here: whether Customer.io applies it
    to page names is not documented, and a refusal comes back for this item alone."""
    name = _first_text(event.properties.get("url"), event.context.get("page", {}).get("url")
                       if isinstance(event.context.get("page"), dict) else None, event.name)
    if name is None:
        raise EventRejected("properties.url: Customer.io names a page view by its URL; the "
                            "page call has no url and no name")
    return _event_item(event, "page", name)


def screen(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """A mobile screen view, named by the screen's name (v2 ``action: screen``)."""
    name = _first_text(event.name, event.properties.get("name"))
    if name is None:
        raise EventRejected("name: Customer.io needs the name of the screen")
    check_bytes(name, MAX_EVENT_NAME_BYTES, "name", "the screen name")
    return _event_item(event, "screen", name)


def group(event: Event, options: Mapping[str, Any], object_type_id: str | None
          ) -> dict[str, Any]:
    """A group is a Customer.io object (of the configured object type) that the person is
    related to; an anonymous person is related with ``identify_anonymous`` (v2 objects)."""
    type_id = _object_type_id(event, options, object_type_id)
    attributes = {name: value for name, value in event.traits.items()
                  if name not in ("object_type_id", "objectTypeId")}
    check_attributes(attributes, "traits")
    check_bytes(event.groupId or "", MAX_ID_BYTES, "groupId", "the object id")
    if event.userId:
        action, member = "identify", person_identifiers(event.userId)
    else:
        action, member = "identify_anonymous", {"anonymous_id": event.anonymousId or ""}
    return {"type": "object", "action": action,
            "identifiers": {"object_type_id": type_id, "object_id": event.groupId},
            "attributes": attributes, "cio_relationships": [{"identifiers": member}]}


def alias(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """``previousId`` is merged into ``userId`` and then deleted (v2 ``action: merge``). Both
    must name people Customer.io knows: an anonymous id is merged by identify instead."""
    previous, user_id = event.previousId or "", event.userId or ""
    if previous == user_id:
        raise SkipEvent("previousId and userId are the same person; nothing to merge")
    return {"type": "person", "action": "merge",
            "primary": person_identifiers(user_id, field="userId"),
            "secondary": person_identifiers(previous, field="previousId")}


def person_operation(event: Event, action: str) -> dict[str, Any]:
    """Delete, suppress or unsuppress the person (v2 person ``delete``/``suppress``/
    ``unsuppress``). Anonymous people have no profile in Customer.io to act on."""
    if not event.userId:
        raise SkipEvent(f"{event.event}: Customer.io can {action} only an identified person; "
                        "this event has no userId")
    return {"type": "person", "action": action,
            "identifiers": person_identifiers(event.userId)}


def device_operation(event: Event) -> dict[str, Any]:
    """Register the event's push token for the person, or forget it (v2 person
    ``add_device``/``delete_device``), from ``context.device``: ``token``, and for a new
    device its ``type``, which Customer.io takes as the platform, ``ios`` or ``android``.
    The properties become the device's string ``attributes`` (``device_attributes``)."""
    if not event.userId:
        raise SkipEvent(f"{event.event}: Customer.io keeps devices of identified people only; "
                        "this event has no userId")
    device = event.context.get("device")
    device = device if isinstance(device, dict) else {}
    token = device.get("token")
    if not isinstance(token, str) or not token:
        raise EventRejected("context.device.token: Customer.io needs the device's push token")
    identifiers = person_identifiers(event.userId)
    if event.event == DEVICE_DELETED:
        return {"type": "person", "action": "delete_device", "identifiers": identifiers,
                "device": {"token": token}}
    platform = str(device.get("type") or "").lower()
    if platform not in ("ios", "android"):
        raise EventRejected("context.device.type: Customer.io takes devices of platform ios "
                            "or android")
    added: dict[str, Any] = {"token": token, "platform": platform,
                             "last_used": unix_seconds(event.timestamp)}
    attributes = device_attributes(event.properties)
    if attributes:
        check_attributes(attributes, "properties")
        added["attributes"] = attributes
    return {"type": "person", "action": "add_device", "identifiers": identifiers,
            "device": added}


def device_attributes(properties: Mapping[str, Any]) -> dict[str, str]:
    """The event's properties as device attributes, which Customer.io takes as strings
    (Track API ``device_object_common.attributes``: every attribute, custom ones included, is
    a string, and ``push_enabled`` is ``"true"`` or ``"false"``).

    A boolean becomes ``"true"``/``"false"``, a number its JSON text (``3`` → ``"3"``, ``1.5`` →
    ``"1.5"``), a string stays as it is; a null is left out. An object or array has no string
    form Customer.io documents, so it makes the event invalid rather than being flattened or
    dropped silently."""
    found: dict[str, str] = {}
    for name, value in properties.items():
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        if isinstance(value, (dict, list, tuple)):
            kind = "an object" if isinstance(value, dict) else "an array"
            raise EventRejected(f"properties.{name}: Customer.io takes device attributes as "
                                f"strings only; this one is {kind}")
        found[name] = _device_text(value)
    return found


def _device_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return orjson.dumps(value).decode()  # JSON text: 1.5 → "1.5", 1e20 → "1e+20"
    return str(value)  # an int (of any size), or whatever else a property holds


def _event_item(event: Event, action: str, name: str) -> dict[str, Any]:
    return {"type": "person", "action": action, "identifiers": event_identifiers(event),
            "name": name, "id": dedup_id(event.messageId),
            "timestamp": unix_seconds(event.timestamp), "attributes": dict(event.properties)}


def _object_type_id(event: Event, options: Mapping[str, Any], configured: str | None) -> str:
    """The object type: per-event option, then the group's traits, then the setting."""
    for field, value in (("options.object_type_id", options.get("object_type_id")),
                         ("traits.object_type_id", event.traits.get("object_type_id")),
                         ("traits.objectTypeId", event.traits.get("objectTypeId"))):
        if value is not None:
            text = str(value)
            if not (text.isascii() and text.isdigit()):
                raise EventRejected(f"{field}: Customer.io object type ids are whole numbers "
                                    "as strings, such as \"1\"")
            return text
    if configured is None:
        raise SkipEvent("group calls are off: `object_type_id` is not set, and the event "
                        "names no object type")
    return configured


def _first_text(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value.strip():
            return value
    return None
