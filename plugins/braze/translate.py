"""Segment-spec events as Braze REST objects: attribute, event and purchase objects for
``/users/track``, alias objects for ``/users/identify``, ids for ``/users/delete``.

Every payload body holds exactly one object in one array (``{"events": [{...}]}``), so a batch
of N payloads is N objects: Braze counts attributes, events and purchases together against its
per-request limit, and a 201's ``errors[].index`` maps back to one payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from router import Event, EventRejected, as_number, format_time
from router.semantics import products

MAX_NAME = 255  # custom event names and product ids (Braze "Event object", "Purchase object")
MAX_QUANTITY = 100  # the Braze SDKs refuse a purchase quantity outside 1..100
MAX_PROPERTIES = 256  # Braze keeps the first 256 properties of an event or purchase, silently
# Property names Braze refuses with "Invalid 'properties' field" ("Custom event properties",
# "Reserved keys"): those of a custom event, and those of a purchase.
EVENT_RESERVED = frozenset({"time", "event_name"})
PURCHASE_RESERVED = EVENT_RESERVED | {"product_id", "quantity", "price", "currency"}

# Segment trait → Braze standard attribute (Braze "User attributes object").
STANDARD_ATTRIBUTES = {
    "email": "email", "firstName": "first_name", "first_name": "first_name",
    "lastName": "last_name", "last_name": "last_name", "phone": "phone",
}
# A gender trait → the values Braze's ``gender`` takes in /users/track ("Standard attributes"):
# M, F, O (other), N (not applicable), P (prefer not to say), or null (unknown). "U" is a
# constant of the SDKs only, so unknown is sent as null. Keys are matched after
# ``_gender_key``; a value not listed here is not sent as ``gender`` at all, since one
# value Braze refuses makes it refuse the whole attributes object.
_GENDERS: dict[str, str | None] = {
    **dict.fromkeys(("m", "male", "man"), "M"),
    **dict.fromkeys(("f", "female", "woman"), "F"),
    **dict.fromkeys(("o", "other", "non binary", "nonbinary"), "O"),
    **dict.fromkeys(("n", "n/a", "na", "not applicable"), "N"),
    **dict.fromkeys(("p", "prefer not to say", "prefer not to answer"), "P"),
    **dict.fromkeys(("u", "unknown"), None),
}
# Keys that name the user in a Braze object; a trait must not overwrite them.
_IDENTIFIER_KEYS = frozenset({"external_id", "user_alias", "braze_id", "_update_existing_only"})


def user_reference(event: Event, alias_label: str, update_existing_only: bool
                   ) -> dict[str, Any]:
    """How a Braze object names the event's user: ``external_id`` from userId, else a
    ``user_alias`` of the anonymousId under ``alias_label``.

    ``_update_existing_only`` applies to known users only: Braze creates alias-only users
    only when it is false ("User alias object").
    """
    if event.userId:
        return {"external_id": event.userId, "_update_existing_only": update_existing_only}
    return {"user_alias": anonymous_alias(event, alias_label), "_update_existing_only": False}


def anonymous_alias(event: Event, alias_label: str) -> dict[str, str]:
    return {"alias_name": event.anonymousId or "", "alias_label": alias_label}


def custom_event(name: str, event: Event, properties: Mapping[str, Any],
                 reference: Mapping[str, Any], app_id: str | None) -> dict[str, Any]:
    """One event object: ``name``, ISO-8601 ``time`` and the properties as they are."""
    if len(name) > MAX_NAME:
        raise EventRejected(f"event name is {len(name)} characters; Braze takes at most "
                            f"{MAX_NAME}")
    body = {**reference, **({"app_id": app_id} if app_id else {}), "name": name,
            "time": format_time(event.timestamp)}
    if properties:
        body["properties"] = checked_properties(properties, EVENT_RESERVED, "the event")
    return body


def checked_properties(properties: Mapping[str, Any], reserved: frozenset[str], owner: str
                       ) -> dict[str, Any]:
    """``properties`` as Braze takes them, else ``EventRejected`` with why: Braze refuses
    the whole object for a reserved name, an empty one, one over 255 characters or one that
    starts with ``$``, and keeps only the first 256 properties without a word."""
    if len(properties) > MAX_PROPERTIES:
        raise EventRejected(f"{owner} has {len(properties)} properties; Braze keeps only the "
                            f"first {MAX_PROPERTIES} and drops the rest without an error")
    for name in properties:
        if name in reserved:
            raise EventRejected(
                f"{owner} has a property named {name!r}, which Braze reserves (it refuses the "
                "object with \"Invalid 'properties' field\"); rename it where the event is "
                "made")
        if not name or len(name) > MAX_NAME or name.startswith("$"):
            raise EventRejected(f"{owner} has a property named {name[:40]!r}; Braze takes "
                                f"property names of 1 to {MAX_NAME} characters, not starting "
                                "with $")
    return dict(properties)


def _product_id(product: Mapping[str, Any]) -> str | None:
    """``product_id``, else ``sku``, as text: shops number their products (Shopify's ids are
    integers), and Braze takes the id as a string."""
    for key in ("product_id", "sku"):
        value = product.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value:
            return value
    return None


def purchases(event: Event, reference: Mapping[str, Any], app_id: str | None
              ) -> list[dict[str, Any]]:
    """One purchase object per product, as Braze records purchases (Segment's and
    RudderStack's Order Completed mapping). Braze requires ``product_id``, ``currency`` and
    ``price``, so a product without them rejects the order rather than losing revenue silently.
    """
    currency = event.properties.get("currency") or "USD"
    order = {key: event.properties[key] for key in ("order_id", "checkout_id", "coupon")
             if event.properties.get(key) is not None}
    found = []
    for index, product in enumerate(products(event), start=1):
        product_id = _product_id(product)
        if product_id is None:
            raise EventRejected(f"product {index} has no product_id or sku; Braze needs one "
                                "for each purchase")
        if len(product_id) > MAX_NAME:
            raise EventRejected(f"product {index}: product_id is over {MAX_NAME} characters")
        price = as_number(product.get("price"))
        if price is None:
            raise EventRejected(f"product {index} has no numeric price; Braze needs one for "
                                "each purchase")
        quantity = _quantity(product.get("quantity", 1), index)
        details = {key: value for key, value in product.items()
                   if key not in ("product_id", "price", "quantity", "currency")}
        found.append({**reference, **({"app_id": app_id} if app_id else {}),
                      "product_id": product_id, "currency": currency, "price": price,
                      "quantity": quantity, "time": format_time(event.timestamp),
                      "properties": checked_properties({**order, **details},
                                                       PURCHASE_RESERVED, f"product {index}")})
    return found


def _quantity(value: Any, index: int) -> int:
    number = as_number(value)
    if number is None or number != int(number):
        raise EventRejected(f"product {index}: quantity must be a whole number for Braze")
    if not 1 <= number <= MAX_QUANTITY:
        raise EventRejected(f"product {index}: quantity {int(number)} is outside 1..{MAX_QUANTITY}"
                            ", which Braze accepts")
    return int(number)


def attributes(traits: Mapping[str, Any]) -> dict[str, Any]:
    """Traits as Braze attributes: its standard names where it has them (email, first_name,
    gender M/F/O/N/P or null, dob YYYY-MM-DD, home_city, country), the rest as custom
    attributes. A gender Braze does not take is left out rather than sent."""
    found: dict[str, Any] = {}
    for key, value in traits.items():
        if key in _IDENTIFIER_KEYS:
            continue
        if key in STANDARD_ATTRIBUTES:
            found[STANDARD_ATTRIBUTES[key]] = value
        elif key == "gender":
            if value is None:
                found["gender"] = None  # null: unknown, as given
            elif (gender := _gender_key(value)) in _GENDERS:
                found["gender"] = _GENDERS[gender]
            # any other value is not one Braze's gender takes: not sent
        elif key == "birthday" and _iso_date(value):
            found["dob"] = _iso_date(value)
        elif key == "address" and isinstance(value, dict):
            if value.get("city"):
                found["home_city"] = value["city"]
            if value.get("country"):
                found["country"] = value["country"]
            found["address"] = dict(value)
        else:
            found[key] = value
    return found


def _gender_key(value: Any) -> str | None:
    """A gender as a ``_GENDERS`` key: case-insensitive, trimmed, ``-``/``_`` as spaces and
    runs of spaces as one ("Non-Binary" → "non binary"); None when it is not text."""
    if not isinstance(value, str):
        return None
    return " ".join(value.replace("-", " ").replace("_", " ").lower().split())


def _iso_date(value: Any) -> str | None:
    """``YYYY-MM-DD`` from a date or an ISO date-time string, else None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10]).isoformat()
    except ValueError:
        return None


def page_event_name(event: Event) -> str:
    """"Viewed {name} Page" / "Loaded a Page" (screens likewise), as Segment names them."""
    kind = "Screen" if event.type == "screen" else "Page"
    return f"Viewed {event.name} {kind}" if event.name else f"Loaded a {kind}"


def identify_alias(external_id: str, alias: Mapping[str, str]) -> dict[str, Any]:
    """An ``aliases_to_identify`` entry: the alias-only profile becomes (or merges into) the
    user with ``external_id`` ("Identify users")."""
    return {"external_id": external_id, "user_alias": dict(alias)}
