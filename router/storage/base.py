"""The storage interface every backend implements, and the records it keeps.

A job is one payload for one destination: the unit that is delivered, retried and
dead-lettered. Jobs are written together with the event's dedup record in one atomic
``accept``, so an event is either fully accepted (remembered and queued for every destination)
or not at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class NewJob:
    """A job to queue: ``body`` is the payload's JSON, already serialized. ``ordered`` says
    its destination delivers each user's events in order, so a backend may keep such jobs
    where the per-user check is cheap."""

    destination: str
    message_id: str
    user_key: str
    group: str
    body: bytes
    ordered: bool = False


@dataclass(slots=True)
class Acceptance:
    """One event to accept: its dedup key and its jobs."""

    source: str
    message_id: str
    jobs: Sequence[NewJob]


@dataclass(slots=True)
class Job:
    """A queued job as a worker leases it."""

    id: int | str
    destination: str
    message_id: str
    user_key: str
    group: str
    body: bytes
    created_at: float
    attempts: int = 0
    first_attempt_at: float | None = None


@dataclass(slots=True)
class Failure:
    """Why a job failed, kept with a retry or a dead letter (secrets already masked)."""

    reason: str
    status: int | None = None
    request: dict[str, Any] | None = None
    response: str | None = None


@dataclass(slots=True)
class DeadLetter:
    id: int | str
    destination: str
    message_id: str
    user_key: str
    group: str
    body: bytes
    attempts: int
    created_at: float
    failed_at: float
    reason: str
    status: int | None = None
    request: dict[str, Any] | None = None
    response: str | None = None
    first_attempt_at: float | None = None
    """When the job was first sent, None when it never was (lost in the spool, say)."""
    accepted_id: int | str | None = None
    """The id the job had when its event was accepted, kept through replays that failed
    again: the letter's place in its destination's order of acceptance, which a replay
    follows (each user's events in the order they were accepted, whatever order they
    failed in). None for a letter written by a version that did not keep it."""


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    destination: str | None = None
    reason: str | None = None          # substring of the reason
    since: float | None = None         # failed at or after (epoch seconds)
    until: float | None = None
    ids: tuple[int | str, ...] | None = None
    exact_destination: bool = False
    """``destination`` compared as it is, not without case: a replay goes to the queue of
    the letter's very name, which only one of ``Amp`` and ``amp`` has a worker for."""

    def selects(self, destination: str) -> bool:
        """Whether the destination filter selects the letters of ``destination``."""
        if self.destination is None:
            return True
        if self.exact_destination:
            return destination == self.destination
        return destination.lower() == self.destination.lower()


@dataclass(slots=True)
class QueueStats:
    pending: int = 0
    oldest_created_at: float | None = None
    dead_letters: int = 0


@dataclass(slots=True)
class StorageStats:
    queues: dict[str, QueueStats] = field(default_factory=dict)
    dedup_entries: int = 0
    """The message ids the dedup window remembers (``router_dedup_window_ids``)."""
    bytes_used: int | None = None
    disk_free_bytes: int | None = None
    """Free space on the disk the storage writes to, where it has one (SQLite)."""


class Storage(ABC):
    """Durable state. Every method is a coroutine; a method returns only once its change is
    durable in this backend (for ``memory://``, never: it is for tests and dry runs)."""

    leases_lapse: ClassVar[bool] = False
    """Whether several routers deliver from this storage at once (Redis), so that a lease
    may lapse under a live process that stalled past it (stopped, its VM paused) for
    another router to take the job over; a SQLite lease lasts until the next start."""

    @abstractmethod
    async def open(self, *, recover: bool = True) -> None:
        """Connect and create the schema. ``recover`` says who opens it: a router (True), which
        may put the storage right for itself, or a tool that shares it with a running router
        (``router dlq``, ``router check --storage``: False), which must change nothing that
        router relies on. What putting right means is the backend's: Redis puts back to the
        queue the lapsed leases of a process that is gone (after a crash, in-flight work is
        sent again); SQLite checks the file for damage and converts an older layout, and
        takes leases back in ``claim_delivery`` instead, once it knows no other process
        delivers; memory forgets its leases."""

    @abstractmethod
    async def close(self) -> None: ...

    async def claim_delivery(self) -> None:
        """Called before a process starts delivering from this storage. A backend that
        cannot share delivery between processes raises ``SpoolInUse`` when another holds it;
        the claim ends with ``close`` (or the process). Shared backends need do nothing."""
        return None

    @abstractmethod
    async def accept(self, items: Sequence[Acceptance], *, window: float, now: float
                     ) -> list[bool]:
        """Remember each event's ``(source, messageId)`` for ``window`` seconds and queue its
        jobs, atomically per event. Returns False for an event already seen within its window
        (nothing is queued for it). Raises ``StorageFull`` when the disk budget is spent."""

    async def prepare_intake(self) -> None:
        """Called once the storage is open by a router that will accept events (not by the
        delivery process or ``router dlq``): a backend whose ``accept`` needs state of the
        process's own builds it here, before intake starts, rather than in the first
        ``accept``, where every request behind that one would wait for it."""
        return None

    async def damage(self) -> str | None:
        """What is wrong with the stored data's structure, and what to do, or None: read
        only, for ``router check --storage`` beside a running router. A backend with no such
        check of its own (Redis keeps its own consistency) finds nothing."""
        return None

    @abstractmethod
    async def seen_before(self, source: str, message_ids: Sequence[str], *, now: float
                          ) -> set[str]:
        """Those of ``message_ids`` that ``accept`` took from ``source`` within their window,
        read without opening the storage or changing anything in it: a dry run's preview
        names the duplicates a real send would drop, yet leaves the storage as it was."""

    @abstractmethod
    async def lease(self, destination: str, limit: int, *, now: float, lease_for: float,
                    ordered: bool = False, hold_attempts: int | None = None) -> list[Job]:
        """Take up to ``limit`` due jobs of one destination, oldest first, hiding them from
        other workers for ``lease_for`` seconds.

        With ``ordered``, a job is taken only when no earlier job of the same user is left
        for this destination (queued, leased or waiting for a retry): a user's events go out
        one at a time, in order, while other users' events go on. With ``hold_attempts``, an
        earlier job that has failed that many attempts no longer counts: one event that
        always fails does not hold its user's later events for hours (RudderStack's
        ordering breaker, for that user only)."""

    @abstractmethod
    async def complete(self, jobs: Sequence[Job]) -> None:
        """Delivered: forget the jobs. Jobs, not ids: a backend whose ids can be handed out
        again (Redis, after it loses writes) forgets only the job that still carries the
        delivered event's ``message_id``."""

    @abstractmethod
    async def retry(self, jobs: Sequence[Job], *, not_before: Sequence[float], now: float,
                    failure: Failure) -> None:
        """Put leased jobs back, due at ``not_before``, with their attempt counts."""

    @abstractmethod
    async def dead_letter(self, jobs: Sequence[Job], *, now: float, failure: Failure) -> None:
        """Move leased jobs to the dead-letter store with why they failed."""

    @abstractmethod
    async def release(self, job_ids: Sequence[int | str]) -> None:
        """Give leased jobs back untouched (a shutdown, a slow round given back, outcomes
        that could not be recorded): due at once, attempts unchanged."""

    @abstractmethod
    async def renew(self, job_ids: Sequence[int | str], *, now: float, lease_for: float
                    ) -> None:
        """Extend to ``now + lease_for`` the leases of jobs this process still holds, so a
        worker whose destination keeps it waiting (a long ``Retry-After``, a rest after
        failures) never loses them to another process. A backend whose leases never lapse
        under a live process (SQLite) has nothing to do."""

    @abstractmethod
    async def dead_letters(self, where: DeadLetterFilter, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters ``where`` selects, oldest first: an operator
        looking at a failure wants the latest ones, read in the order they happened."""

    @abstractmethod
    async def replay(self, where: DeadLetterFilter, *, now: float) -> int:
        """Queue matching dead letters again, to their own destination only; returns how many.

        They are queued in the order their events were accepted (``accepted_id``), not the
        order they failed in: on an ``ordered`` destination a user's replayed events go out
        in the user's order. As new work, behind the jobs already queued, the user's events
        accepted since included: a letter that fails again must not hold up live events."""

    @abstractmethod
    async def purge(self, where: DeadLetterFilter) -> int:
        ...

    @abstractmethod
    async def stats(self, *, now: float) -> StorageStats: ...

    async def ping(self) -> bool:
        """True when the storage answers (readiness)."""
        await self.stats(now=0)
        return True


def amount_of_bytes(size: int) -> str:
    """``size`` bytes for a person: in MB from 1 MB, in KB from 1 KB, else in bytes."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return "1 byte" if size == 1 else f"{size} bytes"
