"""Sends each event to one URL: the normalized event as JSON, or a body rendered from a
sandboxed jinja2 template (``event`` and ``options`` in scope)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router import (DeliveryDefaults, Destination, Event, EventRejected, HttpRequest, HttpUrl,
                    Payload, SkipEvent, Template, template_event)


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_REFUSED = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Control characters but the tab, which RFC 9110 allows inside a field value."""


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="Where to send, http:// or https://. Private, loopback and "
                                 "link-local hosts need `egress.allow_private_addresses`.")
    method: Literal["POST", "PUT", "PATCH"] = Field("POST", description="HTTP method.")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra request headers. Values are treated as secrets and masked.")
    body: str | None = Field(
        None, description="Optional jinja2 template of the body (sandboxed), with `event` and "
                          "`options` in scope. Without it the body is the event as JSON.")

    @field_validator("headers")
    @classmethod
    def _headers_http_can_carry(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """A line break in a value passed the check, then every event was dead-lettered as
        a bug of the plugin (aiohttp refuses to send it): said at load instead, with the
        field. The value itself is never quoted: it is a secret."""
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an HTTP header name (letters, digits and "
                                 "!#$%&'*+-.^_`|~ only)")
            if _HEADER_VALUE_REFUSED.search(value.get_secret_value()):
                raise ValueError(f"the value of header {name!r} holds a line break or another "
                                 "control character, which no HTTP header can carry")
        return headers

    @model_validator(mode="after")
    def _one_authorization(self) -> WebhookSettings:
        """aiohttp refuses to send a request with both: the check passed, then every
        delivery failed as a bug, with a traceback each (observability audit)."""
        if (urlsplit(self.url).username is not None
                and any(name.lower() == "authorization" for name in self.headers)):
            raise ValueError("a URL with user:password@ sends its own Authorization header: "
                             "give either that or headers.Authorization, not both")
        return self


class Webhook(Destination[WebhookSettings]):
    plugin_name = "webhook"
    Settings = WebhookSettings
    delivery = DeliveryDefaults(timeout=10, concurrency=8)

    def __init__(self, settings: WebhookSettings) -> None:
        super().__init__(settings)
        self._template = Template(settings.body, where="settings.body",
                                  names=("event", "options")) if settings.body else None
        # The event as JSON is sent as it was spooled; a template's text is not JSON.
        self.opaque_bodies = self._template is None
        # Without a template the event goes as it came, amounts the core could not read too
        # ("$25.00"); a template may compute with them, so it gets numbers or nothing.
        self.reads_amounts = self._template is not None
        self._headers = {name: value.get_secret_value()
                         for name, value in settings.headers.items()}

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if self._template is None:  # the same body for every webhook: serialized once
            return [event.shared("webhook:event", _event_payload, event)]
        body = self._template.render(event=template_event(event), options=dict(options))
        if not body.strip():  # as Slack's: a template's way to leave an event out
            raise SkipEvent("settings.body rendered nothing for this event")
        if body.lstrip()[:1] in ("{", "[") and (
                why := _not_json(body, keys_checked=not self._template.writes_values_as_json)):
            # Meant as JSON, broken by this event's values (a quote in a name, say): sent as
            # text it would reach the receiver as a body it cannot parse, or as one whose
            # fields the event chose (`x", "role": "admin` in a name put in without tojson).
            raise EventRejected(f"settings.body: the template's output starts like JSON but "
                                f"{why} for this event; put values in with `| tojson`")
        return [Payload(body)]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        (payload,) = payloads
        body = payload.body
        if isinstance(body, str):
            content_type = "application/json" if _is_json(body) else "text/plain; charset=utf-8"
            data = body.encode()
        else:
            content_type, data = "application/json", orjson.dumps(body)
        headers = {"Content-Type": content_type, **self._headers}
        return HttpRequest(self.settings.method, self.settings.url, headers, data)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.url,)


def _event_payload(event: Event) -> Payload:
    """The event as it came (``Event.to_dict``), one payload for every webhook without a
    template."""
    return Payload(event.to_dict())


def _not_json(text: str, *, keys_checked: bool) -> str | None:
    """What keeps ``text`` from being the JSON it looks like, or None. With
    ``keys_checked``, a key twice is refused too: a receiver takes one or the other, and the
    router's own intake refuses such a body (``duplicate_key``). The check parses the body
    again, in Python (about 5 µs a key): a template whose values all go through ``tojson``,
    which no value can add a key to, is spared it."""
    def no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            twice = next(key for key in keys if keys.count(key) > 1)
            raise ValueError(f"has the key {twice!r} twice")
        return dict(pairs)

    if not _is_json(text):  # strict, as a receiver reads it (no NaN, say)
        return "is not valid JSON"
    if not keys_checked:
        return None
    try:
        json.loads(text, object_pairs_hook=no_key_twice)
    except ValueError as exc:
        return str(exc)
    return None


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True
