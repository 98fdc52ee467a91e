"""The Segment / Customer.io event spec as a pydantic model, and its normalization.

``parse_event`` is the door every raw event comes through (HTTP, ``router send``,
``Router.route``), so the rules of the contract live here: required fields per call type,
unknown fields kept, ``messageId`` generated, timestamps corrected for client clock skew,
reserved properties normalized, the 32 KB size limit. The HTTP API adds checks of its own
before it (``router.server.parsing``: NUL characters, nesting depth, integers beyond 64 bits),
and an ``Event`` built by an embedding program is routed as it is.
"""

from __future__ import annotations

import functools

import math
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, UTC
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.currencies import ISO_4217_CODES
from router.errors import InvalidEvent

T = TypeVar("T")

CallType = Literal["track", "identify", "page", "screen", "group", "alias"]
CALL_TYPES: tuple[str, ...] = ("track", "identify", "page", "screen", "group", "alias")

MAX_EVENT_BYTES = 32 * 1024
"""Segment and Customer.io refuse an event over 32 KB serialized; so do we, wherever it enters."""

DEFAULT_CURRENCY = "USD"
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
_PROPERTY_CALLS = frozenset({"track", "page", "screen"})
_TRAIT_CALLS = frozenset({"identify", "group"})


class Event(BaseModel):
    """A normalized event. Unknown top-level fields are kept (``model_extra``)."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True,
                              coerce_numbers_to_str=True, frozen=False)

    type: CallType
    messageId: str
    timestamp: datetime
    receivedAt: datetime
    userId: str | None = None
    anonymousId: str | None = None
    event: str | None = None
    name: str | None = None
    groupId: str | None = None
    previousId: str | None = None
    # default_factory, not `= {}`: pydantic deep-copies a mutable default for every event
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] | None = None
    originalTimestamp: datetime | None = None
    sentAt: datetime | None = None
    version: int | str | None = None
    __slots__ = ("_shared", "_amount_problems")
    """``shared()``'s cache and ``amount_problems``: slots are cheap, and copies start empty."""

    @property
    def amount_problems(self) -> tuple[tuple[str, str], ...]:
        """What is wrong with the event's ``revenue``, ``value`` or ``currency``, as
        ``(field, message)`` pairs: a value that is not a number (``"$25.00"``) or not an
        ISO 4217 code, left in ``properties`` as the client sent it. Such an event is not
        refused: destinations that pass properties on as they came (``reads_amounts`` off)
        still get it, and the others find it invalid, each with these reasons."""
        return getattr(self, "_amount_problems", ())

    @property
    def user_key(self) -> str:
        """Who the event is about: the user id, else the anonymous id. Orders per-user work."""
        return user_key_of(self.__dict__)

    def to_dict(self, *, leave_out: Collection[str] = ()) -> dict[str, Any]:
        """The event as plain JSON data (timestamps as ISO-8601 strings), unset fields left out.

        This is what templates see as ``event`` and what the webhook sends by default. Built
        once per event (several destinations ask for it); each caller gets its own copy of
        the top level, while nested objects are shared and must not be changed.
        ``leave_out``, fields the caller does not want (the Segment forwarder drops three of
        the four timestamps): built afresh then, without formatting them (each formatted
        timestamp costs about 2,000 instructions, callgrind, ``bench.callgrind_route``).
        """
        if leave_out:
            return self._build_dict(leave_out)
        return dict(self.shared("router:to_dict", self._build_dict))

    def shared(self, key: str, build: Callable[..., T], *args: Any) -> T:
        """``build(*args)``, called once per event and key: every destination that asks with
        the same key gets the same object. A plugin whose payload body depends on the event
        alone (not on its settings or options) builds it this way, so that when several of
        its destinations are configured, the router serializes the body once for all of
        them (it recognizes the object). What it returns must not be changed. ``args`` spare
        a closure made for every call, most of which find the object built."""
        try:
            shared: dict[str, Any] | None = self._shared  # type: ignore[attr-defined]  # a slot
        except AttributeError:  # an Event not made by parse_event
            shared = None
        if shared is None:
            shared = {}
            object.__setattr__(self, "_shared", shared)
        built = shared.get(key, _NOT_BUILT)  # not a KeyError caught: raising costs more
        if built is _NOT_BUILT:
            built = shared[key] = build(*args)
        return built  # type: ignore[no-any-return]

    def _build_dict(self, leave_out: Collection[str] = ()) -> dict[str, Any]:
        fields = self.__dict__  # read so: see parse_event
        data: dict[str, Any] = {}
        for key, value in fields.items():
            if value is not None:
                data[key] = (format_time(value) if isinstance(value, datetime)
                             and key not in leave_out else value)
        extra = self.__pydantic_extra__
        if extra:
            data.update(extra)
        for key in leave_out:
            data.pop(key, None)
        # The model gives every event both maps; the spec gives each call type one of them.
        call_type = fields["type"]
        if not fields["properties"] and call_type not in _PROPERTY_CALLS:
            data.pop("properties", None)
        if not fields["traits"] and call_type not in _TRAIT_CALLS:
            data.pop("traits", None)
        return data


_NOT_BUILT = object()
"""What ``Event.shared`` finds for a key not built yet (a build may return None)."""

_validate_event: Callable[[dict[str, Any]], Event] = Event.__pydantic_validator__.validate_python


@functools.lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds, the way Segment writes timestamps. Cached: the
    events of a batch share their receive time, often their send time too, and formatting
    costs more than the look-up."""
    if moment.tzinfo is not UTC:
        moment = _utc(moment).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


_OBJECTS_NULL_MEANS_EMPTY = ("properties", "traits", "context")


def user_key_of(fields: Mapping[str, Any]) -> str:
    """``Event.user_key`` from the event's ``__dict__``, for a caller that holds it already:
    each read through the event goes through pydantic's ``__getattr__`` hook (about 400
    instructions)."""
    return fields["userId"] or fields["anonymousId"] or ""


def parse_event(raw: Any, *, received_at: datetime | None = None,
                max_bytes: int = MAX_EVENT_BYTES, size: int | None = None) -> Event:
    """Validate and normalize one raw event, or raise ``InvalidEvent`` naming each bad field.

    ``size`` is the size the limit applies to when the caller has measured it (the HTTP server
    does, on the event as the client sent it); otherwise the event is serialized to measure it.
    """
    if not isinstance(raw, dict):
        if not isinstance(raw, Mapping):
            raise InvalidEvent([("", "an event must be a JSON object")])
        raw = dict(raw)  # a MappingProxyType, say: what it holds must still be plain JSON
    if size is None:
        try:
            size = len(orjson.dumps(raw))
        except TypeError as exc:
            raise InvalidEvent([("", f"not JSON-serializable: {exc}")]) from None
    if size > max_bytes:
        raise InvalidEvent([("", f"event is {size} bytes, over the {max_bytes // 1024} KB limit")])

    received = received_at or datetime.now(UTC)
    data = dict(raw)
    for key in _OBJECTS_NULL_MEANS_EMPTY:  # some client libraries send null for "none"
        if key in data and data[key] is None:
            del data[key]
    data.setdefault("messageId", None)
    if not data["messageId"]:
        data["messageId"] = str(uuid.uuid4())
    # An event that carries a receivedAt comes as a pipeline stored it (a Segment export, the
    # spec's sample payloads): its timestamp was derived there, and the time to correct with
    # its sentAt is its originalTimestamp (without a sentAt, the derived timestamp stands).
    from_a_pipeline = data.get("receivedAt") is not None
    data["receivedAt"] = received
    data.pop("writeKey", None)  # a credential, never part of the event
    client_timestamp = data.get("timestamp")
    data["timestamp"] = received  # placeholder; corrected below once the fields are parsed
    try:
        # Event.model_validate's own work, without the Python call that passes its six
        # keyword arguments on (about 2,000 instructions an event, bench.callgrind_route).
        event = _validate_event(data)
    except ValidationError as exc:
        raise InvalidEvent(_problems(exc)) from None
    # The fields are read, and those set on every event written, in the model's __dict__:
    # through the event, each read goes through pydantic's __getattr__ hook (about 400
    # instructions) and each write through its __setattr__ (about 3,000), a dozen times an
    # event (callgrind, bench.callgrind_route).
    fields = event.__dict__
    # An id of spaces names no one, as an empty one does: sent on, every sender of "   "
    # became one person in each destination (data fidelity audit).
    user_id, anonymous_id = fields["userId"], fields["anonymousId"]
    if user_id and user_id[0].isspace() and not user_id.strip():
        event.userId = ""
    if anonymous_id and anonymous_id[0].isspace() and not anonymous_id.strip():
        event.anonymousId = ""
    # Unset slots would take pydantic's slow path.
    object.__setattr__(event, "_shared", None)
    object.__setattr__(event, "_amount_problems", ())

    problems = _call_type_problems(fields)
    client_time = None
    if client_timestamp is not None:
        try:
            client_time = _as_datetime(client_timestamp)
        except (ValidationError, ValueError):
            problems.append(("timestamp", "expected an ISO-8601 date-time"))
    if fields["originalTimestamp"] is None:
        # The client's own event time, else its clock at sending: keeping it makes the
        # normalized event parse again to the same timestamp at the same receive time.
        # Set as pydantic's __setattr__ sets a field (no validation on assignment).
        fields["originalTimestamp"] = client_time or fields["sentAt"]
        event.__pydantic_fields_set__.add("originalTimestamp")
    call_type, properties = fields["type"], fields["properties"]
    if call_type in _PROPERTY_CALLS and properties:
        amount_problems = normalize_reserved_properties(properties)
        if amount_problems:
            object.__setattr__(event, "_amount_problems", tuple(amount_problems))
    elif call_type == "identify" and not fields["traits"]:
        # RudderStack's libraries (Python among them) send identify traits only in
        # context.traits, where RudderStack reads them: every destination needs them in traits.
        context_traits = fields["context"].get("traits")
        if isinstance(context_traits, dict) and context_traits:
            event.traits = dict(context_traits)
    if not problems:
        try:
            client_event_time = (None if from_a_pipeline and fields["sentAt"] is not None
                                 else client_time)
            # Already among the fields set: the placeholder was.
            fields["timestamp"] = corrected_timestamp(event, client_event_time)
            problems = _out_of_range(fields)
        except OverflowError:
            problems = [("timestamp", "out of range once corrected for the client's clock "
                                      "(sentAt and originalTimestamp are far apart)")]
    if problems:
        raise InvalidEvent(problems)
    return event


def corrected_timestamp(event: Event, client_time: datetime | None) -> datetime:
    """Segment's clock-skew correction, ``receivedAt - (sentAt - <the client's event time>)``.

    The client's event time is ``client_time`` when the caller gives one (the client's own
    ``timestamp``; ``parse_event`` leaves it out for an event as a pipeline stored it), else
    its ``originalTimestamp``. A ``timestamp`` set on purpose wins even beside an
    ``originalTimestamp``: server libraries set it for historical imports, and RudderStack's
    Node library sends the caller's ``timestamp`` beside an ``originalTimestamp`` of its own
    clock at the call. Without ``sentAt`` there is nothing to correct with: that time is
    trusted as it is; without any, the receive time is the event time.
    """
    fields = event.__dict__  # read so, as parse_event does, since it runs for every event
    client_event_time = client_time if client_time is not None else fields["originalTimestamp"]
    if client_event_time is None:
        return fields["receivedAt"]
    sent_at = fields["sentAt"]
    if sent_at is not None:
        return fields["receivedAt"] - (_utc(sent_at) - _utc(client_event_time))
    return _utc(client_event_time)


def _out_of_range(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Times a destination could not write in UTC (within hours of year 1 or 9999, where
    the offset to UTC overflows): each is a problem, not a crash while translating.
    ``fields``: the event's ``__dict__``."""
    problems = []
    for field in TIMESTAMP_FIELDS:
        moment = fields[field]
        if moment is not None and moment.year in (1, 9999):
            try:
                _utc(moment).astimezone(UTC)
            except OverflowError:
                problems.append((field, "out of range: it cannot be written in UTC"))
    return problems


def normalize_reserved_properties(properties: dict[str, Any]) -> list[tuple[str, str]]:
    """Make ``revenue``/``value`` numbers and ``currency`` an upper-case ISO 4217 code, in place
    (a value that is neither is left as it is);
    numeric strings in the e-commerce spec's other amounts (``total``, ``subtotal``,
    ``shipping``, ``tax``, ``discount``, ``price``, ``quantity``) and in each product's
    ``price`` and ``quantity`` become numbers too (vendors such as GA4 drop a string price
    silently, and several take an order's ``total`` as its value).

    Returns the problems found, as ``(field, message)`` pairs.
    """
    if _RESERVED_PROPERTIES.isdisjoint(properties):  # most pages and screens: nothing to do
        return []
    properties.update(_numbers_from_numeric_strings(properties, ORDER_AMOUNTS))
    products = properties.get("products")
    if isinstance(products, list):
        properties["products"] = [_with_numbers(product) for product in products]
    problems: list[tuple[str, str]] = []
    for key in ("revenue", "value"):
        if key in properties and properties[key] is not None:
            number = _amount(properties[key])
            if number is None:
                problems.append((f"properties.{key}", "expected a number or a numeric string"))
            else:
                properties[key] = number
    currency = properties.get("currency")
    if currency is not None:
        code = currency.strip().upper() if isinstance(currency, str) else None
        if code not in ISO_4217_CODES:
            problems.append(("properties.currency",
                             "expected an ISO 4217 currency code such as USD or EUR"))
        else:
            properties["currency"] = code
    elif type(properties.get("revenue")) in (int, float):  # not a value left as it came
        properties["currency"] = DEFAULT_CURRENCY
    return problems


ORDER_AMOUNTS = ("total", "subtotal", "shipping", "tax", "discount", "price", "quantity")
PRODUCT_AMOUNTS = ("price", "quantity")
_RESERVED_PROPERTIES = frozenset((*ORDER_AMOUNTS, "products", "revenue", "value", "currency"))
"""What ``normalize_reserved_properties`` may change."""


def _with_numbers(product: Any) -> Any:
    """A product with its amounts as numbers: a copy when one changes, since the product is
    the caller's own (``route()`` takes the caller's objects)."""
    if not isinstance(product, dict):
        return product
    numbers = _numbers_from_numeric_strings(product, PRODUCT_AMOUNTS)
    return {**product, **numbers} if numbers else product


def _numbers_from_numeric_strings(item: Mapping[str, Any], keys: tuple[str, ...]
                                  ) -> dict[str, int | float]:
    """The amounts ``keys`` names that ``item`` gives as numeric strings ("19.99", "2"), as
    numbers; anything else is left for each destination to judge."""
    numbers: dict[str, int | float] = {}
    for key in keys:
        value = item.get(key)
        if isinstance(value, str):
            number = _amount(value)
            if number is not None:
                numbers[key] = number
    return numbers


def _amount(value: Any) -> float | int | None:
    """``as_number``, with a numeric string of digits alone, signed or not, as an int
    (``"30"`` is 30, as ``30`` is, not 30.0; ``"-30"`` is -30) while a double holds it
    exactly: past that, an int would outgrow JSON's 64 bits (orjson refuses it)."""
    number = as_number(value)
    if number is not None and isinstance(value, str) \
            and value.strip().removeprefix("-").removeprefix("+").isdigit() \
            and abs(number) < 2**53:
        return int(number)
    return number


NUMERIC_STRING = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*", re.ASCII)
"""A number as JSON and JavaScript's ``Number()`` write it, with a sign and spaces allowed.
Python's ``float`` accepts more: ``1_000``, ``infinity`` and digits of other scripts
(``"١٢"``), which a client meant as text, and which would be a different number, or none,
to every other system that reads the same event."""


def as_number(value: Any) -> float | int | None:
    """A finite number from a number or a numeric string; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and NUMERIC_STRING.fullmatch(value):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _call_type_problems(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What the event's call type requires and it lacks. ``fields``: the event's
    ``__dict__`` (see ``parse_event``)."""
    problems: list[tuple[str, str]] = []
    call_type, user_id = fields["type"], fields["userId"]
    if not user_id and not fields["anonymousId"]:
        problems.append(("userId", "one of userId or anonymousId is required"))
    if call_type == "track":
        name = fields["event"]
        if not (name and name.strip()):
            problems.append(("event", "required for a track call (the name of the action)"))
    elif call_type == "group" and not fields["groupId"]:
        problems.append(("groupId", "required for a group call"))
    elif call_type == "alias":
        if not fields["previousId"]:
            problems.append(("previousId", "required for an alias call"))
        if not user_id:
            problems.append(("userId", "required for an alias call (the new id)"))
    for key, value in (fields["integrations"] or {}).items():
        # Read case-insensitively; checked so, lowering only what may be it (hot path).
        if len(key) == 3 and key.lower() == "all" and not isinstance(value, bool):
            problems.append((f"integrations.{key}", "expected true or false"))
    return problems


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Field paths and messages only: pydantic's input echo could carry a secret."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "literal_error" and field == "type":
            message = "expected one of " + ", ".join(CALL_TYPES)
        elif error["type"].startswith(("datetime_", "date_")):  # sentAt, as timestamp says it
            message = "expected an ISO-8601 date-time"
        problems.append((field, message))
    return problems


class _Moment(BaseModel):
    at: datetime


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        try:  # the common case, ISO-8601, without a pydantic round trip
            return _utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    return _utc(_Moment(at=value).at)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
