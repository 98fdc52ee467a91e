"""Configured destinations: a plugin's adapter with its settings, delivery limits, filter and
mapping overrides, built once from the config and checked there, so problems fail at start."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from router.config import DestinationConfig, LoadedConfig, RouterConfig, secret_as_given
from router.delivery.batching import payload_limit
from router.delivery.egress import EgressPolicy, check_url
from router.destination import (DeliveryDefaults, Destination, Payload, checked_payloads,
                                refuse_unread_amounts)
from router.errors import PLUGIN_FAILURES, ConfigError
from router.events import Event
from router.filters import EventFilter
from router.redaction import Masker, passwords_of_urls_in, secret_values, values_found_in
from router.registry import DestinationType, Registry
from router.templates import Template, template_event

log = logging.getLogger("router.destinations")


@dataclass
class ConfiguredDestination:
    """One ``destinations[]`` entry, ready to route to."""

    name: str
    plugin: DestinationType
    adapter: Destination[Any]
    delivery: DeliveryDefaults
    default_on: bool = True
    event_filter: EventFilter | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    property_templates: Mapping[str, Template] = field(default_factory=dict)
    masker: Masker = field(default_factory=Masker)
    payload_limit: int = field(init=False)
    """The most bytes a payload's body may have (``delivery``'s, worked out once)."""
    transforms: bool = field(init=False)
    """Whether the operator's mapping changes events before translation."""

    def __post_init__(self) -> None:
        self.payload_limit = payload_limit(self.delivery)
        self.transforms = bool(self.renames or self.property_templates)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        """The adapter's translation, after the operator's mapping overrides. What it returns
        is checked here, where a mistake costs only this event: a payload of the wrong type,
        or a group that is not a string, would otherwise break the destination's batching
        later, for every event queued behind it. Amounts the adapter relies on and the router
        could not read make the event invalid here, before the mapping, which cannot repair
        them (``refuse_unread_amounts``)."""
        adapter = self.adapter
        refuse_unread_amounts(adapter, event)
        if self.transforms:
            event = self._apply_mapping(event)
        return checked_payloads(adapter.translate(event, options))

    def _apply_mapping(self, event: Event) -> Event:
        update: dict[str, Any] = {}
        if event.event is not None and event.event in self.renames:
            update["event"] = self.renames[event.event]
        if self.property_templates:
            context = template_event(event)
            properties = dict(event.properties)
            for key, template in self.property_templates.items():
                properties[key] = template.render(event=context)
            update["properties"] = properties
        if not update:
            return event
        mapped = event.model_copy(update=update)
        # A copy starts without it: a destination with reads_amounts off must still see it.
        object.__setattr__(mapped, "_amount_problems", event.amount_problems)
        return mapped


def build_destinations(loaded: LoadedConfig, registry: Registry, egress: EgressPolicy
                       ) -> list[ConfiguredDestination]:
    """Every enabled destination of the config; ``ConfigError`` with file and line on any
    problem (unknown plugin, bad settings, a template that does not compile, a URL the
    egress policy refuses)."""
    built, errors = [], []
    for index, entry in enumerate(loaded.config.destinations):
        if entry.enabled:
            try:
                built.append(_build(loaded, registry, egress, index, entry))
            except ConfigError as exc:  # say what is wrong with the others too: with
                errors.append(exc)  # hundreds of destinations, one a run is slow to fix
    if errors:
        first, *rest = errors
        if not rest:
            raise first
        more = "; ".join(f"line {error.line}: {error.field}: {error.message}"
                         for error in rest[:MORE_ERRORS_SHOWN])
        if len(rest) > MORE_ERRORS_SHOWN:
            more += f"; and {len(rest) - MORE_ERRORS_SHOWN} more"
        raise ConfigError(f"{first.message} (also: {more})", file=first.file, line=first.line,
                          field=first.field)
    return built


_QUOTED = re.compile(r"'[^'\n]*'")
"""What jinja2 quotes in a syntax error: a token of the template's text."""

MORE_ERRORS_SHOWN = 5
"""Destinations' problems listed after the first in one config error."""


def egress_policy(config: RouterConfig) -> EgressPolicy:
    """The config's ``egress`` section as the policy the transport enforces."""
    return EgressPolicy(allow_private_addresses=config.egress.allow_private_addresses,
                        allowed_networks=tuple(config.egress.allowed_networks))


def _build(loaded: LoadedConfig, registry: Registry, egress: EgressPolicy, index: int,
           entry: DestinationConfig) -> ConfiguredDestination:
    source = loaded.source
    path: tuple[Any, ...] = ("destinations", index)
    try:
        plugin = registry.get(entry.plugin)
    except ConfigError as exc:
        raise source.error((*path, "plugin"), exc.message) from None
    from_environment = values_found_in(entry.settings, loaded.environment_values)
    from_environment += passwords_of_urls_in(entry.settings)

    def masker_of(settings: BaseModel | None) -> Masker:
        """The destination's secrets: its settings' secret fields (once they are read) and
        what its settings took from the environment."""
        return Masker([*(secret_values(settings) if settings else ()), *from_environment])

    def broken(exc: BaseException, where: str, settings: BaseModel | None = None
               ) -> ConfigError:
        """A plugin that fails in its own code: its message masked (it may quote a secret),
        with the plugin named, and no traceback."""
        return source.error((*path, "settings"), masker_of(settings).mask(
            f"{entry.plugin} ({plugin.package} {plugin.version}) failed {where}: "
            f"{type(exc).__name__}: {exc}"))

    try:
        settings = plugin.cls.Settings.model_validate(entry.settings)
    except ValidationError as exc:
        raise source.validation_error(exc, (*path, "settings")) from None
    except PLUGIN_FAILURES as exc:
        raise broken(exc, "checking its settings") from None
    for name in settings.model_fields_set:  # as the config gave them: a default may be ""
        secret = getattr(settings, name)
        if isinstance(secret, SecretStr):
            try:
                secret_as_given(secret)
            except ValueError as exc:
                raise source.error((*path, "settings", name), str(exc)) from None
    try:
        adapter = plugin.cls(settings)
    except ConfigError as exc:  # a template's syntax error quotes the template's text
        message = masker_of(settings).mask(exc.message)
        if from_environment:  # ... and a piece of a secret the text took from the environment
            message = _QUOTED.sub("'...'", message)
        raise source.error((*path, *(exc.field or "settings").split(".")), message) from None
    except (ValueError, TypeError) as exc:
        raise source.error((*path, "settings"),
                           masker_of(settings).mask(f"{entry.plugin}: {exc}")) from None
    except PLUGIN_FAILURES as exc:
        raise broken(exc, "to start", settings) from None
    try:
        endpoints = [str(url) for url in adapter.endpoints()]
    except PLUGIN_FAILURES as exc:
        raise broken(exc, "to list its endpoints", settings) from None

    for url in endpoints:
        refused = check_url(url, egress)
        if refused:
            raise source.error((*path, "settings", *_setting_of(entry.settings, url)),
                               f"egress refused: {refused}{_egress_hint(refused)}")

    overrides = entry.delivery.model_dump(exclude_none=True)
    for key, limit, shown, why in _ceilings(entry.plugin, plugin.cls.delivery):
        if limit is not None and overrides.get(key, 0) > limit:
            raise source.error((*path, "delivery", key), f"expected at most {shown}: {why}")
    try:  # validated again as a whole (retry_on's list becomes a frozenset there too)
        delivery = type(plugin.cls.delivery).model_validate(
            {**plugin.cls.delivery.model_dump(), **overrides})
    except ValidationError as exc:
        raise source.validation_error(exc, (*path, "delivery")) from None
    if "order_hold_attempts" in overrides and not delivery.ordered:
        # A plugin may declare a breaker for operators who turn ordering on; an operator's
        # own breaker without ordering would do nothing, unnoticed.
        raise source.error((*path, "delivery", "order_hold_attempts"),
                           "set without ordered: true; it only limits how long an event "
                           "holds its user's later ones in order")
    adapter.delivery = delivery

    templates = {}
    for key, text in entry.mapping.properties.items():
        try:
            templates[key] = Template(text, where=f"mapping.properties.{key}", names=("event",))
        except ConfigError as exc:
            raise source.error((*path, "mapping", "properties", key), exc.message) from None
    return ConfiguredDestination(
        name=entry.name, plugin=plugin, adapter=adapter, delivery=delivery,
        default_on=entry.default_on,
        event_filter=EventFilter(entry.filter) if entry.filter else None,
        renames=dict(entry.mapping.event_names), property_templates=templates,
        masker=masker_of(settings))


def _ceilings(plugin: str, defaults: DeliveryDefaults
              ) -> list[tuple[str, float | None, str, str]]:
    """The delivery settings a config may not raise past the plugin's own: the setting, its
    limit (None: no limit), the limit as shown, and why."""
    def batch(limit: int, unit: str) -> str:
        units = unit if limit != 1 else unit.removesuffix("s")
        return (f"a {plugin} request carries at most {limit} {units} (the plugin's limit, "
                "from its API's); a lower value is allowed")

    age = defaults.max_age_limit
    return [("batch_size", defaults.batch_size, str(defaults.batch_size),
             batch(defaults.batch_size, "payloads")),
            ("batch_bytes", defaults.batch_bytes, str(defaults.batch_bytes),
             batch(defaults.batch_bytes, "bytes")),
            ("max_age", age, f"{(age or 0) / 3600:g}h",
             f"{plugin}'s API refuses events past an age, and an event's last retry must still "
             "reach it in time (the plugin's limit)")]


def _egress_hint(reason: str) -> str:
    """How the config could allow what the egress guard refused, when it can."""
    if "cloud metadata" in reason:
        return (" (only listing the metadata address's own network in egress.allowed_networks "
                "allows it)")
    if reason.endswith(("address", "host name")):
        return (" (set egress.allow_private_addresses, or list its network in "
                "egress.allowed_networks, to allow it)")
    return ""


def _setting_of(settings: Mapping[str, Any], url: str) -> tuple[str, ...]:
    """The setting an endpoint URL came from (the webhook's ``url``, a ``base_url``), so an
    error points at its line; none when no setting holds it."""
    for key, value in settings.items():
        if isinstance(value, str) and value and url.startswith(value.rstrip("/")):
            return (key,)
    return ()
