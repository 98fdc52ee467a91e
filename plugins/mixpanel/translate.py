"""Segment-spec events as Mixpanel data: ``/import`` events, ``/engage`` profile updates and
``/groups`` group-profile updates.

Pure functions of the event and a few settings. Bodies carry no credentials: the project token
that ``/engage`` and ``/groups`` need is added by ``build_request``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from typing import Any, Literal

from router import Event, EventRejected
from router.semantics import products

IdentityMerge = Literal["simplified", "original"]

# Mixpanel's documented limits ("Import Events", "Events FAQ", "Data Types").
MAX_PROPERTIES = 255
MAX_STRING = 255
"""Bytes of UTF-8 in a string value."""
MAX_EVENT_NAME = 255
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
MAX_FUTURE = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
"""Made once: ``timedelta()`` with a keyword costs more than the division it serves."""

# Values /import rejects as distinct_id or $insert_id because they usually mean a bug
# (Mixpanel "400 Bad Request" troubleshooting page; the list there says "including").
PLACEHOLDER_IDS = frozenset({"anon", "anonymous", "nil", "none", "null", "n/a",
                             "00000000-0000-0000-0000-000000000000"})

# $insert_id: at most 36 characters, letters, digits and dashes (Mixpanel "Import Events").
_INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
# Fixed, so the derived ids are the same in every process and release.
_INSERT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "event-router:mixpanel:$insert_id")

# Segment trait → Mixpanel reserved profile property (Mixpanel "User Profiles").
PROFILE_TRAITS = {
    "email": "$email", "name": "$name", "firstName": "$first_name",
    "first_name": "$first_name", "lastName": "$last_name", "last_name": "$last_name",
    "phone": "$phone", "avatar": "$avatar", "createdAt": "$created", "created_at": "$created",
}

# Segment context → Mixpanel default properties that its reports know.
_CAMPAIGN_PROPERTIES = {"source": "utm_source", "medium": "utm_medium", "name": "utm_campaign",
                        "term": "utm_term", "content": "utm_content"}
_DEVICE_PROPERTIES = (("os", "name", "$os"), ("app", "version", "$app_version_string"),
                      ("device", "model", "$model"), ("device", "manufacturer", "$manufacturer"),
                      ("screen", "width", "$screen_width"), ("screen", "height", "$screen_height"))
_DEVICE_SECTIONS = frozenset(section for section, _, _ in _DEVICE_PROPERTIES)


@dataclass(slots=True)
class Identity:
    """Who an event is about, as Mixpanel names them. Not frozen, though nothing changes it:
    a frozen dataclass pays an ``object.__setattr__`` call a field to be built, and one is
    built for every event."""

    distinct_id: str
    properties: dict[str, str]
    """``$user_id`` / ``$device_id`` on Simplified ID Merge; empty on Original."""


def identity(event: Event, merge: IdentityMerge) -> Identity:
    """The distinct_id and id properties of an event.

    Simplified ID Merge derives the distinct_id from ``$user_id`` and ``$device_id`` and merges
    the two whenever an event carries both; anonymous events use ``$device:<id>`` as the SDKs
    do (Mixpanel "Identifying Users (Simplified)"). Original ID Merge uses the ids as they are
    and merges through ``$identify`` events only.
    """
    # Read once: an event's fields are pydantic attributes, slower to read than locals.
    user_id, anonymous_id = event.userId, event.anonymousId
    for field, value in (("userId", user_id), ("anonymousId", anonymous_id)):
        if value is not None and value.strip().lower() in PLACEHOLDER_IDS:
            raise EventRejected(f"{field} is a placeholder value (such as 'null' or "
                                "'anonymous') that Mixpanel rejects as a distinct_id")
    if merge == "original":
        return Identity(user_id or anonymous_id or "", {})
    properties = {}
    if user_id:
        properties["$user_id"] = user_id
    if anonymous_id:
        properties["$device_id"] = anonymous_id
    return Identity(user_id or f"$device:{anonymous_id}", properties)


def insert_id(message_id: str, part: str = "") -> str:
    """The ``$insert_id`` Mixpanel deduplicates on, from the messageId alone.

    The messageId itself when it fits the format; otherwise (and for the extra events one
    message makes, named by ``part``) a UUIDv5 of it, which is 36 characters of hex and dashes.
    """
    if not part and _INSERT_ID.fullmatch(message_id) \
            and message_id.lower() not in PLACEHOLDER_IDS:
        return message_id
    return str(uuid.uuid5(_INSERT_ID_NAMESPACE, f"{message_id}\x00{part}"))


def event_time(event: Event) -> int:
    """Milliseconds since the epoch, or ``EventRejected`` where /import would refuse the time.

    "More than 1 h in the future" is measured against the router's receive time, so the
    answer does not depend on when the event is translated.
    """
    timestamp = event.timestamp
    if timestamp < EARLIEST:
        raise EventRejected("timestamp is before 1971-01-01; Mixpanel rejects such events")
    if timestamp - event.receivedAt > MAX_FUTURE:
        raise EventRejected("timestamp is more than 1 hour after the router received the "
                            "event; Mixpanel rejects events over 1 h in the future")
    return (timestamp - EPOCH) // _MILLISECOND


def mixpanel_values(value: Any) -> Any:
    """Property values as Mixpanel reads them, at any depth: strings cut to 255 bytes of
    UTF-8 (Mixpanel keeps no more, and cutting here, between characters, keeps batches
    small and the stored value predictable), and ISO-8601 date-times in Mixpanel's own date form,
    ``YYYY-MM-DDTHH:MM:SS`` in UTC ("Supported Properties Data Type"): a time with an
    offset (``+01:00``) or fractional seconds is not read as a date, or not in UTC."""
    if isinstance(value, str):
        return _text(value)
    # Scalars inline: a call for each of them would cost more than the rest; only a string
    # shaped like a date-time (a "T" after the date), or long enough to be over 255 bytes,
    # takes a call (UTF-8 takes at most 4 bytes a character).
    if isinstance(value, dict):
        return {key: (item if len(item) < 16 or (len(item) <= MAX_STRING // 4
                                                 and item[10] != "T") else _text(item))
                if isinstance(item, str) else
                mixpanel_values(item) if isinstance(item, (dict, list)) else item
                for key, item in value.items()}
    if isinstance(value, list):
        return [(item if len(item) < 16 or (len(item) <= MAX_STRING // 4
                                            and item[10] != "T") else _text(item))
                if isinstance(item, str) else
                mixpanel_values(item) if isinstance(item, (dict, list)) else item
                for item in value]
    return value


def _cut(text: str) -> str:
    """At most 255 bytes of UTF-8, ending between characters: Mixpanel's limit is in bytes
    ("Supported Data Types"), and 255 characters of Cyrillic or emoji, cut here before,
    were two to four times over it, for Mixpanel to cut anywhere (data fidelity audit)."""
    if len(text) <= MAX_STRING // 4:
        return text
    encoded = text.encode()
    if len(encoded) <= MAX_STRING:
        return text
    return encoded[:MAX_STRING].decode(errors="ignore")


_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?")
_MIXPANEL_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def _text(text: str) -> str:
    if len(text) < 16 or text[10] != "T" or _MIXPANEL_DATE_TIME.fullmatch(text) \
            or not _DATE_TIME.fullmatch(text):
        return _cut(text)
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
    # Shaped like a date-time but not one ("2024-02-30T10:00:00Z"), or within hours of year 1
    # or 9999, where UTC cannot be written: kept as the text it is.
    except (ValueError, OverflowError):
        return text
    # Not strftime: its %Y does not pad years before 1000 ("1-01-01" for Go's zero time).
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
            f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}")


def context_section(event: Event, name: str) -> Mapping[str, Any]:
    """One object of the event's context (``page``, ``campaign``, ...), or empty."""
    section = event.context.get(name)
    return section if isinstance(section, dict) else {}


def context_properties(event: Event) -> dict[str, Any]:
    """Mixpanel default properties from the event's context (geolocation, URL, UTM, device)."""
    context = event.context
    found: dict[str, Any] = {}
    if isinstance(context.get("ip"), str):
        found["ip"] = context["ip"]  # /import geolocates from the `ip` property
    page = context.get("page")
    if isinstance(page, dict):
        if page.get("url"):
            found["$current_url"] = page["url"]
        if page.get("referrer"):
            found["$referrer"] = page["referrer"]
    campaign = context.get("campaign")
    if isinstance(campaign, dict):
        for key, name in _CAMPAIGN_PROPERTIES.items():
            if campaign.get(key):
                found[name] = campaign[key]
    # Most events (a browser's) carry none of these sections: one set test spares the
    # look-ups; when one is there, the table's order is the properties' order.
    if not _DEVICE_SECTIONS.isdisjoint(context):
        for section, key, name in _DEVICE_PROPERTIES:
            part = context.get(section)
            if isinstance(part, dict) and part.get(key) is not None:
                found[name] = part[key]
    return found


def track_name(name: str) -> str:
    """A track event's name, unless Mixpanel reserves it: ``$`` and ``mp_`` begin its own
    events, and three of them change identities (``$identify``, ``$create_alias``,
    ``$merge``), which a customer's event of that name, without their fields, would
    attempt."""
    for prefix in ("$", "mp_"):
        if name.startswith(prefix):
            raise EventRejected(f"event name {name[:40]!r} starts with {prefix!r}, which "
                                "Mixpanel reserves for its own events; rename it with the "
                                "destination's mapping.event_names")
    return name


def import_event(name: str, event: Event, properties: Mapping[str, Any], merge: IdentityMerge,
                 *, part: str = "") -> dict[str, Any]:
    """One /import event. Identity, time and ``$insert_id`` win over same-named properties."""
    if len(name) > MAX_EVENT_NAME:
        raise EventRejected(f"event name is {len(name)} characters; Mixpanel takes at most "
                            f"{MAX_EVENT_NAME}")
    who = identity(event, merge)
    merged = mixpanel_values({**context_properties(event), **properties})
    merged.update(who.properties)
    merged["distinct_id"] = who.distinct_id
    merged["time"] = event_time(event)
    merged["$insert_id"] = insert_id(event.messageId, part)
    if len(merged) > MAX_PROPERTIES:
        raise EventRejected(f"the event has {len(merged)} properties with Mixpanel's own; "
                            f"Mixpanel keeps at most {MAX_PROPERTIES} per event")
    return {"event": name, "properties": merged}


def page_event_name(event: Event, *, named: bool) -> str:
    """Segment's Mixpanel names: "Viewed {category} {name} Page" for a named page when
    ``named``, else "Loaded a Page"; screens likewise with "Screen"."""
    kind = "Screen" if event.type == "screen" else "Page"
    name = event.name or event.properties.get("name")
    if named and isinstance(name, str) and name:
        category = event.properties.get("category")
        label = f"{category} {name}" if isinstance(category, str) and category else name
        return f"Viewed {label} {kind}"
    return f"Loaded a {kind}"


def page_properties(event: Event) -> dict[str, Any]:
    """A page's own properties, with its name (and the context page's fields it lacks)."""
    page = context_section(event, "page")
    found = {key: page[key] for key in ("path", "title", "url", "referrer", "search")
             if page.get(key) is not None}
    found.update(event.properties)
    if event.name:
        found.setdefault("name", event.name)
    return found


def product_purchased(event: Event, merge: IdentityMerge) -> list[dict[str, Any]]:
    """One "Product Purchased" event per product of an order (Segment's Mixpanel
    trackPurchase), each with its own ``$insert_id``."""
    order = {key: event.properties[key] for key in ("order_id", "currency")
             if event.properties.get(key) is not None}
    return [import_event("Product Purchased", event, {**order, **product}, merge,
                         part=f"product:{index}")
            for index, product in enumerate(products(event))]


def identify_event(event: Event, merge: IdentityMerge) -> dict[str, Any]:
    """The event that merges an anonymous and a known user.

    Simplified ID Merge merges any event that carries both ``$device_id`` and ``$user_id``;
    Original ID Merge needs ``$identify`` with ``$identified_id`` and ``$anon_id`` ("Create
    Identity"). ``$identify`` serves both, as Mixpanel's own SDKs send it.
    """
    properties: dict[str, Any] = {}
    if merge == "original":
        properties = {"$identified_id": event.userId, "$anon_id": event.anonymousId}
    return import_event("$identify", event, properties, merge, part="identify")


def alias_event(event: Event) -> dict[str, Any]:
    """``$create_alias``: makes ``userId`` another name of ``previousId`` (Original ID Merge
    and the legacy system only; Mixpanel "Create Alias")."""
    return {"event": "$create_alias",
            "properties": {"distinct_id": event.previousId, "alias": event.userId,
                           "time": event_time(event), "$insert_id": insert_id(event.messageId)}}


def profile_properties(traits: Mapping[str, Any]) -> dict[str, Any]:
    """Traits with Mixpanel's reserved names where it has them ($email, $name, ...)."""
    return mixpanel_values({PROFILE_TRAITS.get(key, key): value
                           for key, value in traits.items()})


def profile_update(event: Event, merge: IdentityMerge, operation: str, value: Any
                   ) -> dict[str, Any]:
    """One /engage update of the event's user. ``$ip`` is the event's, or "0" so Mixpanel does
    not geolocate the profile at the router's own address (Mixpanel "Profile Set")."""
    update: dict[str, Any] = {"$distinct_id": identity(event, merge).distinct_id}
    ip = event.context.get("ip")
    update["$ip"] = ip if isinstance(ip, str) and ip else "0"
    update[operation] = value
    return update


def profile_delete(event: Event, merge: IdentityMerge) -> dict[str, Any]:
    """/engage ``$delete`` of the event's user; Mixpanel ignores the value ("Delete Profile")."""
    return {"$distinct_id": identity(event, merge).distinct_id, "$delete": "null",
            "$ignore_alias": False}


def group_update(event: Event, group_key: str) -> dict[str, Any]:
    """/groups ``$set`` of the group's traits (Mixpanel "Group Set Property")."""
    return {"$group_key": group_key, "$group_id": event.groupId,
            "$set": mixpanel_values(dict(event.traits))}
