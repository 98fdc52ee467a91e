"""Segment-spec events as Amplitude HTTP V2 events.

Pure functions of the event, its per-event options and a few settings. Bodies carry no
credentials: the ``api_key`` is added by ``build_request``. Field names and rules come from
Amplitude's "HTTP V2 API" reference ("Keys for the event argument") unless noted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any

from router import Event, EventRejected
from router.semantics import ORDER_COMPLETED

DEFAULT_MIN_ID_LENGTH = 5
"""user_id and device_id need at least 5 characters unless the request's
``options.min_id_length`` says otherwise."""

# Event names Amplitude keeps for itself; $identify and $groupidentify are "predefined for
# identification and group identification", so a track call may not borrow them either.
RESERVED_EVENT_TYPES = frozenset({
    "[Amplitude] Start Session", "[Amplitude] End Session", "[Amplitude] Revenue",
    "[Amplitude] Revenue (Verified)", "[Amplitude] Revenue (Unverified)",
    "[Amplitude] Merged User", "$identify", "$groupidentify",
})
MAX_DEPTH = 40  # "Object depth may not exceed 40 layers" (event and user properties)
# `groups`: "up to 5 unique group types and 10 total group values per event. Any groups past
# that threshold aren't tracked" - silently, so the router refuses such an event instead.
MAX_GROUP_TYPES = 5
MAX_GROUP_VALUES = 10
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
"""Made once: ``timedelta()`` with a keyword costs more than the division it serves."""

PRODUCT_PURCHASED = "Product Purchased"
# Segment's campaign context → the UTM user properties Amplitude's SDKs record
# (AD amplitude/utm.ts: last touch in $set, first touch as initial_* in $setOnce).
_CAMPAIGN = {"source": "utm_source", "medium": "utm_medium", "name": "utm_campaign",
             "term": "utm_term", "content": "utm_content"}
_PAGE_FIELDS = ("path", "referrer", "search", "title", "url")
# Amplitude's device and location fields: (context section, key, Amplitude's name).
_CONTEXT_FIELDS = (
    ("app", "version", "app_version"), ("device", "type", "platform"),
    ("os", "name", "os_name"), ("os", "version", "os_version"),
    ("device", "brand", "device_brand"), ("device", "manufacturer", "device_manufacturer"),
    ("device", "model", "device_model"), ("network", "carrier", "carrier"),
    ("location", "country", "country"), ("location", "region", "region"),
    ("location", "city", "city"), ("location", "latitude", "location_lat"),
    ("location", "longitude", "location_lng"))
_CONTEXT_SECTIONS = frozenset(section for section, _, _ in _CONTEXT_FIELDS)


@dataclass(frozen=True)
class EventOptions:
    """The per-event options this destination understands, from the event's integrations
    map (``integrations: {"Amplitude": {...}}``). Unknown keys are ignored."""

    session_id: int | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    group_type: str | None = None


_NO_OPTIONS = EventOptions()
"""What an event without options gets (most do): nothing reads it to change it."""


def event_options(options: Mapping[str, Any]) -> EventOptions:
    """Validated per-event options, or ``EventRejected`` naming the bad one."""
    if not options:
        return _NO_OPTIONS
    session_id = options.get("session_id")
    if session_id is not None:
        session_id = _session_id(session_id)
    groups = options.get("groups") or {}
    if not isinstance(groups, dict) or not all(
            isinstance(key, str) and _is_group_value(value) for key, value in groups.items()):
        raise EventRejected("integrations option groups: expected an object of group type → "
                            "group name (a string or a list of strings)")
    check_groups(groups)
    group_type = options.get("group_type")
    if group_type is not None and not (isinstance(group_type, str) and group_type):
        raise EventRejected("integrations option group_type: expected a non-empty string")
    return EventOptions(session_id, dict(groups), group_type)


SECONDS_SINCE_2001 = 10**9
"""A session_id from here up to a hundred times as much is a start time in seconds (2001 to
5138), not milliseconds (which would be 1970 to 1973)."""


def _session_id(value: Any) -> int:
    """Amplitude's session_id is the session's start in ms since the epoch; -1 means none.
    Numeric strings are accepted since web clients often send the id as text."""
    digits = value.strip().removeprefix("-") if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit():  # not "²" or "١٢", which str.isdigit allows
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise EventRejected("integrations option session_id: expected the session's start "
                            "time in milliseconds since the epoch (or -1 for no session)")
    if SECONDS_SINCE_2001 <= value < SECONDS_SINCE_2001 * 100:
        return value * 1000  # a start time in seconds, which Amplitude would read as 1970
    return value


def _is_group_value(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value))


def check_groups(groups: Mapping[str, Any]) -> None:
    """Refuse what Amplitude would silently drop: over 5 group types or 10 group values."""
    values = sum(len(value) if isinstance(value, list) else 1 for value in groups.values())
    if len(groups) > MAX_GROUP_TYPES or values > MAX_GROUP_VALUES:
        raise EventRejected(f"the event names {len(groups)} group types and {values} group "
                            f"values; Amplitude tracks at most {MAX_GROUP_TYPES} types and "
                            f"{MAX_GROUP_VALUES} values per event and drops the rest silently")


def identity(event: Event, min_id_length: int) -> dict[str, str]:
    """``user_id`` from userId, ``device_id`` from anonymousId (else ``context.device.id``,
    as Segment's Amplitude destination does). An event with both makes Amplitude merge the
    anonymous device into the user; with neither id of valid length it would be refused."""
    # Each field read once: an event's fields are pydantic attributes, slower than locals.
    ids: dict[str, str] = {}
    user_id, device_id = event.userId, event.anonymousId
    if user_id:
        ids["user_id"] = user_id
    if not device_id:
        device = event.context.get("device")
        device_id = device.get("id") \
            if isinstance(device, dict) and isinstance(device.get("id"), str) else None
    if device_id:
        ids["device_id"] = device_id
    for name, value in ids.items():
        if len(value) < min_id_length:
            raise EventRejected(
                f"{name} is {len(value)} characters; Amplitude refuses ids shorter than "
                f"{min_id_length} (set `min_id_length` to allow shorter ids)")
    return ids


def event_time(event: Event) -> int:
    """Milliseconds since the epoch: Amplitude's ``time``."""
    return (event.timestamp - EPOCH) // _MILLISECOND


def insert_id(event: Event, part: str = "") -> str:
    """Amplitude's dedup key (7 days, per device_id and insert_id): the messageId itself, and
    for the extra events one message makes, the messageId and a fixed suffix."""
    return f"{event.messageId}-{part}" if part else event.messageId


def context_fields(event: Event) -> dict[str, Any]:
    """Amplitude's device and location fields from the Segment context (the mapping of
    Segment's Amplitude destination, AD amplitude/event-schema.ts)."""
    context = event.context
    found: dict[str, Any] = {}
    # Most events (a browser's) carry none of these sections: one set test then spares
    # thirteen look-ups. When one is there, the fields are read in the table's order, which
    # is the body's key order.
    if not _CONTEXT_SECTIONS.isdisjoint(context):
        for section, key, name in _CONTEXT_FIELDS:
            part = context.get(section)
            if isinstance(part, dict) and part.get(key) is not None:
                found[name] = part[key]
    library = context.get("library")
    if "platform" not in found and isinstance(library, dict) \
            and library.get("name") == "analytics.js":
        found["platform"] = "Web"  # as Segment's destination does for browser events
    if isinstance(context.get("locale"), str):
        found["language"] = context["locale"]
    if isinstance(context.get("ip"), str):
        found["ip"] = context["ip"]  # Amplitude geolocates from it
    device = context.get("device")
    # An absent device is told apart first: isinstance against the Mapping ABC costs a call
    # into abc's machinery, for every event.
    advertising_id = device.get("advertisingId") \
        if device is not None and isinstance(device, Mapping) else None
    if isinstance(advertising_id, str) and advertising_id:
        os_info = context.get("os")
        os_name = str(os_info.get("name", "")).lower() if isinstance(os_info, dict) else ""
        if os_name == "ios":
            found["idfa"] = advertising_id
        elif os_name == "android":
            found["adid"] = advertising_id
    return found


def attribution(event: Event) -> dict[str, dict[str, Any]]:
    """UTM parameters and the referrer as user properties: the last touch in ``$set``, the
    first touch as ``initial_*`` in ``$setOnce`` (AD amplitude/utm.ts, referrer.ts)."""
    last: dict[str, Any] = {}
    context = event.context
    campaign = context.get("campaign")
    if isinstance(campaign, dict):
        for key, name in _CAMPAIGN.items():
            if campaign.get(key) is not None:
                last[name] = campaign[key]
    page = context.get("page")
    if isinstance(page, dict) and page.get("referrer"):
        last["referrer"] = page["referrer"]
    if not last:
        return {}
    return {"$set": dict(last), "$setOnce": {f"initial_{key}": value
                                              for key, value in last.items()}}


def _finite_number(value: Any) -> float | int | None:
    """A number given as one: the core has already made the spec's amounts numbers, so a
    string left (a product's ``revenue``) is not one Amplitude would count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def revenue_fields(item: Mapping[str, Any]) -> dict[str, Any]:
    """Amplitude's revenue fields, which live at the event root, from an event's properties
    or one product: ``revenue``, ``price``, ``quantity``, ``productId``, ``revenueType``
    ("Purchase" unless given), as Segment's logPurchase builds them, and ``currency`` (the
    core makes it an ISO 4217 code; Amplitude converts revenue in other currencies to the
    project's). Nothing when there is no revenue.

    Amplitude counts price × quantity when it has a price, its quantity defaulting to 1, so
    ``revenue`` is that product whenever the quantity is known or no revenue is given. Its
    quantity is an integer: a fractional one would be rounded and the revenue recounted, so
    then only ``revenue`` goes, already multiplied."""
    price = _finite_number(item.get("price"))
    quantity = _finite_number(item.get("quantity"))
    revenue = _finite_number(item.get("revenue"))
    if price is not None and (quantity is not None or revenue is None):
        revenue = price * (1 if quantity is None else quantity)
    if revenue is None:
        return {}
    fields: dict[str, Any] = {"revenue": revenue}
    if quantity is None or float(quantity).is_integer():
        if price is not None:
            fields["price"] = price
        if quantity is not None:
            fields["quantity"] = int(quantity)
    product_id = item.get("productId") or item.get("product_id") or item.get("sku")
    if isinstance(product_id, (str, int)) and not isinstance(product_id, bool):
        fields["productId"] = str(product_id)
    revenue_type = item.get("revenueType") or item.get("revenue_type")
    fields["revenueType"] = revenue_type if isinstance(revenue_type, str) else "Purchase"
    if isinstance(item.get("currency"), str):
        fields["currency"] = item["currency"]
    return fields


def nests_deeper_than(value: Any, levels: int) -> bool:
    """Whether a value nests more than ``levels`` object/array levels. Only containers are
    looked into: most properties are flat, and this runs for every event."""
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    if levels < 1:
        return True
    # A loop, not any() over a generator: for the usual flat properties it makes no frame.
    for item in value:
        if isinstance(item, (dict, list)) and nests_deeper_than(item, levels - 1):
            return True
    return False


@dataclass(slots=True)
class Builder:
    """Builds the Amplitude events of one Segment event, which all share its ids, time,
    context, session and event-level groups.

    Not frozen, though nothing changes it: a frozen dataclass pays an ``object.__setattr__``
    call a field to be built, and one is built for every event."""

    event: Event
    options: EventOptions
    min_id_length: int

    def amplitude_event(self, event_type: str, *, part: str = "", **fields: Any
                        ) -> dict[str, Any]:
        """One event. ``fields`` (properties, revenue, groups) win over the context's."""
        body: dict[str, Any] = {**identity(self.event, self.min_id_length),
                                "event_type": event_type, "time": event_time(self.event),
                                "insert_id": insert_id(self.event, part),
                                **context_fields(self.event)}
        if self.options.session_id is not None:
            body["session_id"] = self.options.session_id
        if self.options.groups:
            body["groups"] = dict(self.options.groups)
        for key, value in fields.items():  # a loop: a comprehension is a function to make
            if value is not None and value != {}:
                body[key] = value
        for name in ("event_properties", "user_properties", "group_properties"):
            if name in body and nests_deeper_than(body[name], MAX_DEPTH):
                raise EventRejected(f"{name} nest deeper than {MAX_DEPTH} levels, the most "
                                    "Amplitude accepts")
        return body


def track_events(builder: Builder, name: str, *, product_purchased: bool,
                 revenue_per_product: bool) -> list[dict[str, Any]]:
    """A track call, and for an ``Order Completed`` with ``products[]`` one "Product
    Purchased" event per product (Segment's logPurchase). Revenue is counted once: on the
    order, or with ``revenue_per_product`` on each product instead."""
    if name in RESERVED_EVENT_TYPES:
        raise EventRejected(f"{name!r} is an event name Amplitude reserves for itself")
    event = builder.event
    properties = event.properties  # read once: a pydantic attribute, slower than a local
    listed = properties.get("products")
    products = [item for item in listed if isinstance(item, dict)] \
        if product_purchased and name == ORDER_COMPLETED and isinstance(listed, list) else []
    if not products:  # most track calls: the order's revenue, if any, stays on the event
        return [builder.amplitude_event(name, event_properties=dict(properties),
                                        user_properties=attribution(event),
                                        **_order_revenue(properties))]
    order = {key: properties[key] for key in ("order_id", "currency")
             if properties.get(key) is not None}
    on_products = [revenue_fields({**order, **product}) if revenue_per_product else {}
                   for product in products]
    on_order = _order_revenue(properties)
    if on_order and not all(on_products):
        # A product without a price: the others would count part of the order and lose the
        # rest, so the order, which has its revenue, keeps it.
        on_products = [{} for _ in products]
    if any(on_products):
        on_order = {}
    events = [builder.amplitude_event(name, event_properties=dict(properties),
                                      user_properties=attribution(event), **on_order)]
    for index, (product, revenue) in enumerate(zip(products, on_products)):
        events.append(builder.amplitude_event(
            PRODUCT_PURCHASED, part=f"product-{index}",
            event_properties={**order, **product}, **revenue))
    return events


def _order_revenue(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Root revenue fields only for events that carry the reserved ``revenue`` property:
    a cart or product view with a price is not revenue."""
    return revenue_fields(properties) if properties.get("revenue") is not None else {}


def page_event(builder: Builder) -> dict[str, Any]:
    """A page or screen as "Viewed {name}" (Segment's Amplitude presets), or "Loaded a Page"
    / "Loaded a Screen" when it has no name. Properties: the page's own, its name, and the
    ``context.page`` fields it lacks."""
    event = builder.event
    call, own_name, own_properties = event.type, event.name, event.properties  # read once
    kind = "Screen" if call == "screen" else "Page"
    name = own_name or own_properties.get("name")
    event_type = f"Viewed {name}" if isinstance(name, str) and name else f"Loaded a {kind}"
    page = event.context.get("page") if call == "page" else None
    properties = {key: page[key] for key in _PAGE_FIELDS
                  if isinstance(page, dict) and page.get(key) is not None}
    properties.update(own_properties)
    if own_name:
        properties.setdefault("name", own_name)
    return builder.amplitude_event(event_type, event_properties=properties,
                                   user_properties=attribution(event))


def identify_event(builder: Builder) -> dict[str, Any]:
    """``$identify``: the traits ``$set`` as user properties (and the UTM/referrer
    attribution). Carrying both user_id and device_id, it also merges the two."""
    user_properties = attribution(builder.event)
    user_properties["$set"] = {**user_properties.get("$set", {}), **builder.event.traits}
    return builder.amplitude_event("$identify", user_properties=user_properties)


def group_events(builder: Builder, group_type: str) -> list[dict[str, Any]]:
    """What Amplitude's SDKs send for setGroup + groupIdentify: a ``$identify`` that puts the
    user in the group (``groups`` and the user property named by the group type), then a
    ``$groupidentify`` that ``$set``s the group's traits as group properties."""
    event = builder.event
    groups = {group_type: event.groupId}
    events = [builder.amplitude_event("$identify", part="group", groups=groups,
                                      user_properties={"$set": {group_type: event.groupId}})]
    if event.traits:
        events.append(builder.amplitude_event(
            "$groupidentify", part="groupidentify", groups=groups,
            group_properties={"$set": dict(event.traits)}))
    return events
