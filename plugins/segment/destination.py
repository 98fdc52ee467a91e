"""The ``segment`` destination: events forwarded to a Segment-compatible tracking API.

``POST {base_url}/v1/batch`` with the write key as the Basic auth user name: Segment itself
(``https://api.segment.io``), Customer.io Data Pipelines (``https://cdp.customer.io``), or
another instance of this router. The normalized event goes on unchanged, ``messageId``
included so the next hop drops a retried event as a duplicate; semantic events go on too,
since they mean something to the next hop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from router import (MAX_EVENT_BYTES, BaseUrl, basic_auth, DeliveryDefaults, Destination, Event,
                    HttpRequest, HttpResponse, Outcome, Payload, PermanentError)

BATCH_PATH = "/v1/batch"
_ENVELOPE_BYTES = len(b'{"batch":[]}')
# The first hop's client clock: the next hop would apply the skew correction again (or, with
# sentAt gone, take originalTimestamp as the time), so only the corrected timestamp goes on.
_CLIENT_CLOCK_FIELDS = ("sentAt", "originalTimestamp")
_LEFT_TO_THE_NEXT_HOP = frozenset((*_CLIENT_CLOCK_FIELDS, "receivedAt"))
_MAPS = ("properties", "traits", "context")


class SegmentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    write_key: SecretStr = Field(description="Write key of the receiving source (for "
                                             "Customer.io Data Pipelines, its API key); the "
                                             "Basic auth user name, with an empty password.")
    base_url: BaseUrl = Field("https://api.segment.io",
                          description="Tracking API to forward to: `https://api.segment.io`, "
                                      "`https://events.eu1.segmentapis.com`, "
                                      "`https://cdp.customer.io`, `https://cdp-eu.customer.io`, "
                                      "or another router. `/v1/batch` is appended.")


class Segment(Destination[SegmentSettings]):
    plugin_name = "segment"
    opaque_bodies = True  # build_request only lists the bodies
    reads_amounts = False  # events are forwarded as they came, as Segment's own API takes them
    Settings = SegmentSettings
    delivery = DeliveryDefaults(
        # /v1/batch takes at most 500 KB a request and 32 KB an event, else 400 (Segment
        # "HTTP Tracking API": max request size); Customer.io Data Pipelines the same. The
        # envelope counts, so it is taken off the budget.
        batch_size=100,
        batch_bytes=500_000 - _ENVELOPE_BYTES,
        # Segment sets no hard rate limit but asks senders to stay under 50 requests a
        # second (quoted by its client libraries); 100 events a batch keeps that ample.
        rate_limit=50,
        # One event over 32 KB makes Segment refuse the whole batch with 400: the router
        # rejects such an event when it is routed.
        max_payload_bytes=MAX_EVENT_BYTES,
    )

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        # The same payload for every segment destination: the router serializes it once.
        return [event.shared("segment:forwarded", _forwarded_payload, event)]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        return HttpRequest.json("POST", self.settings.base_url + BATCH_PATH,
                                {"batch": [payload.body for payload in payloads]},
                                headers={"Authorization": basic_auth(
                                    self.settings.write_key.get_secret_value())})

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """Segment answers 200 for a whole batch and 400 for one it refuses whole, which the
        status says. This router, as a next hop, also lists the events it rejected one by one
        (``{"rejected": [{"index", "reason"}]}``, with 200 when it kept others and 400 when
        none): those fail alone, the others were accepted."""
        body = response.json()
        rejected = body.get("rejected") if isinstance(body, dict) else None
        if not isinstance(rejected, list) or not rejected:
            return None
        # Only the positions of this request count: an index past its end (or a bool, an int
        # to Python) names none of its events, and counted, it made a 400 that named all
        # but one look as if it named them all, the one left out taken for delivered.
        reasons = {item["index"]: str(item.get("reason") or "no reason given")
                   for item in rejected
                   if isinstance(item, dict) and type(item.get("index")) is int
                   and 0 <= item["index"] < len(payloads)}
        if not 200 <= response.status < 300 and len(reasons) < len(payloads):
            return None
        return [PermanentError(f"the next hop rejected the event: {reasons[index]}")
                if index in reasons else None for index in range(len(payloads))]

    def endpoints(self) -> Sequence[str]:
        return (self.settings.base_url + BATCH_PATH,)


def _forwarded_payload(event: Event) -> Payload:
    return Payload(_forwarded(event))


def _forwarded(event: Event) -> dict[str, Any]:
    """The event without the first hop's client clock (see ``_CLIENT_CLOCK_FIELDS``), nor
    what the next hop sets or reads as empty by itself: its own ``receivedAt``, and empty
    ``properties``, ``traits`` or ``context``. Each byte added here counts against the next
    hop's 32 KB an event: an event near the limit, valid as the client sent it, was refused
    here for the 92 bytes those fields added (router chaining audit)."""
    body = event.to_dict(leave_out=_LEFT_TO_THE_NEXT_HOP)
    for field in _MAPS:
        if body.get(field) == {}:
            del body[field]
    return body
