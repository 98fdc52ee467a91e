"""A destination's ``filter`` from the config: call types and track event names it takes.

Declarative on purpose: it compiles to a set lookup and one regex, cheap on every event, where
an expression language would cost more than the rest of the routing.
"""

from __future__ import annotations

import fnmatch
import re

from router.config import FilterConfig
from router.events import Event


class EventFilter:
    """Compiled once at load; ``reason(event)`` is None when the event passes."""

    def __init__(self, config: FilterConfig) -> None:
        self.types = frozenset(config.types) if config.types is not None else None
        self.events = _patterns(config.events)
        self.exclude = _patterns(config.exclude_events)

    def reason(self, event: Event) -> str | None:
        if self.types is not None and event.type not in self.types:
            return f"filter takes only {', '.join(sorted(self.types))} calls"
        if event.type == "track":
            name = event.event or ""
            if self.events is not None and not self.events.match(name):
                return f"filter does not take the event {name!r}"
            if self.exclude is not None and self.exclude.match(name):
                return f"filter excludes the event {name!r}"
        return None


def _patterns(globs: list[str] | None) -> re.Pattern[str] | None:
    if globs is None:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs) or "(?!)")
