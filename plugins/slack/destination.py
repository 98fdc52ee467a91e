"""The ``slack`` destination: a message in a Slack channel per event, through an incoming webhook.

The message ``text`` is rendered from a sandboxed jinja2 template (one per call type, compiled
once when the config loads). Event values are escaped for Slack before the template sees them,
so an event can neither mention ``@channel`` nor forge a link; the template's own text keeps
Slack's markup (``*bold*``, ``<https://…|links>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, field_validator,
                      model_validator)

from router import (CallType, DeliveryDefaults, Destination, Event, EventRejected, HttpRequest,
                    HttpResponse, Outcome, Payload, PermanentError, SkipEvent, Template,
                    template_event)
from router.semantics import semantic_action

TemplateKey = Literal["default", "track", "identify", "page", "screen", "group", "alias"]

MAX_TEXT_CHARS = 40_000
"""Slack truncates message text past 40,000 characters (chat.postMessage "text" limit); we
refuse rather than post a cut message."""

_WHO = "{{ event.userId or event.anonymousId }}"
BUILTIN_TEMPLATES: dict[str, str] = {
    "track": "*{{ event.event }}* by " + _WHO,
    "identify": "*Identified* " + _WHO
                + "{% if event.traits.get('email') %} ({{ event.traits.email }}){% endif %}",
    "page": "*Viewed page* {{ event.name or event.properties.get('url') or 'unnamed' }} by "
            + _WHO,
    "screen": "*Viewed screen* {{ event.name or 'unnamed' }} by " + _WHO,
    "group": _WHO + " joined group *{{ event.groupId }}*",
    "alias": "{{ event.previousId }} is now known as {{ event.userId }}",
}
"""What each call type says when the config gives no template for it."""

class SlackSettings(BaseModel):
    # The webhook URL is the credential: keep it out of validation errors.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: SecretStr = Field(description="Incoming webhook URL (https://hooks.slack.com/services/"
                                       "…). It is the secret: anyone with it can post.")
    types: list[CallType] = Field(
        default_factory=lambda: list[CallType](("track", "identify")),
        description="Call types that post a message; others are skipped.")
    events: list[str] | None = Field(
        None, description="Track event names or glob patterns (`Order *`) that post. Unset: "
                          "every track event except semantic ones (`Delete Person`, ...).")
    templates: dict[TemplateKey, str] = Field(
        default_factory=dict,
        description="Message text per call type (`track`, `identify`, ...) as sandboxed jinja2 "
                    "with `event` and `options` in scope; `default` serves the listed types "
                    "that have none. Without either, a built-in text is used.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: SecretStr) -> SecretStr:
        parts = urlsplit(url.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected the webhook's https:// URL, as Slack shows it under "
                             "Incoming Webhooks")
        return url

    @model_validator(mode="after")
    def _templates_for_listed_types(self) -> SlackSettings:
        unused = sorted(key for key in self.templates if key != "default" and key not in self.types)
        if unused:
            raise ValueError(f"templates for {', '.join(unused)} are set, but `types` does not "
                             f"list them (types: {', '.join(self.types)})")
        return self


class Slack(Destination[SlackSettings]):
    plugin_name = "slack"
    Settings = SlackSettings
    # A message for people: "Order Completed for $25.00" is worth sending as it came.
    reads_amounts = False
    # Incoming webhooks take one message per request and about one message a second per
    # webhook, short bursts tolerated (Slack "Rate limits"); 429 carries Retry-After.
    delivery = DeliveryDefaults(batch_size=1, rate_limit=1.0, concurrency=1)

    def __init__(self, settings: SlackSettings) -> None:
        super().__init__(settings)
        self._templates = {call_type: _compile(settings.templates, call_type)
                           for call_type in settings.types}

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        template = self._templates.get(event.type)
        if template is None:
            raise SkipEvent(f"Slack posts only {', '.join(self.settings.types)} calls "
                            "(setting `types`)")
        if event.type == "track":
            self._check_event_name(event)
        text = template.render(event=slack_escaped(template_event(event)),
                               options=slack_escaped(dict(options))).strip()
        if not text:
            raise SkipEvent(f"{template.where} rendered no text for this event")
        if len(text) > MAX_TEXT_CHARS:
            raise EventRejected(f"{template.where}: the message is {len(text)} characters; "
                                f"Slack takes at most {MAX_TEXT_CHARS}")
        return [Payload({"text": text})]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        (payload,) = payloads
        return HttpRequest.json("POST", self.settings.url.get_secret_value(), payload.body)

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        """Slack answers a refused message with a status and a plain-text reason
        (``channel_not_found``); 4xx other than 429 never get better, so they fail with that
        reason. 429 ``rate_limited`` and 5xx are left to the core, which retries them no
        sooner than ``Retry-After`` and slows the whole destination down."""
        if response.status not in (400, 403, 404, 410):
            return None
        code = _reason_code(response.body)
        hint = _HINTS.get(code, "")
        reason = f"Slack refused the message: HTTP {response.status} {code}".rstrip()
        return [PermanentError(reason + (f" ({hint})" if hint else ""))] * len(payloads)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.url.get_secret_value(),)

    def _check_event_name(self, event: Event) -> None:
        name = event.event or ""
        patterns = self.settings.events
        if patterns is None:
            if semantic_action(event) is not None:
                raise SkipEvent(f"{name} is a semantic event and Slack has no such operation; "
                                "list it in `events` to post it")
        elif not any(fnmatchcase(name, pattern) for pattern in patterns):
            raise SkipEvent(f"{name!r} matches none of the `events` setting")


def _compile(templates: Mapping[TemplateKey, str], call_type: CallType) -> Template:
    """The call type's own template, else ``default``, else the built-in text."""
    key: TemplateKey
    for key in (call_type, "default"):
        if key in templates:
            return Template(templates[key], where=f"settings.templates.{key}",
                            names=("event", "options"))
    return Template(BUILTIN_TEMPLATES[call_type], where=f"built-in {call_type} template")


def slack_escaped(value: Any) -> Any:
    """Strings with ``&``, ``<`` and ``>`` escaped, as Slack asks of text it must not read as
    markup ("Formatting text for app surfaces": escaping text), at any depth, keys included:
    a template that prints ``properties.items()`` shows them. Ordinary names have none of the
    three, so templates look values up by the same names."""
    if isinstance(value, str):
        return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if isinstance(value, dict):
        return {slack_escaped(key): slack_escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [slack_escaped(item) for item in value]
    return value


def _reason_code(body: bytes) -> str:
    """Slack's reason (``channel_not_found``), short and printable, for the dead letter."""
    text = body[:200].decode("utf-8", errors="replace").strip()
    return "".join(char if char.isprintable() else " " for char in text)[:100]


# Slack's documented webhook errors and what an operator should do about each.
_HINTS = {
    "invalid_payload": "the message is not valid for Slack; check the template's output",
    "no_text": "the message has no text",
    "user_not_found": "the webhook's user no longer exists",
    "action_prohibited": "a workspace admin restricted posting to this channel",
    "posting_to_general_channel_denied": "only admins may post to that channel",
    "invalid_token": "the webhook was revoked; create a new one",
    "no_service": "the webhook was disabled or removed; create a new one",
    "no_team": "the workspace of the webhook no longer exists",
    "team_disabled": "the Slack workspace is disabled",
    "channel_not_found": "the webhook's channel was deleted or the app removed from it",
    "channel_is_archived": "the webhook's channel is archived",
}
