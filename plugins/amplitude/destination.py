"""Amplitude: events through the HTTP V2 API (``/2/httpapi``) or, with ``use_batch_endpoint``,
the Batch Event Upload API (``/batch``), deduplicated by ``insert_id``; user deletions through
the User Privacy API (``/api/2/deletions/users``).

Events and deletions are two payload groups, since they go to different hosts with different
credentials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from router import (BaseUrl, basic_auth, DeliveryDefaults, Destination, Event, HttpRequest,
                    HttpResponse, Outcome, Payload, PermanentError, SkipEvent)
from router.semantics import semantic_action

from . import responses, translate

# Ingestion hosts per data residency ("HTTP V2 API", "Batch Event Upload API").
INGEST_HOSTS = {"US": "https://api2.amplitude.com", "EU": "https://api.eu.amplitude.com"}
# User Privacy API hosts ("User Privacy API": Regions).
PRIVACY_HOSTS = {"US": "https://amplitude.com", "EU": "https://analytics.eu.amplitude.com"}

EVENTS, DELETIONS = "events", "deletions"

MAX_REQUEST_BYTES = 1_000_000
"""HTTP V2 refuses requests over 1 MB with 413 ("HTTP V2 API": 413 PayloadTooLargeError)."""
_ENVELOPE_BYTES = 10_000
"""Room left in a request for ``api_key``, ``options`` and the JSON around the events."""


class AmplitudeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(
        description="Project API key (Settings > Projects > your project > General). Sent in "
                    "the body of each request; never stored with the events.")
    secret_key: SecretStr | None = Field(
        None, description="Project secret key. Needed only for user deletion (`Delete "
                          "Person` / `User Deleted`); without it those events are skipped.")
    region: Literal["US", "EU"] = Field(
        "US", description="Data residency of the project: US or EU.")
    base_url: BaseUrl | None = Field(
        None, description="Send to this http(s) base URL instead of Amplitude's hosts (tests, "
                          "proxies): events to `{base_url}/2/httpapi` or `/batch`, "
                          "deletions to `{base_url}/api/2/deletions/users`.")
    use_batch_endpoint: bool = Field(
        False, description="Send events to the Batch Event Upload API (`/batch`), which "
                           "allows 1000 events/s per user or device instead of 30, for "
                           "historical imports and busy users.")
    min_id_length: int | None = Field(
        None, ge=1, description="Shortest user_id/device_id Amplitude should accept; its "
                                "default is 5. Sent as the request's `options.min_id_length`.")
    group_type: str | None = Field(
        None, min_length=1,
        description="Amplitude group type (Accounts add-on) that group calls write to, e.g. "
                    "`company`; the group's id is the group name. Without it group calls "
                    "are skipped unless the event's options give `group_type`.")
    product_purchased_events: bool = Field(
        True, description="Also send one \"Product Purchased\" event per product of an "
                          "`Order Completed`.")
    track_revenue_per_product: bool = Field(
        False, description="Count revenue on each \"Product Purchased\" event (price × "
                           "quantity) instead of once on the order.")
    deletion_requester: str = Field(
        "event-router", min_length=1,
        description="`requester` recorded with each deletion job (Amplitude suggests the "
                    "email of who asked, for audit).")

    @field_validator("region", mode="before")
    @classmethod
    def _region_upper(cls, region: Any) -> Any:
        if isinstance(region, str) and region.strip().upper() in INGEST_HOSTS:
            return region.strip().upper()
        if isinstance(region, str):
            raise ValueError("unknown region; expected US or EU (the project's "
                             "data residency)")
        return region


class Amplitude(Destination[AmplitudeSettings]):
    plugin_name = "amplitude"
    Settings = AmplitudeSettings
    # HTTP V2: at most 2000 events and under 1 MB per request ("HTTP V2 API"; "Batch and
    # retry HTTP V2 API requests"). Amplitude limits events per second per user or device
    # (30; 1000 on /batch), not requests, so no request rate is set; 429s name the throttled
    # users and devices (see responses.py). With `use_batch_endpoint`, Amplitude takes
    # requests up to 20 MB, but requests stay under 1 MB here: a config may only lower
    # `delivery.batch_bytes` below the class's, and the class's cannot depend on settings.
    delivery = DeliveryDefaults(batch_size=2000,
                                batch_bytes=MAX_REQUEST_BYTES - _ENVELOPE_BYTES,
                                concurrency=8)

    @property
    def _min_id_length(self) -> int:
        return self.settings.min_id_length or translate.DEFAULT_MIN_ID_LENGTH

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        action = semantic_action(event)
        if action == "delete":
            return [self._deletion(event)]
        if action is not None:
            raise SkipEvent(f"Amplitude has no {action} operation for a user")
        kind = event.type
        if kind == "alias":
            raise SkipEvent("Amplitude has no alias: it merges a device into a user when an "
                            "event carries both ids (an identify with userId and anonymousId "
                            "does it); its usermap API maps ids across Portfolio projects only")

        opts = translate.event_options(options)
        builder = translate.Builder(event, opts, self._min_id_length)
        if kind == "track":
            name = event.event
            assert name is not None  # required for track by parse_event
            bodies = translate.track_events(
                builder, name,
                product_purchased=self.settings.product_purchased_events,
                revenue_per_product=self.settings.track_revenue_per_product)
        elif kind in ("page", "screen"):
            bodies = [translate.page_event(builder)]
        elif kind == "identify":
            bodies = [translate.identify_event(builder)]
        else:  # group
            group_type = opts.group_type or self.settings.group_type
            if not group_type:
                raise SkipEvent("group calls need the `group_type` setting (an Amplitude group "
                                "type, Accounts add-on) or a `group_type` option on the event")
            bodies = translate.group_events(builder, group_type)
        # An event larger than batch_bytes (a request's 1 MB less the envelope) is rejected
        # by the router when it is routed.
        return [Payload(body, EVENTS) for body in bodies]

    def _deletion(self, event: Event) -> Payload:
        """The User Privacy API deletes by user_id (or Amplitude's own id), with the project's
        secret key."""
        if self.settings.secret_key is None:
            raise SkipEvent("user deletion needs the `secret_key` setting (Amplitude's User "
                            "Privacy API authenticates with the API key and secret key)")
        if not event.userId:
            raise SkipEvent("Amplitude deletes users by user_id; this event has only an "
                            "anonymousId")
        return Payload({"user_id": event.userId}, DELETIONS)

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        if payloads[0].group == DELETIONS:
            return self._deletion_request(payloads)
        base = self.settings.base_url or INGEST_HOSTS[self.settings.region]
        url = f"{base}/batch" if self.settings.use_batch_endpoint else f"{base}/2/httpapi"
        data: dict[str, Any] = {"api_key": self.settings.api_key.get_secret_value(),
                                "events": [payload.body for payload in payloads]}
        if self.settings.min_id_length is not None:
            data["options"] = {"min_id_length": self.settings.min_id_length}
        return HttpRequest.json("POST", url, data)

    def _deletion_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        """One deletion job for up to 100 users (the API's limit); ``read_response`` sends the
        rest of a bigger batch again. ``ignore_invalid_id`` keeps one unknown user from
        failing the others (a string, as the API wants its booleans)."""
        if self.settings.secret_key is None:
            raise PermanentError("user deletion needs the `secret_key` setting")
        base = self.settings.base_url or PRIVACY_HOSTS[self.settings.region]
        user_ids = list(dict.fromkeys(
            payload.body["user_id"] for payload in payloads[:responses.MAX_DELETION_USERS]))
        authorization = basic_auth(self.settings.api_key.get_secret_value(),
                                   self.settings.secret_key.get_secret_value())
        return HttpRequest.json(
            "POST", f"{base}/api/2/deletions/users",
            {"user_ids": user_ids, "requester": self.settings.deletion_requester,
             "ignore_invalid_id": "True"},
            {"Authorization": authorization})

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        if payloads[0].group == DELETIONS:
            return responses.deletion_outcomes(payloads, response, self.delivery.retry_on)
        return responses.event_outcomes(payloads, response)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.base_url,) if self.settings.base_url else ()
