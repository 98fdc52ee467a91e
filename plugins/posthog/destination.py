"""PostHog: every call type through the capture API's ``/batch/`` endpoint, on PostHog Cloud
(US or EU) or a self-hosted instance. Each event carries a ``uuid`` derived from its
messageId, which PostHog deduplicates on (best-effort).

The capture API cannot delete or suppress persons (that takes the persons REST API with a
personal API key), so those semantic events are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from router import (DeliveryDefaults, Destination, Event, HttpRequest, Payload,
                    SkipEvent)
from router.semantics import semantic_action

from . import translate
from .translate import PersonProfiles

# Capture hosts of PostHog Cloud ("POST-only endpoints": note the `.i.`; us.posthog.com and
# eu.posthog.com are the app, not ingestion).
CLOUD_HOSTS = {"US": "https://us.i.posthog.com", "EU": "https://eu.i.posthog.com"}
_APP_HOSTS = {"us.posthog.com": "US", "eu.posthog.com": "EU"}


class PostHogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(
        description="Project API key (`phc_...`, Project settings > Project API key). Sent "
                    "in the body of each request; never stored with the events.")
    host: str = Field(
        "US", description="`US` or `EU` for PostHog Cloud, or the http(s) URL of a self-hosted "
                          "instance or reverse proxy (tests, proxies; subject to the egress "
                          "policy).")
    group_type: str = Field(
        "company", min_length=1,
        description="Group type that group calls write to (PostHog allows 5 per project); an "
                    "event's `group_type` option overrides it.")
    person_profiles: PersonProfiles = Field(
        "always", description="`always`: every event updates a person profile (the capture "
                              "API's default). `identified_only`: events without a userId "
                              "are sent as anonymous events (`$process_person_profile: "
                              "false`), which PostHog bills for less.")
    historical_migration: bool = Field(
        False, description="Mark requests as a historical migration, which PostHog ingests "
                           "on a separate pipeline (for backfills of old events).")

    @field_validator("api_key")
    @classmethod
    def _project_key(cls, key: SecretStr) -> SecretStr:
        if key.get_secret_value().startswith("phx_"):
            raise ValueError("that is a personal API key (phx_...); capture takes the "
                             "project API key (phc_...)")
        return key

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        if host.strip().upper() in CLOUD_HOSTS:
            return host.strip().upper()
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected US, EU or the http(s):// URL of a self-hosted PostHog")
        if parts.hostname in _APP_HOSTS:
            region = _APP_HOSTS[parts.hostname]
            raise ValueError(f"{parts.hostname} is PostHog's app, not its capture host; use "
                             f"`host: {region}` ({CLOUD_HOSTS[region]})")
        return host.rstrip("/")


class PostHog(Destination[PostHogSettings]):
    plugin_name = "posthog"
    opaque_bodies = True  # build_request only lists the bodies
    Settings = PostHogSettings
    # /batch/ takes request bodies up to 20 MB and sets no count limit (PostHog capture docs);
    # posthog-python keeps batches under 5 MiB "to be conservative", and so does the router.
    # Capture publishes no rate limit. Timeout as posthog-python's (15 s).
    # PostHog drops events over 1 MB; the router rejects them over 900 KiB, as PostHog's
    # SDKs do, when they are routed.
    delivery = DeliveryDefaults(batch_size=1000, batch_bytes=5 * 1024 * 1024, timeout=15,
                                max_payload_bytes=translate.MAX_EVENT_BYTES)

    @property
    def _base_url(self) -> str:
        return CLOUD_HOSTS.get(self.settings.host, self.settings.host)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        action = semantic_action(event)
        if action == "delete":
            raise SkipEvent("PostHog's capture API cannot delete a person; that takes the "
                            "persons REST API with a personal API key")
        if action is not None:
            raise SkipEvent(f"PostHog has no {action} operation for a person")
        opts = translate.event_options(options)
        builder = translate.Builder(event, opts, self.settings.person_profiles)
        kind = event.type  # read once: an event's fields are pydantic attributes, not cheap
        if kind == "track":
            name = event.event
            assert name is not None  # required for track by parse_event
            body = builder.capture(translate.track_name(name), event.properties)
        elif kind == "page":
            body = translate.page_event(builder)
        elif kind == "screen":
            body = translate.screen_event(builder)
        elif kind == "identify":
            body = translate.identify_event(builder)
        elif kind == "alias":
            body = translate.alias_event(builder)
        else:  # group
            body = translate.group_event(builder, opts.group_type or self.settings.group_type)
        return [Payload(body)]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        data: dict[str, Any] = {"api_key": self.settings.api_key.get_secret_value(),
                                "batch": [payload.body for payload in payloads]}
        if self.settings.historical_migration:
            data["historical_migration"] = True
        return HttpRequest.json("POST", f"{self._base_url}/batch/", data)

    def endpoints(self) -> Sequence[str]:
        return () if self.settings.host in CLOUD_HOSTS else (self.settings.host,)
