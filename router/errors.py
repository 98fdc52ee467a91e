"""The error types of the router, and what each one means for delivery.

Adapters raise these instead of checking statuses ad hoc; the core turns them into outcomes
(skipped, invalid, retried, dead-lettered) and carries the human-readable ``reason`` all the way
to dry-run output, dead letters, logs and metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class RouterError(Exception):
    """Base class of every error the router raises on purpose."""


class ConfigError(RouterError):
    """The configuration cannot be used. Raised at start, never while running.

    ``str()`` names the file, the line and the field, and says what was expected.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.message = file, line, field, message
        where = ":".join(str(part) for part in (file, line) if part is not None)
        prefix = f"{where}: " if where else ""
        field_part = f"{field}: " if field else ""
        super().__init__(f"{prefix}{field_part}{message}")


class InvalidEvent(RouterError):
    """An event breaks the spec. It is rejected alone; its neighbours carry on.

    ``problems`` lists ``(field, message)`` pairs. Input values are never echoed, so an
    event carrying a secret cannot leak it through an error message.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(problems_text(problems))


def problems_text(problems: Iterable[tuple[str, str]]) -> str:
    """``(field, message)`` pairs as one reason: ``field: message; ...``."""
    return "; ".join(f"{field}: {message}" if field else message for field, message in problems)


class StorageFull(RouterError):
    """The storage refused new work: its disk budget is spent, its disk is full, or Redis is
    out of memory or cannot persist. Intake must answer "try later"."""


class SpoolInUse(RouterError):
    """Another router is delivering from this SQLite spool. A SQLite file takes one delivering
    router: two would each send the same jobs (a spool's read position lives in its process).
    Several routers share work through ``redis://``."""


class StorageUnavailable(RouterError):
    """The storage cannot be reached or written now: Redis down, hung, loading or out of
    connections; a SQLite disk that fails or is read-only, a spool locked by another
    process for too long, or a spool file damaged on disk.
    Intake answers "try later": what it could not confirm was not acknowledged, and a retry of
    what did get in is a duplicate, so nothing is lost or doubled."""


class StorageMisconfigured(RouterError):
    """The storage is set up in a way that loses or doubles accepted work (a Redis that
    evicts keys, a spool file of a later layout than this version reads): refused when it
    is opened, with what to change."""


class DestinationError(RouterError):
    """Base of what a destination adapter raises. ``reason`` is shown to people as it is."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SkipEvent(DestinationError):
    """The destination has no meaning for this event (a call type or semantic event it does
    not support). Not a failure: the event is reported as skipped with the reason."""


class EventRejected(DestinationError):
    """The destination's API would reject this event (a name too long, a purchase without a
    currency, ...). Raised before sending, above all where the vendor fails silently; the
    event is reported invalid for this destination only."""


class RetryableError(DestinationError):
    """Sending failed in a way that may pass later (timeout, 429, 5xx, a transient error in
    a 200 body). The core retries with backoff, no sooner than ``retry_after`` seconds.

    ``pause_destination`` says whether the wait is the whole destination's (its account or
    key is throttled) or only this event's. When every event of an answer has a
    ``retry_after`` and pauses, the core holds every request of the destination that long:
    sending other events meanwhile would only prolong the throttling. None (the default)
    leaves it to the status, as for the core's own judgement: a 429 or 503 pauses. True for
    a throttle an API says in other ways (Meta's error codes in a 400); False where it
    throttles users or devices one by one (Amplitude): the others' events need not wait,
    and the core holds back the same user's other events as long.

    ``caused_by_others`` says the API refused this event only for the others in its request
    (Amplitude and Customer.io refuse a request whole for one bad event, naming it): the event
    goes again at once, and the attempt is not counted, neither towards ``max_attempts`` nor
    towards ``order_hold_attempts``, so one bad event does not cost its neighbours their
    attempts or their users their order. Honoured only when the same answer fails another
    event for its own sake; else it is an ordinary retry, so a request refused whole always
    counts."""

    # Class defaults too: a plugin's subclass written before these existed may set only its
    # own attributes.
    retry_after: float | None = None
    pause_destination: bool | None = None
    caused_by_others: bool = False

    def __init__(self, reason: str, *, retry_after: float | None = None,
                 pause_destination: bool | None = None, caused_by_others: bool = False
                 ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.pause_destination = pause_destination
        self.caused_by_others = caused_by_others


class PermanentError(DestinationError):
    """Sending failed and will fail again unchanged (400, 401, 404, ...). The event goes to
    the dead-letter store at once, with this reason."""


PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit, GeneratorExit,
                                                    asyncio.CancelledError)
"""What a plugin's (synchronous) hook may raise that must cost only its own events: every
exception but ``KeyboardInterrupt``. A ``SystemExit`` or ``CancelledError`` raised inside a
plugin is the plugin's doing, not the process's or the task's."""
