"""Hypothesis strategies for valid events of every call type.

``raw_events()`` draws what a client library could send and ``router.parse_event`` accepts;
``events()`` is the same, parsed. The conformance suite feeds them to destinations, and the
core's own property tests reuse them, so "valid event" means one thing across the project.

What is drawn, beyond the happy path: ids and names in any script, numeric ids, nested
properties and traits, ``revenue``/``value`` as numbers or numeric strings (now and then as
text that is no number), currency codes in any case and with spaces (now and then no code),
``products[]`` with missing or oddly typed fields, integrations maps with per-destination
option objects, optional timestamps with or without ``sentAt``, unknown top-level fields, and
the spec's e-commerce and semantic event names, so that a destination's special cases are
reached, not only its generic path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone, UTC
from typing import Any

import orjson
from hypothesis import strategies as st

from router import semantics
from router.currencies import ISO_4217_CODES
from router.events import CALL_TYPES, MAX_EVENT_BYTES, Event, parse_event
from router.semantics import SEMANTIC_ACTIONS
from router.testing.events import RECEIVED_AT

# Top-level fields with a meaning in the spec: random extra fields must not collide with them.
SPEC_FIELDS = frozenset({"type", "messageId", "timestamp", "receivedAt", "userId", "anonymousId",
                         "event", "name", "groupId", "previousId", "properties", "traits",
                         "context", "integrations", "originalTimestamp", "sentAt", "version",
                         "writeKey", "category", "channel"})
RESERVED_PROPERTIES = frozenset({"revenue", "value", "currency"})

ECOMMERCE_EVENTS: tuple[str, ...] = tuple(
    value for name, value in sorted(vars(semantics).items())
    if name.isupper() and isinstance(value, str))
SEMANTIC_EVENTS: tuple[str, ...] = tuple(SEMANTIC_ACTIONS)

_letters = st.characters(codec="utf-8")  # any script; no lone surrogates (not valid JSON text)


def texts(*, min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    """Unicode text of any script, as client libraries pass through from users."""
    return st.text(_letters, min_size=min_size, max_size=max_size)


def emails() -> st.SearchStrategy[str]:
    """Plausible e-mail addresses: cheaper to draw than ``st.emails()``, whose full RFC 5322
    range no destination needs."""
    local = st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True)
    domain = st.sampled_from(["example.com", "example.org", "mail.example", "exämple.de"])
    return st.builds(lambda name, host: f"{name}@{host}", local, domain)


def identifiers() -> st.SearchStrategy[str]:
    """A user, anonymous, group or message id: UUIDs, emails, plain and unicode strings."""
    return st.one_of(
        st.uuids().map(str),
        st.from_regex(r"[a-z]{1,8}-[0-9]{1,6}", fullmatch=True),
        emails(),
        texts(min_size=1, max_size=24).filter(lambda text: text.strip() != ""),
    )


def numeric_identifiers() -> st.SearchStrategy[int]:
    """Ids some clients send as numbers; the event model turns them into strings."""
    return st.integers(min_value=0, max_value=2**53)


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                     st.floats(allow_nan=False, allow_infinity=False), texts())


def json_values(*, max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """Nested JSON: scalars, lists and objects, a few levels deep."""
    return st.recursive(
        json_scalars(),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(texts(max_size=12), inner, max_size=4),
        max_leaves=max_leaves)


def free_objects(*, max_size: int = 5) -> st.SearchStrategy[dict[str, Any]]:
    """A properties, traits or context object without the reserved properties (those are
    drawn on purpose, so that they are always valid)."""
    return st.dictionaries(texts(max_size=16).filter(lambda key: key not in RESERVED_PROPERTIES),
                           json_values(), max_size=max_size)


def numbers() -> st.SearchStrategy[float | int]:
    return st.one_of(st.integers(-10**9, 10**9),
                     st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
                     st.decimals(min_value=0, max_value=100_000, places=2).map(float))


def amounts() -> st.SearchStrategy[float | int | str]:
    """``revenue``/``value`` as clients send them: numbers, numeric strings that
    ``parse_event`` turns into numbers ("19.99", " 5 ", "1e3"), and now and then text that
    is no number ("$25.00"), which only destinations with ``reads_amounts`` off receive."""
    return st.one_of(numbers(), numbers().map(repr), numbers().map(lambda n: f" {n} "),
                     st.sampled_from(["19.99", "0", "0.00", "1e3", "-5.5", "25.00"]),
                     st.sampled_from(["$25.00", "1,234.50", "free", ""]))


def currency_codes() -> st.SearchStrategy[str]:
    """ISO 4217 codes in any case, sometimes padded: ``eur``, ``Eur``, ``" usd "``."""
    codes = st.sampled_from(sorted(ISO_4217_CODES))
    return st.one_of(
        codes,
        codes.map(str.lower),
        codes.map(str.title),
        st.tuples(codes, st.lists(st.booleans(), min_size=3, max_size=3)).map(
            lambda pair: "".join(c.lower() if low else c for c, low in zip(pair[0], pair[1]))),
        codes.map(lambda code: f" {code} "),
        st.sampled_from(["", "dollars", "€"]),  # no code: as amounts above
    )


def products() -> st.SearchStrategy[dict[str, Any]]:
    """One item of ``products[]``: the spec's fields, each optional, prices as numbers or
    numeric strings, and now and then an extra field."""
    fields = {
        "product_id": identifiers(), "sku": identifiers(), "name": texts(min_size=1),
        "category": texts(), "brand": texts(), "variant": texts(),
        "price": st.one_of(numbers(), numbers().map(str), st.none()),
        "quantity": st.one_of(st.integers(0, 1000), st.integers(0, 100).map(str)),
        "coupon": texts(), "position": st.integers(0, 100),
        "url": st.just("https://shop.example/p/1"),
        "image_url": st.just("https://shop.example/p/1.jpg"),
    }
    return st.builds(lambda extra, product: {**extra, **product},
                     free_objects(max_size=2), st.fixed_dictionaries({}, optional=fields))


def event_names() -> st.SearchStrategy[str]:
    """Track event names: the spec's e-commerce and semantic names (so destinations' special
    cases run), common names, and any non-blank unicode text."""
    return st.one_of(
        st.sampled_from(ECOMMERCE_EVENTS),
        st.sampled_from(SEMANTIC_EVENTS),
        st.sampled_from(["Signed Up", "Course Started", "Button Clicked", "Video Played"]),
        texts(min_size=1, max_size=40).filter(lambda name: name.strip() != ""),
    )


def timestamps() -> st.SearchStrategy[str]:
    """ISO-8601 date-times in the forms clients write: ``Z``, offsets, with or without
    fractions of a second."""
    moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2035, 1, 1),
                           timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)),
                                                      timezone(timedelta(hours=-5, minutes=-30))]))
    return st.one_of(
        moments.map(lambda moment: moment.isoformat()),
        moments.map(lambda moment: moment.astimezone(UTC)
                    .strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"),
        moments.map(lambda moment: moment.astimezone(UTC)
                    .strftime("%Y-%m-%dT%H:%M:%SZ")),
    )


def integrations_maps() -> st.SearchStrategy[dict[str, Any] | None]:
    """``null``, ``{}``, ``"All"`` on or off, destinations named with booleans or with an
    options object (per-event options for that destination)."""
    named = st.dictionaries(
        st.one_of(st.sampled_from(["Mixpanel", "Amplitude", "Slack", "webhook", "Braze",
                                   "Google Analytics 4"]),
                  texts(min_size=1, max_size=12).filter(lambda key: key != "All")),
        st.one_of(st.booleans(), st.dictionaries(texts(max_size=10), json_scalars(), max_size=3)),
        max_size=3)
    with_all = st.tuples(named, st.booleans()).map(lambda pair: {"All": pair[1], **pair[0]})
    return st.one_of(st.none(), st.just({}), named, with_all)


class _Parts:
    """The strategies ``raw_events`` draws from, built once: building them inside each draw
    costs hypothesis a validation every time, which made every example several times
    slower (and shrinking a failure minutes long)."""

    flag = st.booleans()
    one_in_4 = st.integers(0, 3)
    one_in_5 = st.integers(0, 4)
    one_in_6 = st.integers(0, 5)
    one_in_10 = st.integers(0, 9)
    who = st.sampled_from(["user", "anonymous", "both"])
    ids = identifiers()
    ids_or_numbers = identifiers() | numeric_identifiers()
    names = event_names()
    page_names = texts(min_size=1, max_size=30)
    categories = texts(max_size=20)
    objects = free_objects()
    small_objects = free_objects(max_size=3)
    email = emails()
    person_name = texts(min_size=1)
    title = texts()
    ip = st.ip_addresses().map(str)
    amount = amounts()
    currency = currency_codes()
    product = products()
    product_list = st.lists(products(), max_size=4)
    moment = timestamps()
    integrations = integrations_maps()
    version = st.integers(0, 2) | st.just("1.1")
    extras = st.dictionaries(
        texts(min_size=1, max_size=12).filter(lambda key: key not in SPEC_FIELDS),
        json_values(max_leaves=4), max_size=2)


def _properties(draw: st.DrawFn, call_type: str) -> dict[str, Any]:
    """Properties with the reserved ones drawn on purpose, and ``products[]`` for tracks."""
    # The reserved properties and products are where destinations differ and trip, so they
    # are drawn often: "3 in 4" nominally, which is about one in two in practice, since
    # hypothesis leans towards the simplest choice (0, absent).
    parts = _Parts
    props = draw(parts.objects)
    if draw(parts.one_in_4) > 0:
        # null is valid and common (a cart without a total); parse_event leaves it null and
        # adds no currency, which is where destinations trip.
        props["revenue"] = None if draw(parts.one_in_4) == 0 else draw(parts.amount)
    if draw(parts.one_in_4) > 0:
        props["value"] = draw(parts.amount)
    if draw(parts.one_in_4) > 0:
        props["currency"] = draw(parts.currency)
    if call_type == "track" and draw(parts.one_in_4) > 0:
        props["products"] = draw(parts.product_list)
    if call_type == "track" and draw(parts.one_in_5) == 0:
        props.update(draw(parts.product))  # a single-product event such as Product Added
    return props


@st.composite
def _raw_event(draw: st.DrawFn, call_types: st.SearchStrategy[str]) -> dict[str, Any]:
    parts = _Parts
    call_type = draw(call_types)
    raw: dict[str, Any] = {"type": call_type}
    who = draw(parts.who)
    if call_type == "alias" or who in ("user", "both"):
        raw["userId"] = draw(parts.ids_or_numbers if draw(parts.one_in_10) == 0 else parts.ids)
    elif draw(parts.flag):
        raw["userId"] = None  # analytics.js sends null for an anonymous visitor
    if who in ("anonymous", "both"):
        raw["anonymousId"] = draw(parts.ids)

    if call_type == "track":
        raw["event"] = draw(parts.names)
    elif call_type in ("page", "screen"):
        if draw(parts.flag):
            raw["name"] = draw(parts.page_names)
        if call_type == "page" and draw(parts.flag):
            raw["category"] = draw(parts.categories)
    elif call_type == "group":
        raw["groupId"] = draw(parts.ids)
    elif call_type == "alias":
        raw["previousId"] = draw(parts.ids)

    if call_type in ("track", "page", "screen") and draw(parts.one_in_5) > 0:
        raw["properties"] = _properties(draw, call_type)
    if call_type in ("identify", "group") and draw(parts.one_in_5) > 0:
        traits = draw(parts.objects)
        if draw(parts.flag):
            traits["email"] = draw(parts.email)
        if draw(parts.flag):
            traits["name"] = draw(parts.person_name)
        raw["traits"] = traits
    if draw(parts.flag):
        context = draw(parts.small_objects)
        if draw(parts.flag):
            context["ip"] = draw(parts.ip)
        if draw(parts.flag):
            context["page"] = {"url": "https://shop.example/x", "path": "/x",
                               "title": draw(parts.title)}
        if draw(parts.flag):
            context["library"] = {"name": "analytics.js", "version": "2.11.1"}
        raw["context"] = context

    if draw(parts.one_in_4) > 0:
        raw["messageId"] = draw(parts.ids)
    if draw(parts.flag):
        raw["timestamp"] = draw(parts.moment)
    if draw(parts.flag):
        raw["sentAt"] = draw(parts.moment)
    if draw(parts.one_in_5) == 0:
        raw["originalTimestamp"] = draw(parts.moment)
    if draw(parts.flag):
        raw["integrations"] = draw(parts.integrations)
    if draw(parts.one_in_6) == 0:
        raw["version"] = draw(parts.version)
    if draw(parts.one_in_5) == 0:
        raw.update(draw(parts.extras))
    return raw


def _fits(raw: dict[str, Any]) -> bool:
    return len(orjson.dumps(raw)) <= MAX_EVENT_BYTES


def raw_events(types: Sequence[str] = CALL_TYPES) -> st.SearchStrategy[dict[str, Any]]:
    """Valid raw events (plain dicts) of the given call types, as clients send them.

    Every drawn event is accepted by ``router.parse_event``; the events are small enough to be
    well under the 32 KB limit, which is checked anyway.
    """
    unknown = set(types) - set(CALL_TYPES)
    if unknown:
        raise ValueError(f"unknown call types {sorted(unknown)}; expected some of {CALL_TYPES}")
    # Track calls carry most of the variety (names, e-commerce, semantic events): drawn three
    # times as often as each other call type.
    weighted = [call_type for call_type in types for _ in range(3 if call_type == "track" else 1)]
    return _raw_event(st.sampled_from(weighted)).filter(_fits)


def events(types: Sequence[str] = CALL_TYPES, *, received_at: datetime = RECEIVED_AT
           ) -> st.SearchStrategy[Event]:
    """Valid events, normalized by ``parse_event`` (received at a fixed moment, so that what
    a destination makes of them does not depend on the clock)."""
    return raw_events(types).map(lambda raw: parse_event(raw, received_at=received_at))
