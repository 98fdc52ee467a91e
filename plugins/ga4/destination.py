"""Google Analytics 4 through the Measurement Protocol: ``POST /mp/collect``.

One event becomes one payload holding a complete request body with a single event. Payloads
whose request-level fields (client, user, user properties, consent) are equal share a group,
and ``build_request`` joins up to 25 of them into one request, as GA4 allows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router import (BaseUrl, DeliveryDefaults, Destination, Event, HttpRequest,
                    HttpResponse, Outcome, Payload, PermanentError, SkipEvent)
from router.semantics import semantic_action

from . import translate as t

# MP reference: the global collection host and the EU one, where data is collected in the EU.
REGION_HOSTS = {"global": "https://www.google-analytics.com",
                "eu": "https://region1.google-analytics.com"}
MAX_BODY_BYTES = 130_000  # MP "Limitations": the post body must be smaller than 130 KB


class GA4Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_secret: SecretStr = Field(
        description="Measurement Protocol API secret (Admin > Data streams > your stream > "
                    "Measurement Protocol API secrets). Sent in the query string, masked in "
                    "every output.")
    stream: Literal["web", "app"] = Field(
        "web", description="`web`: a web stream, events carry `client_id`; `app`: a Firebase "
                           "app stream, events carry `app_instance_id`.")
    measurement_id: str | None = Field(
        None, description="Measurement ID of the web stream (`G-XXXXXXXXXX`); required for "
                          "`stream: web`.")
    firebase_app_id: str | None = Field(
        None, description="Firebase App ID of the app stream "
                          "(`1:1234567890:android:abc123`); required for `stream: app`.")
    region: Literal["global", "eu"] = Field(
        "global", description="`global` (www.google-analytics.com) or `eu` "
                              "(region1.google-analytics.com, collection in the EU).")
    base_url: BaseUrl | None = Field(
        None, description="Send to this http(s) base URL instead of the region's host "
                          "(tests, proxies, server-side tagging).")
    debug: bool = Field(
        False, description="Send to `/debug/mp/collect`, GA4's validation server: nothing is "
                           "recorded and its validation messages become permanent errors.")
    lowercase_event_names: bool = Field(
        False, description="Lower-case custom event names (`Course Started` → "
                           "`course_started`); GA4 names are case-sensitive.")
    max_param_value_length: int = Field(
        100, ge=1, le=500, description="Longest string param value: 100 on standard GA4, 500 "
                                       "on GA4 360. page_location, page_referrer and "
                                       "page_title have their own limits (1000, 420, 300).")
    oversized_values: t.Oversized = Field(
        "truncate", description="What to do with a string param or user property over its "
                                "limit: `truncate` it (GA4 would otherwise drop it) or "
                                "`reject` the event.")
    user_property_traits: list[str] = Field(
        default_factory=list,
        description="Traits copied from `context.traits` into GA4 user properties on every "
                    "event. Never list personal data: Google's policy forbids sending email "
                    "addresses, phone numbers or names to GA4.")

    @field_validator("region", mode="before")
    @classmethod
    def _known_region(cls, region: Any) -> Any:
        if isinstance(region, str) and region.strip().lower() in REGION_HOSTS:
            return region.strip().lower()
        raise ValueError("expected `global` (www.google-analytics.com) or `eu` "
                         "(region1.google-analytics.com)")

    @field_validator("measurement_id")
    @classmethod
    def _measurement_id(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("G-") and value[2:].isalnum()):
            raise ValueError("expected a GA4 measurement ID such as G-ABC123XYZ (not the "
                             "stream ID, and not a Universal Analytics UA- ID)")
        return value

    @field_validator("user_property_traits")
    @classmethod
    def _property_names(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = t.name_problem(name, max_length=t.USER_PROPERTY_NAME_MAX,
                                     reserved=t.RESERVED_USER_PROPERTY_NAMES)
            if problem:
                raise ValueError(f"GA4 user property name {name!r} {problem}")
        if len(names) > t.USER_PROPERTIES_MAX:
            raise ValueError(f"GA4 takes at most {t.USER_PROPERTIES_MAX} user properties")
        return names

    @model_validator(mode="after")
    def _stream_id(self) -> GA4Settings:
        if self.stream == "web" and not self.measurement_id:
            raise ValueError("a web stream needs `measurement_id` (G-...)")
        if self.stream == "app" and not self.firebase_app_id:
            raise ValueError("an app stream needs `firebase_app_id`")
        return self


class GoogleAnalytics4(Destination[GA4Settings]):
    plugin_name = "ga4"
    Settings = GA4Settings
    # MP "Limitations": 25 events and 130 KB a request. No rate limit is published
    # (destinations.md §2.1). 429 and 5xx are retried, the default set.
    delivery = DeliveryDefaults(batch_size=25, batch_bytes=MAX_BODY_BYTES, concurrency=8,
                                max_age_limit=t.BACKDATE_MAX.total_seconds() / 2)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        self._skip_unsupported(event)
        settings = self.settings
        limits = _value_limits(settings.max_param_value_length, settings.oversized_values)
        name, pairs, made_items = t.shape(event, limits,
                                          lowercase=settings.lowercase_event_names)
        for key in ("session_id", "engagement_time_msec"):  # what GA4 sessions are made of
            if options.get(key) is not None:
                pairs[key] = options[key]
        ga4_event = {"name": name, "params": t.params(pairs, limits, made_items),
                     # 72 h is measured from receipt, so keep the delivery age limit for retries
                     "timestamp_micros": t.timestamp_micros(
                         event, margin=_retry_margin(self.delivery.max_age))}
        fields = t.request_fields(event, options, limits, stream=settings.stream,
                                  traits=settings.user_property_traits)
        # A body over batch_bytes (130 KB) is rejected by the router when it is routed.
        return [Payload({**fields, "events": [ga4_event]}, group=_group(fields))]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        first = payloads[0].body
        body = {key: value for key, value in first.items() if key != "events"}
        body["events"] = [event for payload in payloads for event in payload.body["events"]]
        settings = self.settings
        stream_key = "measurement_id" if settings.stream == "web" else "firebase_app_id"
        stream_id = settings.measurement_id if settings.stream == "web" \
            else settings.firebase_app_id
        query = urlencode({stream_key: stream_id,
                           "api_secret": settings.api_secret.get_secret_value()})
        base = settings.base_url or REGION_HOSTS[settings.region]
        path = "/debug/mp/collect" if settings.debug else "/mp/collect"
        return HttpRequest.json("POST", f"{base}{path}?{query}", body)

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """Only the validation server says what is wrong; /mp/collect answers 2xx to all."""
        if not (self.settings.debug and 200 <= response.status < 300):
            return None
        answer = response.json()
        messages = answer.get("validationMessages") if isinstance(answer, dict) else None
        if not messages or not isinstance(messages, list):
            return None
        outcomes: list[Outcome] = [None] * len(payloads)
        for message in messages:
            if not isinstance(message, dict):
                continue
            index = _event_index(message.get("fieldPath", ""))
            reason = (f"GA4 validation: {message.get('validationCode', 'invalid')} at "
                      f"{message.get('fieldPath', '?')}: {message.get('description', '')}")
            targets = [index] if index is not None and index < len(payloads) \
                else range(len(payloads))
            for target in targets:
                outcomes[target] = outcomes[target] or PermanentError(reason)
        return outcomes

    def endpoints(self) -> Sequence[str]:
        return (self.settings.base_url,) if self.settings.base_url else ()

    def _skip_unsupported(self, event: Event) -> None:
        action = semantic_action(event)
        if action is not None:
            raise SkipEvent(f"GA4's Measurement Protocol cannot {action} users; use GA4's "
                            f"User Deletion API or the Admin UI (user explorer)")
        if event.type == "identify":
            raise SkipEvent("GA4 has no identify call: user_id travels on every event and "
                            "user properties ride with events (see `user_property_traits`)")
        if event.type == "alias":
            raise SkipEvent("GA4 has no alias call: events of a known user carry user_id, "
                            "which joins their client ids")


@functools.lru_cache(maxsize=16)
def _value_limits(max_length: int, oversized: t.Oversized) -> t.ValueLimits:
    """The settings' value limits, made once per pair: a frozen dataclass costs a call of
    object.__setattr__ a field to build, for every event, and it is never changed."""
    return t.ValueLimits(max_length, oversized)


@functools.lru_cache(maxsize=16)
def _retry_margin(max_age: float) -> timedelta:
    """``max_age`` as a timedelta, made once per value: ``timedelta(seconds=...)`` cost more
    than the rest of the event's time check, for every event. Looked up by value, so a
    destination whose ``delivery`` the router replaces follows it."""
    return timedelta(seconds=max_age)


def _group(fields: Mapping[str, Any]) -> str:
    """Events may share a request only when every request-level field (all of the body but
    its ``events``) is equal."""
    digest = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"request:{digest[:24]}"


def _event_index(field_path: Any) -> int | None:
    """``events[3].params.x`` → 3; None for anything else (GA4 may send null)."""
    if isinstance(field_path, str) and field_path.startswith("events[") and "]" in field_path:
        number = field_path[len("events["):field_path.index("]")]
        return int(number) if number.isascii() and number.isdigit() else None
    return None
