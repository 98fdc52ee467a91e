"""The delivery service: one worker per destination, sharing one transport.

Each worker leases due jobs of its destination from the storage, groups them into batches
within the plugin's limits, sends them (bounded concurrency, rate limit, pause on throttling),
and records each job's fate: delivered, retried later, or dead-lettered. Destinations share
nothing but the storage and the connection pool, so one that hangs or fails cannot hold back
the others; its backlog waits on disk, and only a bounded number of its jobs are in memory.

The code, one concern a module of ``router.delivery``:

- ``service``: ``DeliveryService``, which starts a worker per destination, wakes them when
  work is queued, deletes dead letters past their retention, and stops them;
- ``worker``: ``DestinationWorker``, its state (all set in its ``__init__``) and its tasks:
  the lease loop (leasing, cutting batches, handing them to the senders), the senders, the
  upkeep beside them (completing deliveries, renewing leases, giving back a round held too
  long) and ``finish``; and ``ended``, which cancels tasks until they have ended. What a
  sender does with a batch is done by the worker's bases, one module each:
- ``sending``: ``Sending``, a batch's way out: its request built, the rate limiter waited
  for, its lease checked, the answer judged, and a batch refused whole split to find the
  events at fault;
- ``outcomes``: ``Outcomes``, what became of each job, told to the storage: the delivered
  completed a round at a time, retries and dead letters written, and the jobs whose fate
  the storage could not record given back to the queue or sent again;
- ``health``: ``Health``, when the whole destination rests (failures in a row, a 429 that
  states no wait) and which users' jobs wait unsent (those the API throttles one by one).

A constant is defined in the module that reads it. A test that changes one patches it there
(``UNRECORDED_PAUSE`` in ``outcomes``, ``RETENTION_INTERVAL`` here); this module imports only
``DestinationWorker`` and ``ended`` from the others, so patching a moved constant here fails
instead of changing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Sequence

from router.delivery.clock import DeliveryClock
from router.delivery.egress import EgressPolicy
from router.delivery.telemetry import DeliveryMetrics
from router.delivery.transport import Transport
from router.delivery.worker import DestinationWorker, ended
from router.destinations import ConfiguredDestination
from router.storage.base import DeadLetterFilter, Storage

log = logging.getLogger("router.delivery")
RETENTION_INTERVAL = 600.0
"""Seconds between two deletions of dead letters past their retention."""
CUT_SHORT_WAIT = 5.0
"""How long a stop that is cancelled still takes to give back what its workers hold."""


class DeliveryService:
    def __init__(self, destinations: Sequence[ConfiguredDestination], storage: Storage, *,
                 egress: EgressPolicy, metrics: DeliveryMetrics | None = None,
                 rng: random.Random | None = None, clock: DeliveryClock | None = None,
                 dead_letter_retention: float | None = None) -> None:
        self.storage = storage
        self.metrics = metrics or DeliveryMetrics(d.name for d in destinations)
        self.transport = Transport(egress, connections=sum(
            destination.delivery.concurrency for destination in destinations))
        rng = rng or random.Random()
        clock = clock or DeliveryClock()
        self.workers = {d.name: DestinationWorker(d, storage, self.transport, self.metrics, rng,
                                                  clock)
                        for d in destinations}
        self.dead_letter_retention = dead_letter_retention
        self._tasks: list[asyncio.Task[None]] = []
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.storage.claim_delivery()
        await self.transport.start()
        self._tasks = [asyncio.create_task(worker.run(), name=f"lease:{name}")
                       for name, worker in self.workers.items()]
        for worker in self.workers.values():
            worker.start_senders()
        if self.dead_letter_retention is not None:
            self._housekeeping = asyncio.create_task(
                self._forget_old_dead_letters(self.dead_letter_retention),
                name="dead-letter retention")

    async def _forget_old_dead_letters(self, retention: float) -> None:
        """Delete dead letters older than ``retention`` now and then: a destination that stays
        down dead-letters everything routed to it, and those rows count against the disk
        budget, which, once spent, makes intake refuse events for every destination."""
        while True:
            try:
                purged = await self.storage.purge(
                    DeadLetterFilter(until=time.time() - retention))
                if purged:
                    log.info("deleted %d dead letter(s) older than %g s "
                             "(delivery.dead_letter_retention)", purged, retention)
            except Exception:  # noqa: BLE001 - retried at the next round, never fatal
                log.warning("deleting old dead letters failed", exc_info=True)
            await asyncio.sleep(RETENTION_INTERVAL)

    @property
    def settled(self) -> bool:
        """The counters count every job the storage shows settled, for every destination
        (see ``DestinationWorker.settled``)."""
        return all(worker.settled for worker in self.workers.values())

    async def counts_settled(self, *, timeout: float) -> bool:
        """``settled``, as ``Router.drain`` asks it of either kind of delivery (a delivery
        process must be asked, and answers within ``timeout``); here it is known at once."""
        return self.settled

    def wake(self, destinations: Iterable[str]) -> None:
        """New work was queued for these destinations: look now rather than at the next poll."""
        for name in destinations:
            worker = self.workers.get(name)
            if worker is not None:
                worker.wakeup.set()

    async def _cut_short(self) -> None:
        """What a cancelled ``stop`` still does, in a few seconds at most: stop leasing and
        sending, record what was delivered, and give every job held back to the queue at
        once (on Redis they would otherwise wait out their leases, five minutes or more)."""
        self.cut_stop_short()
        try:
            async with asyncio.timeout(CUT_SHORT_WAIT):
                await ended(self._tasks)
                await asyncio.gather(*(worker.finish(0.0) for worker in self.workers.values()),
                                     return_exceptions=True)
        except TimeoutError:
            log.warning("delivery stopped at once; the jobs it held go back to the queue when "
                        "their leases end")

    async def stop(self, *, grace: float) -> None:
        """Stop leasing, let in-flight requests finish for up to ``grace`` seconds in all,
        then hand what is still unfinished back to the queue untouched.

        The senders take no new batch once it begins, and a worker still leasing after a
        second (its storage slow) is cancelled rather than waited for: the leased, unsent
        jobs go back to the queue."""
        deadline = time.monotonic() + grace
        try:
            if self._housekeeping is not None:
                await ended([self._housekeeping])
            for worker in self.workers.values():
                worker.stopping = True
                worker.wakeup.set()
            if self._tasks:
                _, waiting = await asyncio.wait(self._tasks, timeout=min(grace, 1.0))
                await ended(list(waiting))
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(worker.finish(remaining) for worker in self.workers.values()))
        except BaseException:
            # Cancelled (a second Ctrl-C, a timeout around close()): cut short, not left half
            # done, whatever cancels it next.
            await asyncio.shield(self._cut_short())
            raise
        finally:
            await self.transport.close()

    def cut_stop_short(self) -> None:
        """End the waits of a ``stop`` under way (for the workers still leasing, and for
        requests in flight): ``stop`` then puts every job they hold back in the queue and
        cancels the senders, whose requests are abandoned. For when waiting out the grace
        would do harm (the router this process delivers for is gone). Call it again until
        ``stop`` returns: a wait the stop had not begun yet when it was called (a worker
        still finishing its lease, say) is not cut by it."""
        for task in self._tasks:
            task.cancel()
        for worker in self.workers.values():
            worker.all_sent.set()
