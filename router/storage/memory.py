"""``memory://``: the storage interface kept in dicts, for tests and one-off runs. Nothing
survives the process, so it promises no durability."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from router.storage.base import (Acceptance, DeadLetter, DeadLetterFilter, Failure, Job,
                                 QueueStats, Storage, StorageStats)


class MemoryStorage(Storage):
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.jobs: dict[int | str, Job] = {}
        self.due: dict[int | str, float] = {}
        self.leased_until: dict[int | str, float] = {}
        self.letters: dict[int | str, DeadLetter] = {}
        self.accepted_ids: dict[int | str, int | str] = {}
        """The id each replayed job's event was accepted as (any other job's is its own)."""
        self._ids = itertools.count(1)
        self._accept_calls = 0

    async def open(self, *, recover: bool = True) -> None:
        if recover:
            self.leased_until.clear()

    async def close(self) -> None:
        pass

    async def seen_before(self, source: str, message_ids: Sequence[str], *, now: float
                          ) -> set[str]:
        return {message_id for message_id in message_ids
                if self.seen.get((source, message_id), now) > now}

    async def accept(self, items: Sequence[Acceptance], *, window: float, now: float) -> list[bool]:
        accepted = []
        for item in items:
            key = (item.source, item.message_id)
            expires = self.seen.get(key)
            if expires is not None and expires > now:
                accepted.append(False)
                continue
            self.seen[key] = now + window
            for new in item.jobs:
                job_id = next(self._ids)
                self.jobs[job_id] = Job(job_id, new.destination, new.message_id, new.user_key,
                                        new.group, new.body, now)
                self.due[job_id] = now
            accepted.append(True)
        self._accept_calls += 1
        if self._accept_calls % 1000 == 0 and len(self.seen) > 10_000:
            self.seen = {k: v for k, v in self.seen.items() if v > now}  # stay bounded
        return accepted

    async def lease(self, destination: str, limit: int, *, now: float, lease_for: float,
                    ordered: bool = False, hold_attempts: int | None = None) -> list[Job]:
        taken: list[Job] = []
        blocked_users: set[str] = set()
        for job_id, job in self.jobs.items():  # dicts keep insertion order: oldest first
            if job.destination != destination:
                continue
            available = self.due[job_id] <= now and self.leased_until.get(job_id, 0) <= now
            if ordered:
                if job.user_key in blocked_users:
                    continue
                if hold_attempts is None or job.attempts < hold_attempts:
                    blocked_users.add(job.user_key)
            if available:
                self.leased_until[job_id] = now + lease_for
                taken.append(job)
                if len(taken) >= limit:
                    break
        return taken

    async def complete(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._forget(job.id)

    async def retry(self, jobs: Sequence[Job], *, not_before: Sequence[float], now: float,
                    failure: Failure) -> None:
        for job, due in zip(jobs, not_before):
            if job.id in self.jobs:
                stored = self.jobs[job.id]
                stored.attempts = job.attempts
                stored.first_attempt_at = job.first_attempt_at
                self.due[job.id] = due
                self.leased_until.pop(job.id, None)

    async def dead_letter(self, jobs: Sequence[Job], *, now: float, failure: Failure) -> None:
        for job in jobs:
            accepted_id = self.accepted_ids.get(job.id, job.id)
            if self._forget(job.id):
                letter_id = next(self._ids)
                self.letters[letter_id] = DeadLetter(
                    letter_id, job.destination, job.message_id, job.user_key, job.group, job.body,
                    job.attempts, job.created_at, now, failure.reason, failure.status,
                    failure.request, failure.response, job.first_attempt_at, accepted_id)

    async def release(self, job_ids: Sequence[int | str]) -> None:
        for job_id in job_ids:
            self.leased_until.pop(job_id, None)

    async def renew(self, job_ids: Sequence[int | str], *, now: float, lease_for: float
                    ) -> None:
        for job_id in job_ids:
            if job_id in self.leased_until:
                self.leased_until[job_id] = now + lease_for

    async def dead_letters(self, where: DeadLetterFilter, *, limit: int = 100) -> list[DeadLetter]:
        matching = [letter for letter in self.letters.values() if _matches(letter, where)]
        return matching[-limit:] if limit > 0 else []

    async def replay(self, where: DeadLetterFilter, *, now: float) -> int:
        chosen = sorted((letter for letter in self.letters.values() if _matches(letter, where)),
                        key=_place)
        for letter in chosen:
            del self.letters[letter.id]
            job_id = next(self._ids)
            self.jobs[job_id] = Job(job_id, letter.destination, letter.message_id,
                                    letter.user_key, letter.group, letter.body, now)
            self.due[job_id] = now
            self.accepted_ids[job_id] = _place(letter)[0]
        return len(chosen)

    async def purge(self, where: DeadLetterFilter) -> int:
        chosen = [letter.id for letter in self.letters.values() if _matches(letter, where)]
        for letter_id in chosen:
            del self.letters[letter_id]
        return len(chosen)

    async def stats(self, *, now: float) -> StorageStats:
        stats = StorageStats(dedup_entries=len(self.seen))
        for job in self.jobs.values():
            queue = stats.queues.setdefault(job.destination, QueueStats())
            queue.pending += 1
            if queue.oldest_created_at is None or job.created_at < queue.oldest_created_at:
                queue.oldest_created_at = job.created_at
        for letter in self.letters.values():
            stats.queues.setdefault(letter.destination, QueueStats()).dead_letters += 1
        return stats

    def _forget(self, job_id: int | str) -> bool:
        self.accepted_ids.pop(job_id, None)
        self.due.pop(job_id, None)
        self.leased_until.pop(job_id, None)
        return self.jobs.pop(job_id, None) is not None


def _matches(letter: DeadLetter, where: DeadLetterFilter) -> bool:
    return (where.selects(letter.destination)
            and (where.reason is None or where.reason.lower() in letter.reason.lower())
            and (where.since is None or letter.failed_at >= where.since)
            and (where.until is None or letter.failed_at <= where.until)
            and (where.ids is None or letter.id in where.ids))


def _place(letter: DeadLetter) -> tuple[int | str, int | str]:
    """Where a replay queues the letter: in the order its event was accepted, as the other
    backends do (without that id, its own, as Redis does, whose ids share one counter)."""
    return (letter.id if letter.accepted_id is None else letter.accepted_id), letter.id
