"""Meta (Facebook) Conversions API: ``POST https://graph.facebook.com/{version}/{pixel}/events``.

Each event is one server event; ``build_request`` sends up to 1000 of them as ``data`` and adds
the access token to the request body there, so it never reaches the spool or dead letters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from router import (BaseUrl, DeliveryDefaults, Destination, Event, EventRejected, HttpRequest,
                    HttpResponse, Outcome, Payload, PermanentError, RetryableError, SkipEvent)
from router.semantics import semantic_action

from . import translate as t

GRAPH_HOST = "https://graph.facebook.com"
ActionSource = Literal["website", "app", "email", "phone_call", "chat", "physical_store",
                       "system_generated", "business_messaging", "other"]
ACTION_SOURCES = ActionSource.__args__  # type: ignore[attr-defined]

# Graph API error codes (Graph API "Handling Errors"; destinations.md §2.3): 1 and 2 are
# temporary outages, 4/17/32/613/80004 throttling of the app, user, page or ad account: the
# whole destination waits out a throttle.
TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 613, 80004})
THROTTLING_CODES = frozenset({4, 17, 32, 613, 80004})
# 190: the access token is invalid or expired; 100: a parameter is invalid.
PERMANENT_CODES = frozenset({100, 190})
_MAX_REASON = 300


class MetaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pixel_id: str = Field(description="Pixel (dataset) ID from Events Manager, digits only.")
    access_token: SecretStr = Field(
        description="Conversions API access token (Events Manager > Settings > Generate "
                    "access token). Sent in the request body, masked in every output.")
    api_version: str = Field("v24.0", description="Graph API version, such as v24.0.")
    action_source: ActionSource = Field(
        "website", description="Where the conversions happened: website, app, email, "
                               "phone_call, chat, physical_store, system_generated, "
                               "business_messaging or other. Website events need "
                               "context.page.url and context.userAgent.")
    test_event_code: str | None = Field(
        None, description="Test event code from Events Manager > Test events: events show "
                          "there and are not used for ads. Remove it in production.")
    base_url: BaseUrl | None = Field(
        None, description="Send to this http(s) base URL instead of graph.facebook.com "
                          "(tests, proxies).")

    @field_validator("pixel_id")
    @classmethod
    def _digits(cls, pixel_id: str) -> str:
        if not (pixel_id.strip().isascii() and pixel_id.strip().isdigit()):
            raise ValueError("expected the numeric Pixel (dataset) ID from Events Manager")
        return pixel_id.strip()

    @field_validator("api_version")
    @classmethod
    def _version(cls, version: str) -> str:
        if not re.fullmatch(r"v\d+\.\d+", version.strip()):
            raise ValueError("expected a Graph API version such as v24.0")
        return version.strip()


class MetaConversions(Destination[MetaSettings]):
    plugin_name = "meta_capi"
    opaque_bodies = True  # build_request only lists the bodies
    Settings = MetaSettings
    # Meta docs: at most 1000 events in `data`; about 1 MB a request (RT README). No CAPI-
    # specific rate limit is published; throttling comes back as error codes (read_response).
    delivery = DeliveryDefaults(batch_size=1000, batch_bytes=1_000_000, timeout=30,
                                max_age_limit=t.MAX_EVENT_AGE.total_seconds() / 2)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        self._skip_unsupported(event)
        action_source = options.get("action_source", self.settings.action_source)
        if action_source not in ACTION_SOURCES:
            raise EventRejected(f"action_source {action_source!r} is not one Meta knows: "
                                + ", ".join(ACTION_SOURCES))
        name = t.event_name(event)
        server_event: dict[str, Any] = {
            "event_name": name,
            # one stale event fails the whole request, so keep the delivery age for retries
            "event_time": t.event_time(event, margin=_retry_margin(self.delivery.max_age)),
            "event_id": event.messageId,  # deduplicates against the Pixel's eventID
            "action_source": action_source,
        }
        url = t.source_url(event)
        if url:
            server_event["event_source_url"] = url
        server_event["user_data"] = t.user_data(event, options)
        custom = t.custom_data(event, name)
        if custom:
            server_event["custom_data"] = custom
        server_event.update(t.processing_options(options))
        app_data = options.get("app_data")
        if app_data is not None and isinstance(app_data, Mapping):  # None spares abc's check
            server_event["app_data"] = dict(app_data)
        t.check_required(server_event)
        return [Payload(server_event)]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        settings = self.settings
        body: dict[str, Any] = {"data": [payload.body for payload in payloads]}
        if settings.test_event_code:
            body["test_event_code"] = settings.test_event_code
        body["access_token"] = settings.access_token.get_secret_value()
        url = f"{settings.base_url or GRAPH_HOST}/{settings.api_version}/{settings.pixel_id}/events"
        return HttpRequest.json("POST", url, body)

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """Judge Graph API error bodies, which say more than their status: throttling comes
        as 400/403 with a code, and `is_transient` marks errors worth retrying. Meta accepts
        or refuses a request whole, so every payload gets the same outcome."""
        answer = response.json()
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict):
            return None
        code, subcode = error.get("code"), error.get("error_subcode")
        if not isinstance(code, int) or isinstance(code, bool):
            code = None  # not one of Meta's codes (a list would not even hash)
        message = str(error.get("error_user_msg") or error.get("message") or "")
        token = self.settings.access_token.get_secret_value()
        if token:
            message = message.replace(token, "**REDACTED**")
        reason = f"Meta error {code}" + (f"/{subcode}" if subcode else "") + \
            f": {message[:_MAX_REASON]}"
        outcome: Outcome
        if error.get("is_transient") is True or code in TRANSIENT_CODES:
            outcome = RetryableError(reason, retry_after=_retry_after(response.headers),
                                     pause_destination=code in THROTTLING_CODES or None)
        elif code in PERMANENT_CODES:
            outcome = PermanentError(reason)
        else:
            return None
        return [outcome] * len(payloads)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.base_url,) if self.settings.base_url else ()

    def _skip_unsupported(self, event: Event) -> None:
        action = semantic_action(event)
        if action == "delete":
            raise SkipEvent("Meta has no per-user delete API; use data_processing_options "
                            "for CCPA")
        if action is not None:
            raise SkipEvent(f"Meta has no per-user {action} API; use data_processing_options "
                            f"(Limited Data Use) on the user's events instead")
        if event.type in ("identify", "group", "alias"):
            raise SkipEvent(f"Meta's Conversions API takes conversions only: {event.type} "
                            f"calls have nothing to send (traits reach Meta as user_data on "
                            f"the user's events)")


@functools.lru_cache(maxsize=16)
def _retry_margin(max_age: float) -> timedelta:
    """``max_age`` as a timedelta, made once per value: ``timedelta(seconds=...)`` cost more
    than the rest of the event's time check, for every event. Looked up by value, so a
    destination whose ``delivery`` the router replaces follows it."""
    return timedelta(seconds=max_age)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: ``Retry-After``, else the longest ``estimated_time_to_regain_access``
    (minutes) in ``X-Business-Use-Case-Usage`` (Graph API "Rate Limiting")."""
    lowered = {name.lower(): value for name, value in headers.items()}
    retry_after = lowered.get("retry-after", "")
    if retry_after.strip().isascii() and retry_after.strip().isdigit():
        return float(retry_after)
    try:
        usage = orjson.loads(lowered.get("x-business-use-case-usage", "") or "null")
    except orjson.JSONDecodeError:
        return None
    minutes = [entry.get("estimated_time_to_regain_access", 0)
               for entries in (usage.values() if isinstance(usage, dict) else ())
               if isinstance(entries, list)
               for entry in entries if isinstance(entry, dict)]
    longest = max((m for m in minutes if isinstance(m, (int, float))), default=0)
    return float(longest) * 60 if longest > 0 else None
