"""Braze: profiles, custom events and purchases through ``/users/track``; anonymous profiles
merged into known users through ``/users/identify``; deletions through ``/users/delete``.

Each endpoint is its own payload group. Braze has no per-event dedup id, so a retried
``/users/track`` request may record an event twice; the core retries only what Braze did not
accept (429, 5xx), never the items of a 201 it refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from router import (BaseUrl, DeliveryDefaults, Destination, Event, EventRejected, HttpRequest,
                    HttpResponse, Outcome, Payload, SkipEvent)
from router.semantics import ORDER_COMPLETED, semantic_action

from . import responses, translate

# REST endpoints per instance (Braze "API and SDK endpoints").
INSTANCES = {
    "US-01": "https://rest.iad-01.braze.com", "US-02": "https://rest.iad-02.braze.com",
    "US-03": "https://rest.iad-03.braze.com", "US-04": "https://rest.iad-04.braze.com",
    "US-05": "https://rest.iad-05.braze.com", "US-06": "https://rest.iad-06.braze.com",
    "US-07": "https://rest.iad-07.braze.com", "US-08": "https://rest.iad-08.braze.com",
    "US-10": "https://rest.us-10.braze.com", "EU-01": "https://rest.fra-01.braze.eu",
    "EU-02": "https://rest.fra-02.braze.eu", "AU-01": "https://rest.au-01.braze.com",
    "ID-01": "https://rest.id-01.braze.com",
}

TRACK, IDENTIFY, DELETE = "track", "identify", "delete"
PATHS = {TRACK: "/users/track", IDENTIFY: "/users/identify", DELETE: "/users/delete"}


class BrazeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(
        description="REST API key (Settings > APIs and Identifiers) with the users.track, "
                    "users.identify and users.delete permissions.")
    instance: str = Field(
        "US-01", description="Your Braze instance (cluster), e.g. US-01..US-08, US-10, EU-01, "
                             "EU-02, AU-01, ID-01; it picks the REST endpoint.")
    rest_endpoint: BaseUrl | None = Field(
        None, description="A REST endpoint URL to use instead of the instance's (a new "
                          "instance, a proxy, tests).")
    app_id: str | None = Field(
        None, description="App identifier to attach to events and purchases (optional).")
    update_existing_only: bool = Field(
        False, description="Send `_update_existing_only: true`: update known users only, never "
                           "create a profile for an unknown external_id.")
    anonymous_alias_label: str = Field(
        "anonymous_id", description="alias_label of the user alias that holds an anonymous "
                                    "user's anonymousId.")
    track_pages: bool = Field(
        False, description="Send page and screen calls as custom events (\"Viewed {name} "
                           "Page\"); off by default because each one costs Braze data points.")
    order_completed_event: bool = Field(
        False, description="Besides one purchase per product, also log Order Completed as a "
                           "custom event.")

    @field_validator("instance")
    @classmethod
    def _known_instance(cls, instance: str) -> str:
        name = instance.strip().upper()
        if name not in INSTANCES:
            raise ValueError("unknown Braze instance; expected one of "
                             f"{', '.join(INSTANCES)}, or set rest_endpoint")
        return name


class Braze(Destination[BrazeSettings]):
    plugin_name = "braze"
    Settings = BrazeSettings
    # /users/track takes 75 attributes, events and purchases combined per request; /users/
    # identify and /users/delete take 50 ids. One payload is one object, and the core has one
    # batch size for all groups, so 50. /users/track allows 3000 requests per 3 s; the other
    # endpoints share 20,000 a minute, hence 300/s (Braze "Rate limits").
    delivery = DeliveryDefaults(batch_size=50, batch_bytes=1_000_000, rate_limit=300,
                                concurrency=8)

    @property
    def _base_url(self) -> str:
        return self.settings.rest_endpoint or INSTANCES[self.settings.instance]

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        settings = self.settings
        label = settings.anonymous_alias_label
        reference = translate.user_reference(event, label, _update_existing_only(
            options, settings.update_existing_only))
        action = semantic_action(event)
        if action == "delete":
            if event.userId:
                return [Payload({"external_ids": [event.userId]}, DELETE)]
            return [Payload({"user_aliases": [translate.anonymous_alias(event, label)]}, DELETE)]
        if action is not None:
            raise SkipEvent(f"Braze's user API has no {action} operation; subscription state "
                            "is managed through subscription groups")

        if event.type == "identify":
            found = [Payload({"attributes": [{**reference,
                                              **translate.attributes(event.traits)}]}, TRACK)]
            if event.userId and event.anonymousId:
                found.append(Payload({"aliases_to_identify": [translate.identify_alias(
                    event.userId, translate.anonymous_alias(event, label))]}, IDENTIFY))
            return found
        if event.type == "alias":
            # The previous id's alias-only profile (if there is one) merges into the user;
            # Braze ignores the request when there is none ("Identify users").
            alias = {"alias_name": event.previousId or "", "alias_label": label}
            return [Payload({"aliases_to_identify": [
                translate.identify_alias(event.userId or "", alias)]}, IDENTIFY)]
        if event.type == "group":
            # Braze has no groups; Segment's Braze destination marks membership this way.
            return [Payload({"attributes": [{**reference,
                                             f"ab_segment_group_{event.groupId}": True}]}, TRACK)]
        if event.type in ("page", "screen"):
            if not settings.track_pages:
                raise SkipEvent(f"{event.type} calls are not sent to Braze unless `track_pages` "
                                "is on (each custom event costs data points)")
            return [Payload({"events": [translate.custom_event(
                translate.page_event_name(event), event, event.properties, reference,
                settings.app_id)]}, TRACK)]

        assert event.event is not None  # required for track by parse_event
        bought = translate.purchases(event, reference, settings.app_id) \
            if event.event == ORDER_COMPLETED else []
        found = [Payload({"purchases": [purchase]}, TRACK) for purchase in bought]
        if not bought or settings.order_completed_event:
            found.insert(0, Payload({"events": [translate.custom_event(
                event.event, event, event.properties, reference, settings.app_id)]}, TRACK))
        return found

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        """The payloads' objects, each array concatenated in payload order."""
        group = payloads[0].group
        data: dict[str, Any] = {}
        for payload in payloads:
            for key, items in payload.body.items():
                data.setdefault(key, []).extend(items)
        if group == IDENTIFY:
            data["merge_behavior"] = "merge"  # keep the anonymous profile's data
        token = self.settings.api_key.get_secret_value()
        return HttpRequest.json("POST", f"{self._base_url}{PATHS[group]}", data,
                                {"Authorization": f"Bearer {token}"})

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        if response.status == 429:
            return responses.rate_limited(payloads, response)
        if not 200 <= response.status < 300:
            return None
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if not isinstance(errors, list) or not errors:
            return None
        return responses.refused_items(payloads, errors)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.rest_endpoint,) if self.settings.rest_endpoint else ()


def _update_existing_only(options: Mapping[str, Any], default: bool) -> bool:
    value = options.get("update_existing_only", default)
    if not isinstance(value, bool):
        raise EventRejected("integrations option update_existing_only: expected true or false")
    return value
