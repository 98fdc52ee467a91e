"""An asyncio fan-out router for Segment-spec analytics events.

The public API: everything a library user or a plugin author needs is importable from here.
The router itself (``Router``, ``RouteResult``, ``DestinationResult``, ``Status``), the
config loaders and the user templates (``Template``, ``template_event``) are imported when
first asked for, so a plugin that needs only ``Event`` and ``Destination`` does not load the
router's storage, server and jinja2. ``router.semantics`` (the spec's event names with a
meaning) and ``router.testing`` are the plugin API's other two modules.
"""

import importlib
from typing import TYPE_CHECKING, Any

from router.destination import (DEFAULT_RETRY_STATUSES, BaseUrl, DeliveryDefaults, Destination,
                                HttpRequest, HttpResponse, HttpUrl, Outcome, Payload,
                                basic_auth)
from router.errors import (ConfigError, DestinationError, EventRejected, InvalidEvent,
                           PermanentError, RetryableError, RouterError, SkipEvent, SpoolInUse,
                           StorageFull, StorageMisconfigured, StorageUnavailable)
from router.events import MAX_EVENT_BYTES, CallType, Event, as_number, format_time, parse_event
from router.hookspecs import RegisterDestination, hookimpl

if TYPE_CHECKING:
    from router.config import LoadedConfig, load_config, parse_config
    from router.routing import DestinationResult, RouteResult, Router, Status
    from router.templates import Template, template_event

_LAZY = {"Router": "router.routing", "RouteResult": "router.routing",
         "DestinationResult": "router.routing", "Status": "router.routing",
         "LoadedConfig": "router.config", "load_config": "router.config",
         "parse_config": "router.config", "Template": "router.templates",
         "template_event": "router.templates"}


def __dir__() -> list[str]:
    """The lazy names too, for completion in a shell or an editor."""
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")

__all__ = [
    "DEFAULT_RETRY_STATUSES", "MAX_EVENT_BYTES", "BaseUrl", "CallType", "ConfigError",
    "DeliveryDefaults", "Destination", "DestinationError", "DestinationResult", "Event",
    "EventRejected", "HttpRequest", "HttpResponse", "HttpUrl", "InvalidEvent", "LoadedConfig",
    "Outcome", "Payload", "PermanentError", "RegisterDestination", "RetryableError",
    "RouteResult", "Router", "RouterError", "SkipEvent", "SpoolInUse", "Status", "StorageFull",
    "StorageMisconfigured", "StorageUnavailable", "Template", "as_number", "basic_auth",
    "format_time", "hookimpl", "load_config", "parse_config", "parse_event", "template_event",
]
