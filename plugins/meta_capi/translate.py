"""How a Segment-spec event becomes one Meta Conversions API server event.

Meta refuses a whole request when one of its events is invalid ("If any event_time in data is
greater than 7 days in the past, we return an error for the entire request and process no
events", Server Event Parameters), so each rule is checked here, per event, and breaking one
raises ``EventRejected`` instead of sinking the batch it would have travelled in.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from datetime import date, timedelta
from typing import Any, TypeGuard

import phonenumbers

from router import Event, EventRejected
from router import semantics as spec

from .countries import ALPHA_2_BY_NAME

CLOCK_SKEW = timedelta(minutes=1)
"""How far a timestamp may be ahead of receipt: a sender's clock running fast."""
MAX_EVENT_AGE = timedelta(days=7)  # Server Event Parameters, event_time
CUSTOM_EVENT_NAME_MAX = 50  # Meta Pixel reference: custom event names up to 50 characters

# destinations.md §2.2 (RT facebook_conversions/config.js). Names are case-sensitive.
STANDARD_EVENTS: dict[str, str] = {
    spec.PRODUCT_LIST_VIEWED: "ViewContent",
    spec.PRODUCT_VIEWED: "ViewContent",
    spec.PRODUCT_ADDED: "AddToCart",
    spec.CHECKOUT_STARTED: "InitiateCheckout",
    spec.PAYMENT_INFO_ENTERED: "AddPaymentInfo",
    spec.PRODUCT_ADDED_TO_WISHLIST: "AddToWishlist",
    spec.PRODUCTS_SEARCHED: "Search",
    spec.ORDER_COMPLETED: "Purchase",
}

# Trait names (Segment spec, both spellings) that feed user_data. Never passed on as
# custom_data: Meta's terms forbid unhashed contact information outside user_data.
EMAIL_KEYS = ("email",)
PHONE_KEYS = ("phone",)
FIRST_NAME_KEYS = ("firstName", "first_name")
LAST_NAME_KEYS = ("lastName", "last_name")
BIRTHDAY_KEYS = ("birthday",)
GENDER_KEYS = ("gender",)
ADDRESS_KEYS = {"ct": ("city",), "st": ("state",), "zp": ("postalCode", "postal_code", "zip"),
                "country": ("country",)}
PII_KEYS = frozenset({*EMAIL_KEYS, *PHONE_KEYS, *FIRST_NAME_KEYS, *LAST_NAME_KEYS, "name",
                      *BIRTHDAY_KEYS, *GENDER_KEYS, "address",
                      *(key for keys in ADDRESS_KEYS.values() for key in keys), "fbc", "fbp"})

_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
_ISO_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?:\Z|[T ])")
GENDERS = {"f": "f", "female": "f", "m": "m", "male": "m"}
_US_ZIP = re.compile(r"(\d{5})-?\d{4}\Z")


# --- event name and time -------------------------------------------------------------------

def event_name(event: Event) -> str:
    """The standard event a spec event maps to; page and screen are PageView; any other track
    keeps its own name as a custom event."""
    if event.type in ("page", "screen"):
        return "PageView"
    name = event.event or ""
    standard = STANDARD_EVENTS.get(name)
    if standard:
        return standard
    if len(name) > CUSTOM_EVENT_NAME_MAX:
        raise EventRejected(f"Meta custom event names take at most {CUSTOM_EVENT_NAME_MAX} "
                            f"characters; {name[:20]!r}... has {len(name)}")
    return name


def event_time(event: Event, *, margin: timedelta) -> int:
    """Unix seconds, after checking Meta's window: not in the future, at most 7 days old.

    Both are measured from ``receivedAt`` (translate must be deterministic); ``margin`` is
    kept free for retries, since one stale event fails its whole request.
    """
    # Each read once: an event's fields are pydantic attributes, slower to read than locals.
    timestamp, received = event.timestamp, event.receivedAt
    if timestamp - received > CLOCK_SKEW:
        raise EventRejected("the event's timestamp is over a minute after the router received "
                            "it; Meta refuses event_time in the future")
    age = received - timestamp
    if age > MAX_EVENT_AGE - margin:
        raise EventRejected(f"the event happened {age / timedelta(days=1):.1f} days before it "
                            f"was received; Meta refuses event_time over 7 days old, and "
                            f"this leaves {margin / timedelta(hours=1):.0f} h for retries")
    # A sender's clock a little fast (a server library sends no sentAt to correct it) is
    # read as the moment of receipt, which is never in the future when Meta gets it.
    return int(min(timestamp, received).timestamp())


# --- required fields and options ----------------------------------------------------------

def source_url(event: Event) -> str | None:
    """The page the event happened on: a page call's own url, else ``context.page.url``."""
    if event.type == "page" and isinstance(event.properties.get("url"), str):
        return event.properties["url"]
    page = event.context.get("page")
    url = page.get("url") if isinstance(page, dict) else None
    return url if isinstance(url, str) and url else None


def check_required(server_event: Mapping[str, Any]) -> None:
    """Meta's required parameters per action source (Server Event Parameters)."""
    source = server_event["action_source"]
    if source == "website":
        if "event_source_url" not in server_event:
            raise EventRejected("Meta website events need event_source_url: the event has no "
                                "context.page.url (set action_source for server-side events)")
        if "client_user_agent" not in server_event["user_data"]:
            raise EventRejected("Meta website events need client_user_agent: the event has no "
                                "context.userAgent (set action_source for server-side events)")
    if source == "app" and "app_data" not in server_event:
        raise EventRejected("Meta app events need app_data: give it in the integrations "
                            "options")


def processing_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Limited Data Use (CCPA): ``data_processing_options: ["LDU"]``, with country 1 (US) and
    state 1000 (California), or 0 to let Meta geolocate (Data Processing Options docs)."""
    if "data_processing_options" not in options:
        return {}
    flags = options["data_processing_options"]
    if not isinstance(flags, list) or any(flag != "LDU" for flag in flags):
        raise EventRejected('data_processing_options must be [] or ["LDU"]')
    result: dict[str, Any] = {"data_processing_options": flags}
    for key in ("data_processing_options_country", "data_processing_options_state"):
        value = options.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise EventRejected(f"{key} must be an integer (0 lets Meta geolocate)")
            result[key] = value
    if flags and "data_processing_options_country" not in result:
        result["data_processing_options_country"] = 0
        result["data_processing_options_state"] = result.get(
            "data_processing_options_state", 0)
    return result


# --- user_data -----------------------------------------------------------------------------

def user_data(event: Event, options: Mapping[str, Any]) -> dict[str, Any]:
    """Customer information: contact fields normalized and SHA-256 hashed, the ids hashed,
    IP, user agent, fbc and fbp as they are (Customer Information Parameters)."""
    traits = _traits(event)
    data: dict[str, Any] = {}
    if traits:  # most track and page calls carry none: no contact fields to look for
        _contact_fields(data, traits)
    ids = [sha256(str(value)) for value in (event.userId, event.anonymousId) if value]
    if ids:
        data["external_id"] = ids
    context = event.context  # read once: a pydantic attribute, slower to read than a local
    if isinstance(context.get("ip"), str):
        data["client_ip_address"] = context["ip"]
    if isinstance(context.get("userAgent"), str):
        data["client_user_agent"] = context["userAgent"]
    for key in ("fbc", "fbp"):  # click id and browser id cookies, sent unhashed
        value = options.get(key) or context.get(key) or traits.get(key)
        if isinstance(value, str) and value:
            data[key] = value
    return data


def _contact_fields(data: dict[str, Any], traits: Mapping[str, Any]) -> None:
    """The hashed contact fields (em, ph, fn, ln, db, ge and the address's) into ``data``."""
    address = traits.get("address")
    if not isinstance(address, Mapping):
        address = {}
    _put_hashed(data, "em", _first(traits, EMAIL_KEYS), normalize_email)
    country = _first(address, ADDRESS_KEYS["country"]) or _first(traits, ADDRESS_KEYS["country"])
    code = normalize_country(country) if isinstance(country, str) else None
    _put_hashed(data, "ph", _first(traits, PHONE_KEYS), lambda phone: normalize_phone(phone, code))
    _put_hashed(data, "fn", _first(traits, FIRST_NAME_KEYS), normalize_name)
    _put_hashed(data, "ln", _first(traits, LAST_NAME_KEYS), normalize_name)
    _put_hashed(data, "db", _first(traits, BIRTHDAY_KEYS), normalize_birthday)
    _put_hashed(data, "ge", _first(traits, GENDER_KEYS), normalize_gender)
    in_us = not isinstance(country, str) or code == "us"  # an address naming no country too
    normalizers = {"ct": normalize_name, "st": lambda state: normalize_state(state, in_us=in_us),
                   "zp": lambda zip_code: normalize_zip(zip_code, in_us=in_us),
                   "country": lambda _: code}
    for key, names in ADDRESS_KEYS.items():
        _put_hashed(data, key, _first(address, names) or _first(traits, names), normalizers[key])


US_STATE_CODES: dict[str, str] = {  # names as normalize_name leaves them
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "newhampshire": "nh", "newjersey": "nj",
    "newmexico": "nm", "newyork": "ny", "northcarolina": "nc", "northdakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa", "rhodeisland": "ri",
    "southcarolina": "sc", "southdakota": "sd", "tennessee": "tn", "texas": "tx",
    "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa", "westvirginia": "wv",
    "wisconsin": "wi", "wyoming": "wy", "puertorico": "pr", "guam": "gu",
    "usvirginislands": "vi", "americansamoa": "as", "northernmarianaislands": "mp",
}
"""Meta matches ``st`` on the two-letter code for US states (Customer Information
Parameters: "use the 2-character ANSI abbreviation code in lowercase")."""


def normalize_email(value: str) -> str:
    return value.strip().lower()


MAX_PHONE_TEXT = 64
"""Longer text is no phone number: it is reduced to its digits, not read or cached."""


def normalize_phone(value: str, country: str | None = None) -> str:
    """Digits with the country code, which Meta needs to match a phone (Customer Information
    Parameters). A number written with ``+``, or whose digits start with the code of
    ``country`` and make a valid number so, keeps its own code (``4915123456789`` in DE);
    a national one takes the code of ``country``, the user's, when the event names it,
    without its trunk prefix (``07911 123456`` in GB is ``447911123456``). libphonenumber's
    metadata knows each country's code, prefixes and number lengths. Anything it cannot read:
    digits only, without leading zeros."""
    if len(value) > MAX_PHONE_TEXT:
        return re.sub(r"\D", "", value).lstrip("0")
    return _phone_digits(value, country.upper() if country else None)


@functools.lru_cache(maxsize=1024)
def _phone_digits(value: str, region: str | None) -> str:
    """Cached: reading a number costs libphonenumber 14-17 µs, as much as the rest of the
    event's translation, and a user's events carry the same phone."""
    digits = re.sub(r"\D", "", value)
    readings = [_parsed(value, region)]
    if region and not value.lstrip().startswith("+") and digits.startswith(
            str(phonenumbers.country_code_for_region(region))):
        readings.insert(0, _parsed("+" + digits, None))  # the code written without its +
    for check in (phonenumbers.is_valid_number, phonenumbers.is_possible_number):
        for number in readings:
            if number is not None and check(number):
                return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]
    return digits.lstrip("0")


def _parsed(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def normalize_name(value: str) -> str:
    """Lower case without spaces or punctuation (fn, ln, ct, st); UTF-8 letters are kept."""
    return "".join(char for char in value.lower() if char.isalnum())


def normalize_birthday(value: str) -> str | None:
    """YYYYMMDD, from the date an ISO-8601 ``birthday`` starts with (Segment's libraries
    send a date, or a date and time); None for any other spelling, whose order of day and
    month cannot be told, or a date that does not exist or lies before 1900."""
    found = _ISO_DATE.match(value.strip())
    if not found:
        return None
    year, month, day = (int(part) for part in found.groups())
    try:
        date(year, month, day)
    except ValueError:
        return None
    return f"{year:04d}{month:02d}{day:02d}" if year >= 1900 else None


def normalize_gender(value: str) -> str | None:
    """``f`` or ``m``, the two values Meta matches on; anything else is left out."""
    return GENDERS.get(value.strip().lower())


def normalize_state(value: str, *, in_us: bool) -> str:
    """A US state's name as its two-letter code, which Meta matches on; any other state
    lower case without spaces or punctuation, as Meta asks outside the US."""
    name = normalize_name(value)
    return US_STATE_CODES.get(name, name) if in_us else name


def normalize_zip(value: str, *, in_us: bool) -> str:
    """Lower case without spaces or dashes; only the first 5 digits of a US ZIP+4."""
    compact = value.strip().lower().replace(" ", "")
    us = _US_ZIP.match(compact)
    if us and in_us:
        return us.group(1)
    return compact.replace("-", "")


def normalize_country(value: str) -> str | None:
    """ISO 3166-1 alpha-2 in lower case, which Meta matches on: a two-letter code as it is,
    an alpha-3 code (``USA``) or an English name (``Germany``, ``United States``) looked up;
    anything else is left out."""
    code = value.strip().lower()
    known = ALPHA_2_BY_NAME.get(country_key(code))  # also "uk", which is "gb" to ISO
    if known is not None:
        return known
    return code if len(code) == 2 and code.isalpha() else None


def country_key(name: str) -> str:
    """A country's name as the table is keyed: lower case, letters and digits only, accents
    dropped ("Côte d'Ivoire" and "Cote d'Ivoire" are one key)."""
    letters = unicodedata.normalize("NFKD", normalize_name(name))
    return "".join(char for char in letters if not unicodedata.combining(char))


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _put_hashed(data: dict[str, Any], key: str, value: Any,
                normalize: Callable[[Any], str | None]) -> None:
    """Normalize then hash ``value`` into ``data[key]``; a value that is already a SHA-256
    hex digest is passed as it is (Meta's SDKs do the same)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return
    if _SHA256_HEX.match(value):
        data[key] = value
        return
    normalized = normalize(value)
    if normalized:
        data[key] = sha256(normalized)


def _traits(event: Event) -> Mapping[str, Any]:
    """The user's traits as track and page calls carry them (``context.traits``)."""
    traits = event.context.get("traits")
    return {**(traits if isinstance(traits, dict) else {}), **event.traits}


# --- custom_data ---------------------------------------------------------------------------

# Properties used up by the money and product fields below.
MONEY_KEYS = frozenset({"revenue", "total", "value", "currency"})
PRODUCT_KEYS = frozenset({"product_id", "sku", "name", "price", "quantity", "category",
                          "brand", "variant", "position", "url", "image_url"})


def custom_data(event: Event, name: str) -> dict[str, Any]:
    """Money, products, order id and the remaining properties (without contact data).

    value ← revenue ‖ total ‖ value (destinations.md §2.2); a single-product event without
    any of them is worth price × quantity.
    """
    props = event.properties
    data: dict[str, Any] = {key: value for key, value in props.items()
                            if key not in MONEY_KEYS and key not in PII_KEYS
                            and key != "products" and value is not None}
    value = _first(props, ("revenue", "total", "value"))
    listed = spec.products(event)
    single = "products" not in props and bool(listed)
    if single:
        for key in PRODUCT_KEYS:
            data.pop(key, None)
        if value is None and _is_number(props.get("price")):
            value = props["price"] * _quantity(props)
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventRejected(f"custom_data.value (the first of revenue, total, value) is "
                                f"not a number: {value!r}")
        data["value"] = value
    if props.get("currency") is not None:
        data["currency"] = props["currency"]
    if listed:
        data.update(_contents(listed))
    if single:
        for meta_key, segment_key in (("content_name", "name"), ("content_category", "category")):
            if props.get(segment_key) is not None:
                data[meta_key] = props[segment_key]
    if event.type == "page":
        data.pop("url", None)  # it is the event's event_source_url
    if name == "Search" and props.get("query") is not None:
        data["search_string"] = data.pop("query")
    if name == "Purchase":
        _check_purchase(data)
    return data


def _contents(listed: list[dict]) -> dict[str, Any]:
    contents = []
    for position, product in enumerate(listed):
        product_id = _first(product, ("product_id", "sku"))
        if product_id is None:
            raise EventRejected(f"product {position} has no product_id or sku; Meta needs an "
                                f"id in contents and content_ids")
        content: dict[str, Any] = {"id": str(product_id),
                                   "quantity": math.ceil(_quantity(product))}
        if _is_number(product.get("price")):
            content["item_price"] = product["price"]
        contents.append(content)
    return {"content_ids": [content["id"] for content in contents], "contents": contents,
            "num_items": sum(content["quantity"] for content in contents),
            "content_type": "product"}


def _check_purchase(data: Mapping[str, Any]) -> None:
    """Meta answers a Purchase without value or currency with error 100, subcode 2804010.
    Normalization adds USD whenever revenue is set, so only total/value alone can get here."""
    if data.get("value") is None:
        raise EventRejected("Meta needs a value on Purchase: set revenue, total or value")
    if data.get("currency") is None:
        raise EventRejected("Meta needs a currency on Purchase: set properties.currency")


def _quantity(product: Mapping[str, Any]) -> int | float:
    """A product's quantity, 1 when it has none that makes sense (an embedding program can
    pass ``inf``, which no JSON body can). A fraction (0.5 kg) counts as given in the value;
    ``contents`` rounds it up, Meta's ``quantity`` being a whole number (it was cut to 0,
    and the value with it: data fidelity audit)."""
    quantity = product.get("quantity")
    if _is_number(quantity) and 0 < quantity < 2**31:
        return quantity
    return 1


def _is_number(value: Any) -> TypeGuard[int | float]:
    """An int or float, not a bool: ``True`` is an int to Python, never a price to Meta."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first(data: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None
