"""An asyncio fan-out router for Segment-spec analytics events.

The public API: everything a library user or a plugin author needs is importable from here.
"""

from router.destination import (DEFAULT_RETRY_STATUSES, BaseUrl, DeliveryDefaults, Destination,
                                HttpRequest, HttpResponse, HttpUrl, Outcome, Payload,
                                basic_auth)
from router.errors import (ConfigError, DestinationError, EventRejected, InvalidEvent,
                           PermanentError, RetryableError, RouterError, SkipEvent, SpoolInUse,
                           StorageFull, StorageMisconfigured, StorageUnavailable)
from router.events import Event, parse_event
from router.hookspecs import hookimpl

__all__ = [
    "DEFAULT_RETRY_STATUSES", "BaseUrl", "ConfigError", "DeliveryDefaults", "Destination",
    "DestinationError", "Event", "EventRejected", "HttpRequest", "HttpResponse", "HttpUrl",
    "InvalidEvent", "Outcome", "Payload", "PermanentError", "RetryableError", "RouterError",
    "SkipEvent", "SpoolInUse", "StorageFull", "StorageMisconfigured", "StorageUnavailable",
    "basic_auth", "hookimpl", "parse_event",
]
