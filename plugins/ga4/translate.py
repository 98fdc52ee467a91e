"""How a Segment-spec event becomes one GA4 Measurement Protocol event.

GA4 answers 2xx even to payloads it then drops (destinations.md §2.3; the MP reference says
the collect endpoint never reports validation errors), so every rule GA4 enforces is checked
here, and an event that breaks one raises ``EventRejected`` naming the rule instead of
vanishing downstream.

Limits are those of the Measurement Protocol reference, "Limitations" (also RT ga4 README):
25 events per request, 25 params per event, 25 user properties, event and param names 40
characters, param values 100 characters (500 on GA4 360), user property names 24 and values 36
characters, a post body of 130 KB, and backdating by at most 72 hours.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any, Literal

from router import Event, EventRejected
from router import semantics as spec

EVENT_NAME_MAX = 40
PARAM_NAME_MAX = 40
PARAMS_MAX = 25
ITEMS_MAX = 200  # GA4 e-commerce guide: "up to 200 elements in the items array"
USER_PROPERTIES_MAX = 25
USER_PROPERTY_NAME_MAX = 24
USER_PROPERTY_VALUE_MAX = 36
BACKDATE_MAX = timedelta(hours=72)
CLOCK_SKEW = timedelta(minutes=1)
"""How far a timestamp may be ahead of receipt: a sender's clock running fast."""

# Three page params have their own, longer value limits (RT ga4 README, MP "Limitations").
PAGE_PARAM_VALUE_MAX = {"page_location": 1000, "page_referrer": 420, "page_title": 300}

# MP reference, "Reserved names": these prefixes belong to Google for event names, param names
# and user property names alike.
RESERVED_PREFIXES = ("google_", "ga_", "firebase_")
RESERVED_EVENT_NAMES = frozenset("""
ad_activeview ad_click ad_exposure ad_query ad_reward adunit_exposure app_background
app_clear_data app_exception app_remove app_store_refund app_store_subscription_cancel
app_store_subscription_convert app_store_subscription_renew app_update app_upgrade
dynamic_link_app_open dynamic_link_app_update dynamic_link_first_open error firebase_campaign
firebase_in_app_message_action firebase_in_app_message_dismiss
firebase_in_app_message_impression first_open first_visit in_app_purchase notification_dismiss
notification_foreground notification_open notification_receive notification_send os_update
session_start session_start_with_rollout user_engagement
""".split())
RESERVED_PARAM_NAMES = frozenset({"firebase_conversion"})
RESERVED_USER_PROPERTY_NAMES = frozenset({"first_open_time", "first_visit_time",
                                          "last_deep_link_referrer", "user_id",
                                          "first_open_after_install"})

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_APP_INSTANCE_ID = re.compile(r"[0-9a-fA-F]{32}\Z")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
"""Made once: ``timedelta()`` with a keyword costs more than the division it serves."""

Oversized = Literal["truncate", "reject"]


# --- names ---------------------------------------------------------------------------------

def name_problem(name: str, *, max_length: int, reserved: frozenset[str] = frozenset()
                 ) -> str | None:
    """Why GA4 would refuse ``name`` as an event, param or user property name, or None."""
    if len(name) > max_length:
        return f"is {len(name)} characters, over GA4's {max_length}"
    if not _NAME.match(name):
        return "must start with a letter and hold only letters, digits and underscores"
    lowered = name.lower()
    for prefix in RESERVED_PREFIXES:
        if lowered.startswith(prefix):
            return f"starts with {prefix!r}, a prefix GA4 reserves"
    if name in reserved:
        return "is a name GA4 reserves"
    return None


@functools.lru_cache(maxsize=4096)
def event_name(raw: str, *, lowercase: bool) -> str:
    """A track event's name as GA4 takes it: spaces become underscores (as Segment's GA4
    destination does), optionally lower-cased; anything still invalid is rejected.
    Remembered: a stream uses a small vocabulary of names over and over (a rejection is
    not remembered, it raises)."""
    name = "_".join(raw.strip().split())
    if lowercase:
        name = name.lower()
    problem = name_problem(name, max_length=EVENT_NAME_MAX, reserved=RESERVED_EVENT_NAMES)
    if problem:
        raise EventRejected(f"GA4 event name {name!r} {problem}")
    return name


@functools.lru_cache(maxsize=4096)
def param_name(raw: str) -> str:
    """A property name as a GA4 param name: spaces become underscores, the rest must pass.
    Remembered, as ``event_name`` is."""
    name = "_".join(raw.strip().split())
    problem = name_problem(name, max_length=PARAM_NAME_MAX, reserved=RESERVED_PARAM_NAMES)
    if problem:
        raise EventRejected(f"GA4 param {name!r} (from property {raw!r}) {problem}")
    return name


# --- e-commerce ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Native:
    """A GA4 recommended event that a Segment spec event maps to."""

    name: str
    items: bool = False
    """Carries ``items[]``: the event's ``products[]``, or the event itself as one product."""
    transaction: bool = False
    """purchase/refund: ``transaction_id`` required, value from total ‖ value ‖ revenue."""
    params: Mapping[str, str] = field(default_factory=dict)
    """GA4 param ← Segment property, beyond the money fields and items."""
    constants: Mapping[str, str] = field(default_factory=dict)


_LIST = {"item_list_id": "list_id", "item_list_name": "category"}
_PROMOTION = {"promotion_id": "promotion_id", "promotion_name": "name",
              "creative_name": "creative", "creative_slot": "position"}

# destinations.md §2.2 (RT ga4/config.js, JI ga4-destination.ts); param names from GA4's
# recommended-events reference.
NATIVE_EVENTS: dict[str, Native] = {
    spec.PRODUCTS_SEARCHED: Native("search", params={"search_term": "query"}),
    spec.PRODUCT_LIST_VIEWED: Native("view_item_list", items=True, params=_LIST),
    spec.PRODUCT_CLICKED: Native("select_item", items=True),
    spec.PRODUCT_VIEWED: Native("view_item", items=True),
    spec.PRODUCT_ADDED: Native("add_to_cart", items=True),
    spec.PRODUCT_REMOVED: Native("remove_from_cart", items=True),
    spec.CART_VIEWED: Native("view_cart", items=True),
    spec.CHECKOUT_STARTED: Native("begin_checkout", items=True),
    spec.PAYMENT_INFO_ENTERED: Native("add_payment_info", items=True,
                                      params={"payment_type": "payment_method"}),
    spec.CHECKOUT_STEP_COMPLETED: Native("add_shipping_info", items=True,
                                         params={"shipping_tier": "shipping_method"}),
    spec.ORDER_COMPLETED: Native("purchase", items=True, transaction=True),
    spec.ORDER_REFUNDED: Native("refund", items=True, transaction=True),
    spec.PRODUCT_ADDED_TO_WISHLIST: Native("add_to_wishlist", items=True),
    spec.PROMOTION_VIEWED: Native("view_promotion", params=_PROMOTION),
    spec.PROMOTION_CLICKED: Native("select_promotion", params=_PROMOTION),
    spec.PRODUCT_SHARED: Native("share", params={"method": "share_via", "item_id": "product_id"},
                                constants={"content_type": "product"}),
    spec.CART_SHARED: Native("share", params={"method": "share_via", "item_id": "cart_id"},
                             constants={"content_type": "cart"}),
    spec.SIGNED_UP: Native("sign_up", params={"method": "method"}),
}

# items[] ← product fields (RT ga4/data/GA4ItemConfig.json; AD ga4-properties.ts).
ITEM_FIELDS = {"item_name": "name", "price": "price", "quantity": "quantity",
               "item_category": "category", "item_brand": "brand", "item_variant": "variant",
               "index": "position", "coupon": "coupon"}
NUMERIC_ITEM_FIELDS = frozenset({"price", "quantity", "index"})
"""Numbers in GA4's items reference: a string there (other than a numeric one, which the
router has made a number) is dropped by GA4 without a word."""
USER_ID_MAX = 256
"""GA4's "Event collection limits": a User-ID value over 256 characters is not logged."""
# Fields of a product that are used up when the event itself is the product.
PRODUCT_KEYS = frozenset({"product_id", "sku", "name", "price", "quantity", "category", "brand",
                          "variant", "position", "url", "image_url"})


def items(event: Event, limits: ValueLimits) -> list[dict[str, Any]]:
    """``items[]`` from the products of the event; each needs an id or a name (GA4's rule)."""
    result = []
    for position, product in enumerate(spec.products(event)):
        item: dict[str, Any] = {}
        item_id = _first(product, "product_id", "sku")
        if item_id is not None:
            item_id = str(item_id)
            item["item_id"] = item_id if len(item_id) <= limits.max_length \
                else limits.fit(f"items[{position}].item_id", item_id)
        for ga4_key, segment_key in ITEM_FIELDS.items():
            value = product.get(segment_key)
            if value is None:
                continue
            if ga4_key in NUMERIC_ITEM_FIELDS and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise EventRejected(f"GA4 takes items[].{ga4_key} as a number; product "
                                    f"{position} has a {type(value).__name__} {segment_key}")
            if isinstance(value, (int, float)) or isinstance(value, str) \
                    and len(value) <= limits.max_length:
                item[ga4_key] = value  # as in params(): the error location is made only if needed
            else:
                item[ga4_key] = limits.scalar(f"items[{position}].{ga4_key}", value)
        if "item_id" not in item and "item_name" not in item:
            raise EventRejected(f"GA4 needs item_id or item_name on every item; product "
                                f"{position} has neither product_id, sku nor name")
        result.append(item)
    if len(result) > ITEMS_MAX:
        raise EventRejected(f"{len(result)} products, over GA4's {ITEMS_MAX} items per event")
    return result


def given_items(value: Any, limits: ValueLimits) -> list[dict[str, Any]]:
    """An ``items`` property as GA4 takes it: objects with an ``item_id`` or ``item_name``,
    their values strings and numbers (nulls dropped), at most 200."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise EventRejected("property items is not GA4's items, a list of objects; send "
                            "products, which become items")
    if len(value) > ITEMS_MAX:
        raise EventRejected(f"{len(value)} items, over GA4's {ITEMS_MAX} per event")
    checked = []
    for position, item in enumerate(value):
        if item.get("item_id") is None and item.get("item_name") is None:
            raise EventRejected(f"GA4 needs item_id or item_name on every item; items"
                                f"[{position}] has neither")
        checked.append({key: limits.scalar(f"items[{position}].{key}", field)
                        for key, field in item.items() if field is not None})
    return checked


def money(event: Event, native: Native) -> tuple[dict[str, Any], set[str]]:
    """``value``/``currency`` (and ``transaction_id`` for purchase/refund) of an e-commerce
    event, and the properties they used up.

    GA4 needs ``currency`` whenever ``value`` is set, or it cannot count the revenue
    (AD checks this; destinations.md §2.2), and a purchase or refund without
    ``transaction_id`` is not deduplicated, so both are rejected here.
    """
    props = event.properties
    keys = ("total", "value", "revenue") if native.transaction else ("value", "revenue")
    params: dict[str, Any] = {}
    used = {key for key in keys if key in props}
    value = _first(props, *keys)
    currency = props.get("currency")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventRejected(f"GA4 {native.name}: its value (the first of "
                                f"{', '.join(keys)}) is not a number: {value!r}")
        if currency is None:
            raise EventRejected(f"GA4 {native.name} has a value but no currency; add "
                                f"properties.currency (ISO 4217)")
        params["value"] = value
    if currency is not None:
        params["currency"] = currency
        used.add("currency")
    if native.transaction:
        order_id = props.get("order_id")
        if order_id is None or order_id == "":
            raise EventRejected(f"GA4 {native.name} needs transaction_id; the event has no "
                                f"properties.order_id")
        params["transaction_id"] = str(order_id)
        used.add("order_id")
    return params, used


# --- the event ------------------------------------------------------------------------------

# Page properties that become page_location/page_referrer/page_title or mean nothing to GA4.
PAGE_KEYS = frozenset({"url", "referrer", "title", "path", "search"})


def shape(event: Event, limits: ValueLimits, *, lowercase: bool
          ) -> tuple[str, dict[str, Any], list[dict[str, Any]] | None]:
    """The GA4 event name, its params (before the checks of ``params``) and the ``items``
    made from its products, if any."""
    props, kind = event.properties, event.type
    if kind == "page":
        page = event.context.get("page")
        if not isinstance(page, dict):
            page = {}
        pairs = {key: value for key, value in props.items() if key not in PAGE_KEYS}
        pairs["page_location"] = props.get("url") or page.get("url")
        pairs["page_referrer"] = props.get("referrer") or page.get("referrer")
        pairs["page_title"] = props.get("title") or page.get("title")
        return "page_view", pairs, None
    if kind == "screen":
        pairs = dict(props)
        pairs["screen_name"] = event.name or props.get("name")
        return "screen_view", pairs, None
    if kind == "group":
        return "join_group", {"group_id": event.groupId}, None
    name = event.event or ""
    native = NATIVE_EVENTS.get(name)
    if native is None:
        return event_name(name, lowercase=lowercase), custom_params(props), None
    return native.name, *native_params(event, native, limits)


def custom_params(props: Mapping[str, Any]) -> dict[str, Any]:
    """A custom event's params: its properties, with ``revenue`` as GA4's ``value`` when the
    event has no ``value`` of its own (``currency`` keeps its name)."""
    pairs = dict(props)
    if pairs.get("value") is None and pairs.get("revenue") is not None:
        pairs["value"] = pairs.pop("revenue")
    return pairs


def native_params(event: Event, native: Native, limits: ValueLimits
                  ) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """A recommended event's params: the mapped fields, money, then the remaining
    properties as custom params; and its items, when it has products."""
    props = event.properties
    mapped, used = money(event, native)
    for ga4_key, segment_key in native.params.items():
        if props.get(segment_key) is not None:
            mapped[ga4_key] = props[segment_key]
            used.add(segment_key)
    mapped.update(native.constants)
    listed = None
    if native.items:
        listed = items(event, limits) or None
        used |= {"products"} | (PRODUCT_KEYS if "products" not in props else set())
    pairs = {key: value for key, value in props.items() if key not in used}
    pairs.update(mapped)
    return pairs, listed


# --- values --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueLimits:
    """Applies GA4's value rules: scalars only, strings cut (or rejected) at the limit."""

    max_length: int
    oversized: Oversized

    def scalar(self, where: str, value: Any, max_length: int | None = None) -> Any:
        if isinstance(value, (dict, list, tuple)):
            raise EventRejected(f"GA4 takes only strings and numbers as param values; {where} "
                                f"is {'an object' if isinstance(value, dict) else 'an array'}")
        if isinstance(value, str):
            return self.fit(where, value, max_length)
        return value

    def fit(self, where: str, text: str, max_length: int | None = None) -> str:
        limit = max_length or self.max_length
        if len(text) <= limit:
            return text
        if self.oversized == "reject":
            raise EventRejected(f"{where} is {len(text)} characters, over GA4's {limit}")
        return text[:limit]


def params(pairs: Mapping[str, Any], limits: ValueLimits,
           made_items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Event params from ``pairs``: names checked, nulls dropped (GA4 takes none), values
    checked, at most 25 (items included). ``made_items``, made from the event's products,
    win over an ``items`` property, which is checked as GA4's items otherwise (it went out
    unchecked, a string or nested lists, for GA4 to drop silently: data fidelity audit)."""
    result: dict[str, Any] = {}
    for raw_name, value in pairs.items():
        if value is None:
            continue
        name = param_name(raw_name)
        if name == "items":
            if made_items is None:
                result[name] = given_items(value, limits)
            continue
        max_length = PAGE_PARAM_VALUE_MAX.get(name)
        if isinstance(value, (int, float)) or isinstance(value, str) \
                and len(value) <= (max_length or limits.max_length):
            result[name] = value  # as scalar() leaves it, without formatting where it is
        else:
            result[name] = limits.scalar(f"param {name!r}", value, max_length)
    if made_items is not None:
        result["items"] = made_items
    if len(result) > PARAMS_MAX:
        raise EventRejected(f"{len(result)} params, over GA4's {PARAMS_MAX} per event; drop "
                            f"properties with a filter or a mapping override")
    return result


def user_properties(values: Mapping[str, Any], limits: ValueLimits) -> dict[str, dict]:
    """``user_properties`` in GA4's ``{"name": {"value": v}}`` shape, checked."""
    result: dict[str, dict] = {}
    for name, value in values.items():
        if value is None:
            continue
        problem = name_problem(name, max_length=USER_PROPERTY_NAME_MAX,
                               reserved=RESERVED_USER_PROPERTY_NAMES)
        if problem:
            raise EventRejected(f"GA4 user property {name!r} {problem}")
        where = f"user property {name!r}"
        result[name] = {"value": limits.scalar(where, value, USER_PROPERTY_VALUE_MAX)}
    if len(result) > USER_PROPERTIES_MAX:
        raise EventRejected(f"{len(result)} user properties, over GA4's {USER_PROPERTIES_MAX}")
    return result


# --- identity and time ---------------------------------------------------------------------

def request_fields(event: Event, options: Mapping[str, Any], limits: ValueLimits, *,
                   stream: Literal["web", "app"], traits: list[str]) -> dict[str, Any]:
    """client_id/app_instance_id, user_id, user properties, consent: the fields GA4 takes
    once per request, so they decide which events may share one.

    ``traits`` names the ``context.traits`` sent as user properties; the ``user_properties``
    option adds to them.
    """
    fields: dict[str, Any] = {}
    if stream == "web":
        fields["client_id"] = client_id(event, options)
    else:
        fields["app_instance_id"] = app_instance_id(event, options)
    if event.userId:
        if len(event.userId) > USER_ID_MAX:
            raise EventRejected(f"the userId is {len(event.userId)} characters; GA4 does not "
                                f"log a user_id over {USER_ID_MAX}")
        fields["user_id"] = event.userId
    extra = options.get("user_properties") or {}
    if not isinstance(extra, dict):
        raise EventRejected("the `user_properties` option must be an object")
    if traits or extra:  # most destinations list no traits, and most events give none
        context_traits = event.context.get("traits")
        context_traits = context_traits if isinstance(context_traits, dict) else {}
        chosen = {name: context_traits.get(name) for name in traits}
        properties = user_properties({**chosen, **extra}, limits)
        if properties:
            fields["user_properties"] = properties
    if options.get("consent") is not None:
        fields["consent"] = consent(options["consent"])
    return fields


def consent(value: Any) -> dict[str, str]:
    """GA4's ``consent`` object: ad_user_data and ad_personalization, GRANTED or DENIED."""
    if not isinstance(value, dict) or not set(value) <= {"ad_user_data",
                                                             "ad_personalization"}:
        raise EventRejected("the `consent` option takes ad_user_data and ad_personalization")
    for key, state in value.items():
        if state not in ("GRANTED", "DENIED"):
            raise EventRejected(f"consent.{key} must be GRANTED or DENIED")
    return dict(value)


def client_id(event: Event, options: Mapping[str, Any]) -> str:
    """The web client id: the per-event option, the context (``context.client_id``, or the
    ``_ga`` cookie in ``context.cookies``), the anonymous id, and last the user id (Segment's
    GA4 destination also falls back to it, so server-side events still count)."""
    context = event.context
    cookies = context.get("cookies")  # server-side events have none: no call for them
    for candidate in (options.get("client_id"), context.get("client_id"),
                      None if cookies is None else _ga_cookie_client_id(cookies),
                      event.anonymousId, event.userId):
        if isinstance(candidate, (str, int)) and not isinstance(candidate, bool) \
                and str(candidate):
            return str(candidate)
    raise EventRejected("GA4 web streams need a client_id")  # parse_event makes this unreachable


def app_instance_id(event: Event, options: Mapping[str, Any]) -> str:
    """The Firebase installation id an app stream needs; no fallback, GA4 checks its form."""
    candidate = options.get("app_instance_id") or event.context.get("app_instance_id")
    if not candidate:
        raise EventRejected("GA4 app streams need app_instance_id (the Firebase installation "
                            "id): give it in context.app_instance_id or the integrations "
                            "options")
    if not isinstance(candidate, str) or not _APP_INSTANCE_ID.match(candidate):
        raise EventRejected("GA4 app_instance_id must be 32 hexadecimal characters")
    return candidate


def _ga_cookie_client_id(cookies: Any) -> str | None:
    """``GA1.1.1234567890.1712345678`` → ``1234567890.1712345678``, gtag's client id."""
    if not isinstance(cookies, dict) or not isinstance(cookies.get("_ga"), str):
        return None
    parts = cookies["_ga"].split(".")
    return ".".join(parts[-2:]) if len(parts) >= 4 else None


def timestamp_micros(event: Event, *, margin: timedelta) -> int:
    """The event time in µs since the epoch, after checking GA4's 72-hour backdating window
    and that it is not in the future ("only ... events that happened in the past", which GA4
    answers 2xx and drops: data fidelity audit).

    Both are measured from ``receivedAt`` (not the clock: translate must be deterministic)
    and ``margin`` is kept free for retries, since GA4 drops a late event silently.
    """
    # Each read once: an event's fields are pydantic attributes, slower to read than locals.
    timestamp, received = event.timestamp, event.receivedAt
    if timestamp - received > CLOCK_SKEW:
        raise EventRejected("the event's timestamp is over a minute after the router received "
                            "it; GA4 takes only events that happened in the past")
    age = received - timestamp
    if age > BACKDATE_MAX - margin:
        hours = age / timedelta(hours=1)
        raise EventRejected(f"the event happened {hours:.0f} h before it was received; GA4 "
                            f"keeps events backdated by at most 72 h, and this leaves "
                            f"{margin / timedelta(hours=1):.0f} h for retries")
    # A sender's clock a little fast (a server library sends no sentAt to correct it) is
    # read as the moment of receipt.
    return (min(timestamp, received) - _EPOCH) // _MICROSECOND


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None
