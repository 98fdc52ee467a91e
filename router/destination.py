"""What a destination type provides: the whole public contract between the core and an adapter.

A destination is a class with pure methods. The core calls them in this order::

    translate(event, options)   -> [Payload, ...]     once per event, when it is routed
    build_request(payloads)     -> HttpRequest        once per batch, when it is sent
    read_response(payloads, r)  -> [outcome, ...]     once per answer, to judge each payload

None of them does I/O, sleeps or retries: the core owns the HTTP session, the retry policy,
batching, rate limits and the spool. That is what makes an adapter testable without a network
and what keeps every destination's delivery behaviour the same.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, NamedTuple, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from router.errors import DestinationError, EventRejected, problems_text
from router.events import Event

DEFAULT_RETRY_STATUSES: frozenset[int] = frozenset({408, 423, 425, 429, *range(500, 600)})
"""Statuses retried unless a destination's ``delivery.retry_on`` says otherwise: timeouts,
throttling and every server error, as the contract promises. Not only the registered ones:
Cloudflare answers 520-524 and 530 for an origin that is down for a moment, and Segment's
set, which stops at 511, dead-lettered those events at their first attempt."""


class Payload(NamedTuple):
    """One translated unit of work for one destination: the JSON-able ``body`` a request will
    carry for this event, and the ``group`` it may share a batch request with.

    Payloads of one destination are batched only with payloads of the same ``group``; use it
    when one API has several endpoints (``"import"`` and ``"engage"``), or per-event options
    that change the request (another project token). The body must not contain secrets:
    credentials belong in ``build_request``, so they never reach the spool or dead letters.
    """

    body: Any
    group: str = ""


@dataclass(slots=True)
class HttpRequest:
    """A request described, not sent: what ``build_request`` returns and dry-run prints.
    A ``str`` body is accepted and sent as UTF-8 (the core turns it into bytes first)."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @classmethod
    def json(cls, method: str, url: str, data: Any, headers: Mapping[str, str] | None = None
             ) -> HttpRequest:
        """A request whose body is ``data`` as JSON, with the matching content type."""
        all_headers = {"Content-Type": "application/json"}
        if headers:
            all_headers.update(headers)
        return cls(method, url, all_headers, orjson.dumps(data))


@dataclass(slots=True)
class HttpResponse:
    """An answer from a destination's API, as ``read_response`` sees it."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None


Outcome = DestinationError | None
"""What happened to one payload: None when delivered, else a ``RetryableError`` or a
``PermanentError`` saying why."""


# -- what each method must return ------------------------------------------------------------
# Checked by the core where it calls the method (a mistake then costs only the plugin's own
# events) and by the conformance suite (which adds stricter rules of style). Each returns
# what is wrong, worded to follow "<method> returned", or None.

_TOKEN_CHARACTERS = frozenset("!#$%&'*+-.^_`|~0123456789"
                              "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
"""What an HTTP method or header name may be made of (RFC 9110's ``token``)."""


def payloads_problem(payloads: Any) -> str | None:
    """``translate`` must return a list of ``Payload``, each with a ``str`` group: anything
    else would break the batching of every event queued behind it."""
    if not isinstance(payloads, (list, tuple)):
        return f"{type(payloads).__name__}, not a list of Payload"
    for index, payload in enumerate(payloads):
        if not isinstance(payload, Payload) or not isinstance(payload.group, str):
            return f"item {index} {payload!r:.200}, not a Payload with a str group"
    return None


def checked_payloads(payloads: Any) -> Sequence[Payload]:
    """``translate``'s answer, if the core can queue it; else a ``TypeError`` that counts as
    the plugin's failure for this event only. The usual answer, a list of ``Payload`` with
    ``str`` groups, passes here without calling ``payloads_problem``: this runs for every
    event and destination, and the call cost more than the check."""
    if type(payloads) is list:
        for payload in payloads:
            if type(payload) is not Payload or type(payload.group) is not str:
                break  # perhaps a subclass, which is fine: payloads_problem says
        else:
            return payloads
    problem = payloads_problem(payloads)
    if problem:
        raise TypeError(f"translate returned {problem}")
    return payloads


def refuse_unread_amounts(destination: Destination[Any], event: Event) -> None:
    """``EventRejected`` with the reasons when ``event`` has amounts the router could not read
    (``Event.amount_problems``) and ``destination`` relies on them (``reads_amounts``): such
    an event never reaches its ``translate``. The router, the harness and the conformance
    suite all ask here, so a plugin's tests meet the rule as production does. The
    destination is asked first: it is a plain attribute, while the event's is a property
    behind pydantic's attribute hook (about 1,000 instructions), and this runs for every
    event and destination."""
    if destination.reads_amounts and event.amount_problems:
        raise EventRejected(problems_text(event.amount_problems))


def checked_request(request: Any) -> HttpRequest:
    """``build_request``'s answer, if it can be sent as it is; else a ``TypeError`` that fails
    the batch with the plugin's name, instead of an error deep in the transport that would
    leave the jobs leased and unrecorded."""
    problem = request_problem(request)
    if problem:
        raise TypeError(f"build_request returned {problem}")
    if isinstance(request.body, str):  # allowed, and sent as UTF-8, as aiohttp would send it
        request.body = request.body.encode()
        if not any(name.lower() == "content-type" for name in request.headers):
            # aiohttp's type for a str; bytes without one would go as application/octet-stream
            request.headers = {**request.headers, "Content-Type": "text/plain; charset=utf-8"}
    return request


def checked_outcomes(judged: Any, count: int) -> list[Outcome]:
    """``read_response``'s answer for ``count`` payloads, if the core can record it; else a
    ``TypeError``, after which the answer is judged by its status."""
    outcomes = list(judged)
    problem = outcomes_problem(outcomes, count)
    if problem:
        raise TypeError(f"read_response returned {problem}")
    return outcomes


def request_problem(request: Any) -> str | None:
    """``build_request`` must return an ``HttpRequest`` that can be sent as it is."""
    if not isinstance(request, HttpRequest):
        return f"{type(request).__name__}, not an HttpRequest"
    if not _is_token(request.method):
        return f"a method {request.method!r:.40} that is not an HTTP token"
    if not isinstance(request.url, str):
        return f"a {type(request.url).__name__} URL, not a str"
    # A dict, as nearly every plugin builds, is taken without asking the Mapping ABC, whose
    # isinstance is a call into Python's abc module (this runs for every request).
    if type(request.headers) is not dict and not isinstance(request.headers, Mapping):
        return _BAD_HEADERS
    for name, value in request.headers.items():  # a loop, not a generator: every request
        if not (_is_token(name) and isinstance(value, str) and "\r" not in value
                and "\n" not in value):
            return _BAD_HEADERS
    if request.body is not None and not isinstance(request.body, (bytes, str)):
        return f"a {type(request.body).__name__} body, not bytes or str"
    return None


_BAD_HEADERS = "headers that are not str names and values without line breaks"


def outcomes_problem(outcomes: list[Any], count: int) -> str | None:
    """``read_response`` must return one outcome a payload: None, or a ``DestinationError``
    with a ``str`` reason (and, when it has one, a numeric ``retry_after``)."""
    if len(outcomes) != count:
        return f"{len(outcomes)} outcomes for {count} payloads"
    for outcome in outcomes:
        if outcome is None:
            continue
        if not isinstance(outcome, DestinationError) or not isinstance(outcome.reason, str):
            return (f"{outcome!r:.200}; expected None, RetryableError or PermanentError with "
                    "a str reason")
        retry_after = getattr(outcome, "retry_after", None)
        if retry_after is not None and (isinstance(retry_after, bool) or
                                        not isinstance(retry_after, (int, float))):
            return f"a retry_after {retry_after!r:.40} that is not a number"
    return None


def _is_token(text: Any) -> bool:
    return isinstance(text, str) and _is_token_text(text)


@functools.lru_cache(maxsize=1024)
def _is_token_text(text: str) -> bool:
    """Cached: every request of a destination names the same few headers."""
    return bool(text) and not set(text) - _TOKEN_CHARACTERS


class DeliveryDefaults(BaseModel):
    """A destination's documented delivery limits, declared as data. Operators may override
    each one in the ``delivery`` section of the destination's config, except that
    ``batch_size`` and ``batch_bytes`` may only be lowered: a plugin declares the most its
    ``build_request`` and its API take (a webhook sends one payload a request; GA4 drops the
    events of a request over 25 without a word). ``max_age`` may be raised up to
    ``max_age_limit``, for an API that refuses events past an age: the last retry of an event
    must still reach it in time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each default is given as Field(default=...): type checkers without pydantic's plugin
    # (a plugin author's bare mypy --strict, pyright) read no other form, and would ask for
    # every field in DeliveryDefaults(batch_size=100).
    timeout: float = Field(default=10.0, gt=0, description="seconds to wait for one request")
    max_attempts: int = Field(default=150, ge=1, description="attempts before dead-lettering "
                              "(by default more than max_age leaves room for, so that age "
                              "decides)")
    max_age: float = Field(default=4 * 3600.0, gt=0, description="seconds after which an "
                           "undelivered event is dead-lettered")
    max_age_limit: float | None = Field(
        default=None, gt=0, description="the longest max_age a config may set, for an API "
        "that refuses events past an age (GA4: 72 h; its limit is half that, so events up to "
        "36 h old still have time for every retry)")
    concurrency: int = Field(default=4, ge=1, description="requests in flight at once")
    rate_limit: float | None = Field(default=None, gt=0,
                                     description="requests per second, at most")
    batch_size: int = Field(default=1, ge=1, description="payloads per request, at most")
    batch_bytes: int = Field(default=1_000_000, ge=1024,
                             description="request body bytes, at most")
    payload_overhead: int = Field(
        default=0, ge=0, description="bytes build_request adds to a request for each payload "
        "beyond its body and a separator (Mixpanel's /engage puts the project token in each "
        "update): the core counts them against batch_bytes")
    max_payload_bytes: int | None = Field(
        default=None, ge=1, description="one payload's serialized body, at most: a larger one "
        "is rejected when the event is routed (default: batch_bytes less payload_overhead, "
        "since it could never be sent)")
    batch_wait: float = Field(default=1.0, ge=0,
                              description="seconds a partial batch waits for more")
    backoff_initial: float = Field(default=1.0, gt=0, description="seconds before the first "
                                   "retry, at most (exponential with full jitter)")
    backoff_max: float = Field(default=300.0, gt=0,
                               description="longest wait between two attempts")
    retry_on: frozenset[int] = Field(default=DEFAULT_RETRY_STATUSES,
                                     description="HTTP statuses retried; others are permanent")
    ordered: bool = Field(default=False,
                          description="hold a user's later events while one retries")
    order_hold_attempts: int | None = Field(
        default=None, ge=1, description="with ordered: failed attempts after which an event "
        "stops holding its user's later events (it goes on retrying beside them); none: it "
        "holds them until it is delivered or given up")

    @model_validator(mode="after")
    def _room_for_a_payload(self) -> DeliveryDefaults:
        if self.payload_overhead >= self.batch_bytes:
            raise ValueError(f"payload_overhead ({self.payload_overhead}) must be less than "
                             f"batch_bytes ({self.batch_bytes}): no payload would fit a request")
        return self


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return url


HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""A settings field holding an http:// or https:// URL with a host (a webhook's URL)."""
BaseUrl = Annotated[str, AfterValidator(lambda url: _http_url(url).rstrip("/"))]
"""A settings field holding the base URL of an API (a region's host, a proxy, a test server),
without its trailing slash, so paths can be appended."""

def basic_auth(user: str, password: str = "") -> str:
    """An ``Authorization`` header value for HTTP Basic auth (``user:password``, base64)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Destination(Generic[SettingsT]):
    """Base class of every destination type, built-in or third-party.

    Subclasses set ``plugin_name`` (the ``plugin:`` key in the config), ``Settings`` (a
    pydantic model whose field descriptions document the settings; use ``SecretStr`` for
    credentials) and, when the API batches or has limits, ``delivery``.
    """

    plugin_name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    delivery: DeliveryDefaults = DeliveryDefaults()
    """The API's documented limits, on the class. On a configured destination, the limits in
    force: the router sets them with the operator's ``delivery:`` overrides applied, so a
    translation that depends on one (an age window measured against ``max_age``) follows
    the config."""
    opaque_bodies: bool = False
    """True when ``build_request`` and ``read_response`` only place payload bodies into a
    request and never look inside them. The core then hands each body over as the JSON it
    was spooled as (an ``orjson.Fragment``) instead of parsing it back, and orjson writes it
    out as it is: build the request with ``HttpRequest.json`` or ``orjson.dumps``. Set it on
    the class, or in ``__init__`` when it depends on the settings."""

    reads_amounts: bool = True
    """True when ``translate`` relies on ``revenue`` and ``value`` being numbers and
    ``currency`` an ISO 4217 code, as the core makes them. An event whose amounts are not
    (``"$25.00"``, see ``Event.amount_problems``) is then invalid for this destination,
    with the reason, and never reaches ``translate``. A destination that passes properties
    on as they came (a webhook, a forwarder) sets it False and gets such events too."""

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        """Turn one event into the payloads this destination sends for it.

        ``options`` is the object the event's integrations map gave for this destination
        (empty when it gave ``true``). Return ``[]`` or raise ``SkipEvent`` when there is
        nothing to send; raise ``EventRejected`` when the vendor would refuse the event.
        Must be deterministic: the same event always gives the same payloads.
        """
        raise NotImplementedError

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        """One HTTP request carrying ``payloads`` (all of one group; one of them unless
        ``delivery.batch_size`` is above 1). Credentials are added here."""
        raise NotImplementedError

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """Judge an answer per payload, in order, or return None to let the core judge by
        status alone (2xx delivered, ``retry_on`` retried, the rest permanent).

        Override it where the API reports more than its status says: failed items of a
        batch, an error inside a 200, a vendor rate-limit header.
        """
        return None

    def endpoints(self) -> Sequence[str]:
        """URLs this configured destination will send to, checked against the egress policy
        when the config is loaded. Vendor APIs on public hosts need not list theirs."""
        return ()
