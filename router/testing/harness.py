"""Run events through one destination, without a router or a network, and look at what it
would send.

The harness calls a destination's pure methods the way the core does: settings validated by
the plugin's own model, per-event options taken from the event's integrations map, payload
bodies passed through the spool's JSON round trip before ``build_request`` (so a body that
only works as live Python objects fails here, not in production), payloads batched by group
within ``delivery.batch_size`` and ``batch_bytes``, and answers judged by ``read_response``
with the core's status rules behind it::

    harness = DestinationHarness(Acme, {"api_key": "acme-key-123"})
    (request,) = harness.requests(make_event("track", event="Signed Up"))
    assert request.url == "https://api.acme.example/v1/events"
    assert harness.request_json(request)["events"][0]["name"] == "Signed Up"
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel

from router.delivery import retry
from router.delivery.batching import batches as split_into_batches
from router.delivery.batching import from_spool, oversized, payload_limit
from router.destination import (DEFAULT_RETRY_STATUSES, DeliveryDefaults, Destination,
                                HttpRequest, HttpResponse, Outcome, Payload, checked_payloads,
                                outcomes_problem, refuse_unread_amounts)
from router.errors import DestinationError, EventRejected
from router.events import Event, parse_event
from router.integrations import decide
from router.redaction import secret_values
from router.testing.events import RECEIVED_AT

DestinationT = TypeVar("DestinationT", bound=Destination[Any])

RawOrEvent = Mapping[str, Any] | Event


def classify_status(status: int, retry_on: Collection[int] = DEFAULT_RETRY_STATUSES, *,
                    headers: Mapping[str, str] | None = None, now: float | None = None,
                    body: bytes = b"") -> Outcome:
    """The core's judgement of an answer by its status alone: 2xx delivered (None),
    ``retry_on`` a ``RetryableError`` (with ``Retry-After`` from ``headers``), anything else
    a ``PermanentError``.

    The rule lives in ``router.delivery.retry.classify_status``, which the delivery service
    uses; this is that function with defaults that suit a test, so the kit can never judge
    an answer differently from the router.
    """
    return retry.classify_status(status, headers or {}, frozenset(retry_on),
                                 now=time.time() if now is None else now, body=body)


def spooled(payload: Payload, *, opaque: bool = False) -> Payload:
    """The payload as ``build_request`` receives it in production, after the spool (as JSON
    text in an ``orjson.Fragment`` for a destination with ``opaque_bodies``)."""
    return from_spool(orjson.dumps(payload.body), payload.group, opaque=opaque)


def answer(status: int, headers: Mapping[str, str] | None, body: bytes) -> HttpResponse:
    """An answer as the router hands it to ``read_response``: its headers aiohttp's
    case-insensitive view, where ``headers["content-type"]`` finds ``Content-Type``."""
    return HttpResponse(status, CIMultiDictProxy(CIMultiDict(headers or {})), body)


def batches(payloads: Iterable[Payload], delivery: DeliveryDefaults) -> list[list[Payload]]:
    """Payloads split into batches exactly as the delivery service does it."""
    return split_into_batches(payloads, delivery, group=lambda payload: payload.group,
                              size=lambda payload: len(orjson.dumps(payload.body)))


def requests_from(destination: Destination[Any], payloads: Iterable[Payload],
                  delivery: DeliveryDefaults | None = None) -> list[HttpRequest]:
    """The requests a configured destination sends for ``payloads``: after the spool's JSON
    round trip, batched by group within ``delivery`` (the destination's own by default)."""
    limits = delivery or destination.delivery
    opaque = destination.opaque_bodies
    return [destination.build_request(batch)
            for batch in batches([spooled(payload, opaque=opaque) for payload in payloads],
                                 limits)]


def shown(request: HttpRequest) -> dict[str, Any]:
    """A request as plain data to compare in a test: method, URL, headers, decoded body."""
    return {"method": request.method, "url": request.url, "headers": request.headers,
            "body": DestinationHarness.request_json(request)}


class DestinationHarness(Generic[DestinationT]):
    """One configured destination, driven by hand.

    ``settings`` is what an operator writes under ``settings:`` in the config; it is validated
    by ``destination_cls.Settings`` (a ``pydantic.ValidationError`` when it is wrong). ``name``
    is the destination's configured name, which the integrations map is matched against
    (default: the plugin name). ``delivery`` overrides the plugin's declared delivery limits,
    as the config's ``delivery:`` section does.
    """

    def __init__(self, destination_cls: type[DestinationT],
                 settings: Mapping[str, Any] | BaseModel, *, name: str | None = None,
                 delivery: Mapping[str, Any] | DeliveryDefaults | None = None,
                 received_at: datetime = RECEIVED_AT) -> None:
        self.destination_cls = destination_cls
        if isinstance(settings, destination_cls.Settings):
            self.settings = settings
        else:
            self.settings = destination_cls.Settings.model_validate(dict(settings))
        self.destination: DestinationT = destination_cls(self.settings)
        self.name = name or destination_cls.plugin_name
        if isinstance(delivery, DeliveryDefaults):
            self.delivery = delivery
        else:  # validated like the config's delivery section: a typo fails here
            self.delivery = DeliveryDefaults.model_validate(
                {**destination_cls.delivery.model_dump(), **dict(delivery or {})})
        self.destination.delivery = self.delivery  # as the router configures it
        self.received_at = received_at

    def event(self, event: RawOrEvent) -> Event:
        """A raw event parsed as the router would (received at the harness's fixed moment);
        an ``Event`` is returned as it is. ``InvalidEvent`` when the raw event is invalid."""
        if isinstance(event, Event):
            return event
        return parse_event(event, received_at=self.received_at)

    def options_for(self, event: RawOrEvent) -> Mapping[str, Any]:
        """The per-event options the event's integrations map gives this destination (the
        object under its name, matched case-insensitively), or ``{}``."""
        return decide(self.event(event).integrations, self.name).options

    def payloads(self, event: RawOrEvent, options: Mapping[str, Any] | None = None
                 ) -> list[Payload]:
        """What ``translate`` returns for the event. ``options`` default to the event's own
        integrations map; the map's on/off decision is not applied, since the point is to see
        what the destination sends when the event reaches it. ``SkipEvent`` and
        ``EventRejected`` propagate, so tests can ``pytest.raises`` them; a payload over
        ``delivery.max_payload_bytes`` (else ``batch_bytes``) is rejected as the router
        rejects it, and anything but a list or tuple of ``Payload`` (a generator, say) is a
        ``TypeError``, as the router counts it a plugin failure."""
        parsed = self.event(event)
        if options is None:
            options = self.options_for(parsed)
        refuse_unread_amounts(self.destination, parsed)
        payloads = checked_payloads(self.destination.translate(parsed, options))
        limit = payload_limit(self.delivery)
        for payload in payloads:  # the core's size rule, as at routing
            size = len(orjson.dumps(payload.body))
            if size > limit:
                raise EventRejected(oversized(size, limit, self.destination_cls.plugin_name))
        return list(payloads)

    def requests(self, event: RawOrEvent, options: Mapping[str, Any] | None = None
                 ) -> list[HttpRequest]:
        """The requests one event makes: its payloads batched by group (one request per
        group unless the group has more payloads than a batch holds)."""
        return self.build_requests(self.payloads(event, options))

    def requests_for_events(self, events: Iterable[RawOrEvent]) -> list[HttpRequest]:
        """The requests several events make together, batched as the delivery service would
        when they are queued at once. Events the destination skips or rejects send nothing."""
        collected: list[Payload] = []
        for event in events:
            try:
                collected += self.payloads(event)
            except DestinationError:
                continue
        return self.build_requests(collected)

    def build_requests(self, payloads: Iterable[Payload]) -> list[HttpRequest]:
        """``build_request`` over the payloads after the spool's round trip, batch by batch."""
        return requests_from(self.destination, payloads, self.delivery)

    @staticmethod
    def request_json(request: HttpRequest) -> Any:
        """The request body decoded as JSON (gzip or deflate ``Content-Encoding`` undone);
        None when the request has no body. ``ValueError`` when the body is not JSON."""
        if request.body is None:
            return None
        return orjson.loads(decoded_body(request))

    def outcomes(self, payloads: Sequence[Payload], status: int, body: Any = b"",
                 headers: Mapping[str, str] | None = None) -> list[Outcome]:
        """Judge an answer per payload as the delivery service does: ``read_response``
        first, the status rules when it returns None. ``body`` is bytes, text or JSON-able
        data. A ``read_response`` that returns what the router would ignore (the wrong
        number of outcomes, or one that is not None or a ``DestinationError`` with a ``str``
        reason) fails the test: the router would fall back to the status."""
        response = answer(status, headers, _as_bytes(body))
        payloads = [self.spooled(payload) for payload in payloads]
        judged = self.destination.read_response(payloads, response)
        if judged is None:
            outcome = classify_status(status, self.delivery.retry_on, headers=response.headers,
                                      body=response.body)
            return [outcome] * len(payloads)
        judged = list(judged)
        problem = outcomes_problem(judged, len(payloads))
        if problem:
            raise AssertionError(f"{self.destination_cls.__name__}.read_response returned "
                                 f"{problem}")
        return judged

    def spooled(self, payload: Payload) -> Payload:
        """The payload as ``build_request`` and ``read_response`` get it in production: after
        the spool's JSON round trip, its body an ``orjson.Fragment`` when the destination
        declares ``opaque_bodies``."""
        return spooled(payload, opaque=self.destination.opaque_bodies)

    def secrets(self) -> list[str]:
        """Every ``SecretStr`` value in the validated settings, nested models, dicts and lists
        included: the values that must never reach a payload body."""
        return list(dict.fromkeys(value for value in secret_values(self.settings) if value))

    def fresh(self) -> DestinationHarness[DestinationT]:
        """Another harness with a new instance of the destination and the same settings: what a
        restarted router would run."""
        return DestinationHarness(self.destination_cls, self.settings, name=self.name,
                                  delivery=self.delivery, received_at=self.received_at)


class HarnessFactory(Protocol):
    """The type of the ``destination_harness`` fixture (``router.testing.pytest_plugin``):
    ``DestinationHarness``'s own constructor, so that a test annotated
    ``destination_harness: HarnessFactory`` gets a ``DestinationHarness[Acme]`` from
    ``destination_harness(Acme, ...)``, and ``harness.destination`` is an ``Acme``."""

    def __call__(self, destination_cls: type[DestinationT],
                 settings: Mapping[str, Any] | BaseModel, *, name: str | None = None,
                 delivery: Mapping[str, Any] | DeliveryDefaults | None = None,
                 received_at: datetime = RECEIVED_AT) -> DestinationHarness[DestinationT]: ...


def decoded_body(request: HttpRequest) -> bytes:
    """A request body with its gzip or deflate ``Content-Encoding`` undone."""
    body = request.body or b""
    encoding = next((value for name, value in request.headers.items()
                     if name.lower() == "content-encoding"), "").lower().strip()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(body)
