"""The ``customerio`` destination: Customer.io Journeys through the Track API v2 batch endpoint.

Every call type becomes one item of ``POST https://track.customer.io/api/v2/batch`` (EU:
``track-eu.customer.io``), so one request carries people, events and objects alike; the
item shapes live in ``translate.py``. Customer.io answers a batch with some invalid items
with 207 and their indexes, and accepts the rest, so only the refused items fail.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from router import (BaseUrl, basic_auth, DeliveryDefaults, Destination, Event, HttpRequest,
                    HttpResponse,
                    Outcome, Payload, PermanentError, RetryableError)

from . import translate

TRACK_HOSTS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
BATCH_PATH = "/api/v2/batch"
_ENVELOPE_BYTES = len(b'{"batch":[]}')


class CustomerIOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str = Field(min_length=1, description="Track API site ID (Workspace Settings > "
                                                   "API Credentials); the Basic auth user name.")
    api_key: SecretStr = Field(description="Track API key of that site ID; the Basic auth "
                                           "password.")
    region: Literal["us", "eu"] = Field(
        "us", description="Data center of the workspace: `us` (track.customer.io) or `eu` "
                          "(track-eu.customer.io).")
    base_url: BaseUrl | None = Field(
        None, description="Send to this base URL instead of the region's Track API host (a "
                          "proxy, a test server). `/api/v2/batch` is appended.")
    object_type_id: str | None = Field(
        "1", description="Customer.io object type that group calls create and relate people "
                         "to (a whole number as a string). Null skips group calls unless the "
                         "event names a type.")
    convert_timestamps: bool = Field(
        True, description="Send ISO-8601 date strings in traits and properties (nested "
                          "objects included) as Unix seconds, the form Customer.io compares "
                          "dates in, as Segment's Customer.io destination does.")

    @field_validator("region", mode="before")
    @classmethod
    def _known_region(cls, region: Any) -> Any:
        if isinstance(region, str) and region.strip().lower() in TRACK_HOSTS:
            return region.strip().lower()
        raise ValueError("expected `us` or `eu`: the data center of your Customer.io "
                         "workspace (shown on its privacy settings page)")

    @field_validator("object_type_id", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value)
        if not (text.isascii() and text.isdigit()):
            raise ValueError("expected a whole number such as \"1\": the id of a Customer.io "
                             "object type (Data & Integrations > Objects)")
        return text


class CustomerIO(Destination[CustomerIOSettings]):
    plugin_name = "customerio"
    opaque_bodies = True  # build_request only lists the bodies
    Settings = CustomerIOSettings
    delivery = DeliveryDefaults(
        # /api/v2/batch: "smaller than 500kb", each item ≤32 KB (Track v2 reference); read
        # as 500,000 bytes including the {"batch": [...]} envelope. Customer.io sets no item
        # count; 1000 is RudderStack's cap for the same endpoint (customerio README).
        batch_size=1000,
        batch_bytes=500_000 - _ENVELOPE_BYTES,
        # The Track API allows about 3000 requests per 3 s for the whole workspace, loosely
        # enforced (RudderStack customerio README); 100/s leaves room for other senders.
        rate_limit=100,
        concurrency=4,
    )

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if event.type == "group":
            item = translate.group(event, options, self.settings.object_type_id)
        else:
            item = _BUILDERS[event.type](event, options)
        if self.settings.convert_timestamps and "attributes" in item:
            item["attributes"] = translate.unix_timestamps(item["attributes"])
        translate.check_item_size(item)
        return [Payload(item)]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        authorization = basic_auth(self.settings.site_id, self.settings.api_key.get_secret_value())
        return HttpRequest.json("POST", self._base_url() + BATCH_PATH,
                                {"batch": [payload.body for payload in payloads]},
                                headers={"Authorization": authorization})

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """207 (and a 2xx that still lists errors) fails only the items at each
        ``batch_index``; Customer.io accepted the others. A 400 listing items refused the
        whole request because of them: the listed ones fail, the others are sent again
        (their dedup ids make that safe). Anything else is judged by its status."""
        failed = _failed_items(response, len(payloads))
        if not failed:
            return None
        if 200 <= response.status < 300:
            return [PermanentError(failed[index]) if index in failed else None
                    for index in range(len(payloads))]
        if response.status == 400:
            return [PermanentError(failed[index]) if index in failed else
                    RetryableError("Customer.io refused the batch for other items in it",
                                   caused_by_others=True)
                    for index in range(len(payloads))]
        return None

    def endpoints(self) -> Sequence[str]:
        return (self._base_url() + BATCH_PATH,) if self.settings.base_url else ()

    def _base_url(self) -> str:
        return self.settings.base_url or TRACK_HOSTS[self.settings.region]


_BUILDERS: dict[str, Callable[[Event, Mapping[str, Any]], dict[str, Any]]] = {
    "identify": translate.identify,
    "track": translate.track,
    "page": translate.page,
    "screen": translate.screen,
    "alias": translate.alias,
}


def _failed_items(response: HttpResponse, count: int) -> dict[int, str]:
    """``{batch_index: reason}`` from ``{"errors": [{batch_index, reason, field, message}]}``
    for the ``count`` items sent. An error whose index is not one of theirs (none, past the
    end, negative, or a bool, which Python takes for 0 or 1) cannot be pinned on an item
    and is left to the status: counted, a 400 naming only such indexes had its items retried
    until their attempts ran out instead of failing at once, as a refused request does."""
    body = response.json()
    errors = body.get("errors") if isinstance(body, dict) else None
    failed: dict[int, str] = {}
    for error in errors if isinstance(errors, list) else []:
        index = error.get("batch_index") if isinstance(error, dict) else None
        if type(index) is not int or not 0 <= index < count:
            continue
        parts = [f"{key}: {error[key]}" for key in ("reason", "field", "message")
                 if error.get(key)]
        detail = ", ".join(parts) or orjson.dumps(error).decode()
        failed[index] = f"Customer.io refused the item ({detail})"
    return failed
