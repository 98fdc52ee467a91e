"""The integrations map: which destinations an event asks for, decided purely.

RudderStack's algorithm with the contract's changes: ``"All": false`` turns every destination
off unless it is named with a truthy value, ``"All": true`` (the default) turns them on unless
named with ``false`` (``null``, which some client libraries write for "not set", leaves them
on); names match case-insensitively, ``All`` too; an object value means enabled and is handed
to the destination as per-event options; a destination that is off by default is reached only
by events that name it with a truthy value.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})


class Decision(NamedTuple):
    """Whether one destination takes one event, with its per-event options or the reason not."""

    enabled: bool
    options: Mapping[str, Any] = _NO_OPTIONS
    reason: str = ""


# The decision for most destinations of most events, made once: a NamedTuple with defaults
# costs a Python-level call to build, and this runs for every destination of every event.
_ENABLED = Decision(True)


class IntegrationsMap:
    """An event's ``integrations`` object, read once so each destination's lookup is cheap."""

    __slots__ = ("all_on", "named", "if_on_by_default")

    def __init__(self, integrations: Mapping[str, Any] | None) -> None:
        self.all_on = True
        self.named: dict[str, Any] = {}
        self.if_on_by_default: Decision | None = _ENABLED
        """The decision for every destination on by default when the map names none and
        leaves "All" on (most events carry no map at all), else None: ``decide`` gives the
        same, and routing, which runs for every destination of every event, need not ask."""
        if not integrations:
            return
        for key, value in integrations.items():
            name = key.lower()
            if name == "all":
                self.all_on = value is not False
            else:
                self.named[name] = value
        if self.named or not self.all_on:
            self.if_on_by_default = None

    @classmethod
    def of(cls, integrations: Mapping[str, Any] | None) -> IntegrationsMap:
        """``IntegrationsMap(integrations)``, the same map for every event that carries
        none (most do): it is never changed, and routing makes one for every event."""
        return cls(integrations) if integrations else _NO_MAP

    def decide(self, name: str, *, default_on: bool = True) -> Decision:
        """The decision for the destination configured as ``name``."""
        key = name.lower()
        value = self.named.get(key)
        if value is not None:  # null is how some client libraries write "not set"
            if isinstance(value, dict):
                return Decision(True, value)
            # On by default, only false turns it off; off by default, only a truthy value
            # turns it on.
            named_on = value is not False if self.all_on and default_on else bool(value)
            if named_on:
                return _ENABLED
            return Decision(False, reason=f"integrations map turns {name} off")
        if not default_on:
            return Decision(False, reason=f"{name} is off by default and the event does not "
                                          "name it in its integrations map")
        if not self.all_on:
            return Decision(False, reason=f'integrations map has "All": false and does not '
                                          f"name {name}")
        return _ENABLED


_NO_MAP = IntegrationsMap(None)


def decide(integrations: Mapping[str, Any] | None, name: str, *, default_on: bool = True
           ) -> Decision:
    """One-shot form of ``IntegrationsMap(integrations).decide(name)``."""
    return IntegrationsMap(integrations).decide(name, default_on=default_on)
