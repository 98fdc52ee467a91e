"""Segment-spec events as PostHog capture events.

Pure functions of the event, its per-event options and a few settings. Bodies carry no
credentials: the project ``api_key`` is added by ``build_request``. Event shapes follow
PostHog's capture API reference ("POST-only endpoints") and its SDKs; the context mapping
follows RudderStack's PostHog destination (RT posthog/data/PHPropertiesConfig.json).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from router import Event, EventRejected, SkipEvent, format_time

PersonProfiles = Literal["always", "identified_only"]

# Fixed, so the uuid of a message is the same in every process and release.
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "event-router:posthog:uuid")
_NAMESPACE_BYTES = UUID_NAMESPACE.bytes

MAX_EVENT_BYTES = 900 * 1024
"""PostHog drops events over 1 MB (its Kafka message limit); posthog-python and RudderStack
stop at 900 KiB to leave room for what ingestion adds, and so does the router."""
MAX_DISTINCT_ID = 200
"""Capture cuts distinct ids to 200 characters; a longer one would be stored as another."""
MAX_FUTURE = timedelta(hours=23)
"""Events more than 23 h in the future get an ingestion warning and are hidden."""

# Ids PostHog refuses to merge on, since they stem from a bug (PostHog ingestion's
# isDistinctIdIllegal: case-insensitive, then exact, each also in quotes).
_ILLEGAL_ANY_CASE = frozenset({"anonymous", "guest", "distinctid", "distinct_id", "id",
                               "not_authenticated", "email", "undefined", "true", "false"})
_ILLEGAL_EXACT = frozenset({"[object Object]", "NaN", "None", "none", "null", "0",
                            "undefined"})

_PAGE_FIELDS = {"url": "$current_url", "path": "$pathname", "referrer": "$referrer"}
_CAMPAIGN = {"source": "utm_source", "medium": "utm_medium", "name": "utm_campaign",
             "term": "utm_term", "content": "utm_content"}
# By context section, in the properties' order: each section is looked up once, and its
# fields only when it is there (a browser's events carry the library alone).
_CONTEXT = (("os", (("name", "$os"), ("version", "$os_version"))),
            ("device", (("id", "$device_id"), ("manufacturer", "$device_manufacturer"),
                        ("model", "$device_model"), ("name", "$device_name"))),
            ("app", (("name", "$app_name"), ("version", "$app_version"),
                     ("build", "$app_build"), ("namespace", "$app_namespace"))),
            ("screen", (("width", "$screen_width"), ("height", "$screen_height"),
                        ("density", "$screen_density"))),
            ("network", (("carrier", "$network_carrier"),)),
            ("library", (("name", "$lib"), ("version", "$lib_version"))))


@dataclass(frozen=True)
class EventOptions:
    """Per-event options from the integrations map (``integrations: {"PostHog": {...}}``).
    Unknown keys are ignored."""

    groups: dict[str, str] = field(default_factory=dict)
    group_type: str | None = None


_NO_OPTIONS = EventOptions()
"""What an event without options gets (most do): nothing reads it to change it."""


def event_options(options: Mapping[str, Any]) -> EventOptions:
    """Validated per-event options, or ``EventRejected`` naming the bad one."""
    if not options:
        return _NO_OPTIONS
    groups = options.get("groups") or {}
    if not isinstance(groups, dict) or not all(
            isinstance(key, str) and isinstance(value, str) and value
            for key, value in groups.items()):
        raise EventRejected("integrations option groups: expected an object of group type → "
                            "group key (strings)")
    group_type = options.get("group_type")
    if group_type is not None and not (isinstance(group_type, str) and group_type):
        raise EventRejected("integrations option group_type: expected a non-empty string")
    return EventOptions(dict(groups), group_type)


def event_uuid(message_id: str) -> str:
    """PostHog's ``uuid``, which must be a valid UUID or the event is dropped: a UUIDv5 of
    the messageId, so every retry and replay of a message carries the same one.

    The same as ``str(uuid.uuid5(UUID_NAMESPACE, message_id))``, made from the SHA-1 here:
    a third of the cost, as it skips building and checking a ``uuid.UUID`` (every event
    pays it)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + message_id.encode()).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # version 5
    digest[8] = digest[8] & 0x3F | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def is_illegal_id(value: str) -> bool:
    """Whether PostHog refuses to merge persons on this id."""
    bare = value.strip()
    unquoted = bare[1:-1] if len(bare) >= 2 and bare[0] == bare[-1] and bare[0] in "'\"" \
        else bare
    return not unquoted or unquoted.lower() in _ILLEGAL_ANY_CASE or unquoted in _ILLEGAL_EXACT


def distinct_id(event: Event) -> str:
    """The person the event is about: userId, else anonymousId."""
    who = event.userId or event.anonymousId or ""
    if len(who) > MAX_DISTINCT_ID:
        raise EventRejected(f"the distinct id is {len(who)} characters; PostHog keeps only "
                            f"{MAX_DISTINCT_ID}, so it would be stored as another person")
    return who


def context_properties(event: Event) -> dict[str, Any]:
    """PostHog's default properties from the Segment context."""
    context = event.context
    found: dict[str, Any] = {}
    for section, fields in _CONTEXT:
        part = context.get(section)
        if isinstance(part, dict):
            for key, name in fields:
                value = part.get(key)
                if value is not None:
                    found[name] = value
    for key, name in (("ip", "$ip"), ("locale", "$locale"), ("timezone", "$timezone"),
                      ("userAgent", "$useragent")):
        value = context.get(key)
        if value is not None:
            found[name] = value
    page = context.get("page")
    if isinstance(page, dict):
        for key, name in _PAGE_FIELDS.items():
            value = page.get(key)
            if value:
                found[name] = value
    campaign = context.get("campaign")
    if isinstance(campaign, dict):
        for key, name in _CAMPAIGN.items():
            value = campaign.get(key)
            if value is not None:
                found[name] = value
    return found


@dataclass(slots=True)
class Builder:
    """Builds the capture event of one Segment event: identity, time, uuid and the context's
    properties are shared by every kind.

    Not frozen, though nothing changes it: a frozen dataclass pays an ``object.__setattr__``
    call a field to be built, and one is built for every event."""

    event: Event
    options: EventOptions
    person_profiles: PersonProfiles

    def capture(self, name: str, properties: Mapping[str, Any], *,
                sets_person: bool = False) -> dict[str, Any]:
        """One capture event. The event's properties win over the context's; PostHog's own
        keys (``$groups``, ``$process_person_profile``) win over both. ``sets_person`` keeps
        an anonymous event's person processing on, whatever ``person_profiles`` says: its
        whole point is the person's properties."""
        event = self.event
        timestamp = event.timestamp  # read once: a pydantic attribute, slower than a local
        if timestamp - event.receivedAt > MAX_FUTURE:
            raise EventRejected("timestamp is more than 23 hours after the router received "
                                "the event; PostHog hides such events")
        merged = {**context_properties(event), **properties}
        traits = event.context.get("traits")
        if event.type != "identify" and isinstance(traits, dict) and traits:
            merged.setdefault("$set", dict(traits))  # context traits update the person
        if "$ip" not in merged:
            # Without the user's IP, PostHog would geolocate the router's own address (its
            # server SDKs send $geoip_disable by default for the same reason).
            merged["$geoip_disable"] = True
        if self.options.groups:
            merged["$groups"] = dict(self.options.groups)
        if not event.userId and self.person_profiles == "identified_only" and not sets_person:
            merged["$process_person_profile"] = False
        return {"event": name, "distinct_id": distinct_id(event), "properties": merged,
                "timestamp": format_time(timestamp), "uuid": event_uuid(event.messageId)}


def track_name(name: str) -> str:
    """A track event's name, unless it begins with ``$``, PostHog's prefix for its own events:
    ``$identify``, ``$create_alias`` and ``$groupidentify`` merge persons and groups, which
    a customer's event of that name, without their fields, would attempt."""
    if name.startswith("$"):
        raise EventRejected(f"event name {name[:40]!r} starts with '$', which PostHog "
                            "reserves for its own events; rename it with the destination's "
                            "mapping.event_names")
    return name


def page_event(builder: Builder) -> dict[str, Any]:
    """``$pageview`` with ``$current_url``, ``$pathname`` and ``$referrer`` from the page's
    ``url``, ``path`` and ``referrer`` (else from ``context.page``); the page's own properties
    stay as they are, and its name is ``name``."""
    event = builder.event
    properties = dict(event.properties)
    for key, name in _PAGE_FIELDS.items():
        if properties.get(key):
            properties[name] = properties[key]
    if event.name:
        properties.setdefault("name", event.name)
    return builder.capture("$pageview", properties)


def screen_event(builder: Builder) -> dict[str, Any]:
    """``$screen`` with ``$screen_name``, as PostHog's mobile SDKs send it."""
    event = builder.event
    properties = dict(event.properties)
    name = event.name or properties.get("name")
    if isinstance(name, str) and name:
        properties["$screen_name"] = name
    return builder.capture("$screen", properties)


def identify_event(builder: Builder) -> dict[str, Any]:
    """``$identify`` of userId with the traits in ``$set``. With an anonymousId too,
    ``$anon_distinct_id`` makes PostHog merge the anonymous person into the user, as
    posthog-js does when a visitor logs in.

    An identify with only an anonymousId is a ``$set`` of its traits instead, PostHog's way
    to set a person's properties. ``$identify`` would mark the anonymous person identified,
    and PostHog never merges an identified person into another: the visitor's later login,
    an identify carrying this anonymousId, would then leave their anonymous activity apart."""
    event = builder.event
    if not event.userId:
        if not event.traits:
            raise SkipEvent("an identify with only an anonymousId and no traits tells PostHog "
                            "nothing (the anonymous person is merged when the user is "
                            "identified)")
        return builder.capture("$set", {"$set": dict(event.traits)}, sets_person=True)
    properties: dict[str, Any] = {"$set": dict(event.traits)}
    if event.userId and event.anonymousId and event.anonymousId != event.userId:
        for name, value in (("userId", event.userId), ("anonymousId", event.anonymousId)):
            if is_illegal_id(value):
                raise EventRejected(f"{name} {value!r} is an id PostHog refuses to merge on "
                                    "(it takes it for a bug)")
        properties["$anon_distinct_id"] = event.anonymousId
    return builder.capture("$identify", properties)


def alias_event(builder: Builder) -> dict[str, Any]:
    """``$create_alias`` sent as posthog-python's ``alias(previous_id, distinct_id)`` sends
    it: as the previous id (``distinct_id`` = previousId, also the event's own), naming the
    new one (``alias`` = userId), so the two ids become one person."""
    event = builder.event
    assert event.userId is not None and event.previousId is not None  # parse_event checks
    for name, value in (("userId", event.userId), ("previousId", event.previousId)):
        if is_illegal_id(value):
            raise EventRejected(f"{name} {value!r} is an id PostHog refuses to merge on "
                                "(it takes it for a bug)")
    body = builder.capture("$create_alias", {"distinct_id": event.previousId,
                                             "alias": event.userId})
    body["distinct_id"] = event.previousId
    return body


def group_event(builder: Builder, group_type: str) -> dict[str, Any]:
    """``$groupidentify``: ``$group_set`` of the traits on (group type, groupId), sent as the
    user so that the group call also appears in their activity; ``$groups`` ties the event
    to the group (RT posthog transform)."""
    event = builder.event
    properties = {"$group_type": group_type, "$group_key": event.groupId,
                  "$group_set": dict(event.traits)}
    body = builder.capture("$groupidentify", properties)
    body["properties"]["$groups"] = {**body["properties"].get("$groups", {}),
                                     group_type: event.groupId}
    return body
