"""Realistic raw events for plugin tests, shipped as Python data.

The kit must work from an installed package, where the repository's ``tests/fixtures`` are not
there, so the sample events live here. They follow the Segment / Customer.io spec as client
libraries send it, and cover what every destination has to think about: the six call types,
e-commerce with ``products[]`` and un-normalized reserved properties, semantic events,
anonymous-only activity and an identify that merges two ids.

Every function returns fresh copies: a test may mutate what it gets.
"""

from __future__ import annotations

import copy
from datetime import datetime, UTC
from typing import Any

import orjson

from router.events import CALL_TYPES

RECEIVED_AT = datetime(2026, 11, 20, 14, 3, 12, tzinfo=UTC)
"""The receive time the kit parses events with, so that an event without a ``timestamp``
translates to the same payloads on every run (``parse_event`` would use the clock)."""

_CONTEXT: dict[str, Any] = {
    "active": True,
    "ip": "203.0.113.7",
    "locale": "en-US",
    "timezone": "Europe/Paris",
    "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "channel": "browser",
    "campaign": {"name": "winter", "source": "newsletter", "medium": "email",
                 "term": "courses", "content": "banner"},
    "page": {"path": "/pricing", "referrer": "https://www.google.com/", "search": "",
             "title": "Pricing - Example", "url": "https://shop.example/pricing"},
    "library": {"name": "analytics.js", "version": "2.11.1"},
}

_MOBILE_CONTEXT: dict[str, Any] = {
    "app": {"name": "Example", "version": "4.2.0", "build": "420"},
    "device": {"id": "B5372DB0-C21E-11E4-8DFC-AA07A5B093DB", "manufacturer": "Apple",
               "model": "iPhone15,2", "type": "ios"},
    "os": {"name": "iOS", "version": "17.1"},
    "network": {"wifi": True, "carrier": "Orange"},
    "screen": {"width": 393, "height": 852},
    "ip": "198.51.100.23",
    "locale": "fr-FR",
    "library": {"name": "analytics-ios", "version": "4.1.8"},
}

_BASES: dict[str, dict[str, Any]] = {
    "track": {
        "type": "track",
        "event": "Course Started",
        "userId": "user-1042",
        "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
        "messageId": "ajs-track-f8ca1e4de5024d9430b3928b",
        "timestamp": "2026-11-20T14:03:11.249Z",
        "sentAt": "2026-11-20T14:03:11.169Z",
        "properties": {"course_in_series": 1, "course_format": "pass/fail",
                       "title": "Intro to Customer.io"},
        "context": _CONTEXT,
        "integrations": {},
    },
    "identify": {
        "type": "identify",
        "userId": "user-1042",
        "messageId": "ajs-identify-5f1d0b8e61c34e0c9a1f",
        "timestamp": "2026-11-20T14:02:40.000Z",
        "traits": {"email": "ada@example.com", "name": "Ada Lovelace", "first_name": "Ada",
                   "last_name": "Lovelace", "plan": "pro", "phone": "+44 20 7946 0958",
                   "created_at": "2024-03-01T09:00:00.000Z",
                   "address": {"city": "London", "country": "GB", "postal_code": "NW1 6XE"}},
        "context": _CONTEXT,
    },
    "page": {
        "type": "page",
        "name": "Pricing",
        "category": "Marketing",
        "userId": "user-1042",
        "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
        "messageId": "ajs-page-0d8e4c7b2a8f4a5e9b6c",
        "timestamp": "2026-11-20T14:01:05.500Z",
        "properties": {"path": "/pricing", "referrer": "https://www.google.com/",
                       "search": "?plan=pro", "title": "Pricing - Example",
                       "url": "https://shop.example/pricing?plan=pro"},
        "context": _CONTEXT,
    },
    "screen": {
        "type": "screen",
        "name": "Home",
        "userId": "user-1042",
        "anonymousId": "7F0A8A9C-3B2E-4C1D-9E8F-0A1B2C3D4E5F",
        "messageId": "ios-screen-5b2c1f7e9d3a4b8c",
        "timestamp": "2026-11-20T13:58:20.000Z",
        "properties": {"variation": "blue signup button", "feed_items": 12},
        "context": _MOBILE_CONTEXT,
    },
    "group": {
        "type": "group",
        "groupId": "acct-0042",
        "userId": "user-1042",
        "messageId": "ajs-group-9c4e1b2a7d6f4e3b",
        "timestamp": "2026-11-20T14:00:00.000Z",
        "traits": {"name": "Initech", "industry": "Technology", "employees": 329,
                   "plan": "enterprise", "website": "https://initech.example"},
        "context": _CONTEXT,
    },
    "alias": {
        "type": "alias",
        "userId": "user-1042",
        "previousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
        "messageId": "ajs-alias-2a7c9e1f3b5d4c6e",
        "timestamp": "2026-11-20T14:02:39.000Z",
        "context": _CONTEXT,
    },
}


def make_event(type: str, **overrides: Any) -> dict[str, Any]:  # noqa: A002 - the spec's name
    """A realistic raw event of call type ``type``, with top-level fields replaced.

    Overrides replace whole fields: ``make_event("track", event="Signed Up",
    properties={"plan": "pro"})``. ``userId=None`` makes an anonymous-only event (client
    libraries send ``null``). The ``messageId`` is fixed per call type, so give each event of a
    test its own when the router's dedup would otherwise drop the second one.
    """
    if type not in _BASES:
        raise ValueError(f"unknown call type {type!r}; expected one of {', '.join(CALL_TYPES)}")
    event = copy.deepcopy(_BASES[type])
    event.update(copy.deepcopy(overrides))
    return event


_SAMPLES: list[dict[str, Any]] = [
    make_event("track"),
    make_event("identify"),
    make_event("page"),
    make_event("screen"),
    make_event("group"),
    make_event("alias"),
    # E-commerce spec v2: revenue as a string and currency in lower case, both normalized by
    # parse_event; per-event options for one destination in the integrations map.
    make_event(
        "track", event="Order Completed", messageId="msg-order-50314b8e9bcf",
        properties={
            "order_id": "50314b8e9bcf000000000000", "affiliation": "Online Store",
            "total": 27.50, "revenue": "25.00", "shipping": 3, "tax": 2, "discount": 2.5,
            "coupon": "hasbros", "currency": "eur",
            "products": [
                {"product_id": "507f1f77bcf86cd799439011", "sku": "45790-32",
                 "name": "Monopoly: 3rd Edition", "price": 19, "quantity": 1,
                 "category": "Games", "url": "https://shop.example/monopoly",
                 "image_url": "https://shop.example/monopoly.jpg"},
                {"product_id": "505bd76785ebb509fc183733", "sku": "46493-32",
                 "name": "Uno Card Game", "price": 3, "quantity": 2, "category": "Games"},
            ],
        },
        integrations={"All": True, "Slack": False,
                      "Mixpanel": {"project_token_override": "abc"}},
        context={"ip": "203.0.113.7",
                 "library": {"name": "analytics-python", "version": "2.3.2"}}),
    make_event("track", event="Product Added", messageId="msg-product-added-1",
               properties={"cart_id": "skdjsidjsdkdj29j", "product_id": "507f1f77bcf86cd799439011",
                           "sku": "G-32", "category": "Games", "name": "Monopoly: 3rd Edition",
                           "brand": "Hasbro", "variant": "200 pieces", "price": 18.99,
                           "quantity": 1, "coupon": "MAYDEALS", "position": 3,
                           "currency": "usd"}),
    make_event("track", event="Checkout Started", messageId="msg-checkout-1",
               properties={"order_id": "50314b8e9bcf000000000000", "value": "30.00",
                           "revenue": 25.0, "currency": "GBP",
                           "products": [{"product_id": "507f1f77bcf86cd799439011",
                                         "name": "Monopoly: 3rd Edition", "price": 19,
                                         "quantity": 1}]}),
    make_event("track", event="Order Refunded", messageId="msg-refund-1",
               properties={"order_id": "50314b8e9bcf000000000000", "total": 30,
                           "currency": "EUR"}),
    # Semantic events: the destination's delete / suppress operation, or a skip with a reason.
    make_event("track", event="Delete Person", messageId="msg-delete-1", properties={},
               anonymousId=None),
    make_event("track", event="User Deleted", messageId="msg-user-deleted-1",
               properties={}, anonymousId=None),
    make_event("track", event="Suppress Person", messageId="msg-suppress-1",
               properties={}, anonymousId=None),
    # Anonymous only: delivered with the destination's anonymous/device identifier.
    make_event("track", event="Newsletter Signed Up", messageId="msg-newsletter-1",
               userId=None, anonymousId="anon-7f1c2e",
               properties={"value": 4.5, "list": "weekly"},
               integrations={"All": False, "Google Analytics 4": True, "webhook": True}),
    make_event("page", messageId="msg-anon-page-1", userId=None, anonymousId="anon-7f1c2e",
               name=None, category=None),
    # Both ids on an identify: destinations with separate anonymous profiles merge them.
    make_event("identify", messageId="msg-identify-merge-1", anonymousId="anon-7f1c2e",
               traits={"email": "ada@example.com", "name": "Ada Lovelace", "plan": "pro"}),
    # Unicode everywhere a name can be, and a value given as a numeric string.
    make_event("track", event="Réservation confirmée ✓", messageId="msg-unicode-1",
               userId="utilisateur-é-42",
               properties={"ville": "Zürich", "emoji": "🎉", "value": "12.50",
                           "currency": "chf", "nested": {"日本語": ["一", "二"]}}),
]


_EDGES: list[dict[str, Any]] = [
    # What server-side libraries send: no context, no properties, no timestamps.
    {"type": "track", "event": "Signed Up", "userId": "u-edge-1", "messageId": "msg-edge-bare"},
    {"type": "identify", "userId": "u-edge-1", "messageId": "msg-edge-bare-identify"},
    {"type": "page", "anonymousId": "anon-edge-1", "messageId": "msg-edge-bare-page"},
    {"type": "group", "userId": "u-edge-1", "groupId": "g-1", "messageId": "msg-edge-bare-group"},
    # A null revenue gets no default currency; a numeric user id becomes a string.
    {"type": "track", "event": "Cart Viewed", "userId": 1042, "messageId": "msg-edge-null-revenue",
     "properties": {"revenue": None, "cart_id": "c-1"}},
    # Currency and value in forms parse_event normalizes; products that break assumptions.
    {"type": "track", "event": "Order Completed", "userId": "u-edge-1",
     "messageId": "msg-edge-odd-products",
     "properties": {"order_id": "o-edge", "value": "1e3", "currency": " jpy ",
                    "products": [{"product_id": "p1", "price": "12.50", "quantity": "2"},
                                 {"sku": "no-price"}, {"sku": "null-price", "price": None,
                                                       "quantity": None},
                                 {}, "not-an-object", None]}},
    # Amounts the router cannot read, kept as sent: only destinations with reads_amounts
    # off are handed this event.
    {"type": "track", "event": "Order Completed", "userId": "u-edge-1",
     "messageId": "msg-edge-unread-amounts",
     "properties": {"order_id": "o-edge-2", "revenue": "$25.00"}},  # and no currency added
    # A long unicode name and a client timestamp with an offset.
    {"type": "track", "event": "Évènement " + "très long " * 30, "anonymousId": "anon-edge-2",
     "messageId": "msg-edge-long-name", "timestamp": "2026-11-20T16:03:11+02:00",
     "properties": {"description": "ü" * 500}},
]


def sample_events() -> list[dict[str, Any]]:
    """Raw events every destination should be tried on (fresh copies)."""
    return copy.deepcopy(_SAMPLES)


def edge_events() -> list[dict[str, Any]]:
    """Valid but unusual raw events where destinations tend to trip (fresh copies): no context or
    properties at all, a null revenue, a numeric user id, products without prices (or with
    a null price and quantity) or that are not objects, a padded lower-case currency,
    amounts that are no number ("$25.00", which only destinations with ``reads_amounts``
    off receive), a very long unicode name. The conformance suite tries them with the
    samples, so these cases never depend on luck."""
    return copy.deepcopy(_EDGES)


def describe_event(event: Any) -> str:
    """A short human name for an event in a failure message: its call type and what names it
    (the track's event name, the page's name, the group id), with its ``messageId``."""
    data = event.to_dict() if hasattr(event, "to_dict") else event
    if not isinstance(data, dict):
        return repr(event)
    call = data.get("type", "?")
    label = {"track": data.get("event"), "page": data.get("name"),
             "screen": data.get("name"), "group": data.get("groupId"),
             "alias": data.get("previousId"), "identify": data.get("userId")}.get(call)
    named = f" {label!r}" if label else ""
    who = "userId" if data.get("userId") else "anonymous"
    return f"{call}{named} ({who}, messageId {data.get('messageId')!r})"


def event_json(event: Any, *, limit: int = 1500) -> str:
    """The event as compact JSON for a failure message, cut at ``limit`` characters."""
    data = event.to_dict() if hasattr(event, "to_dict") else event
    try:
        text = orjson.dumps(data, default=str).decode()
    except TypeError:
        text = repr(data)
    return text if len(text) <= limit else text[:limit] + "…"
