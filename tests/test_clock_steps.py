"""The system clock stepped while the router delivers (NTP correcting a VM restored from a
snapshot, a host that ran without time sync): retries, batches and ages keep to real time.

The delivery service runs for real, against a fake destination on loopback; only the wall
clock it reads is shifted, as libfaketime would shift it for a whole process."""

from __future__ import annotations

import asyncio
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, UTC

from router.delivery import retry
from router.delivery.clock import DeliveryClock
from router.delivery.service import DeliveryService
from router.storage.base import DeadLetterFilter
from router.testing.fake_server import Answer, FakeDestinationServer
from tests.delivery_helpers import router_for, track, webhook

HOUR = 3600.0


class ShiftedClock:
    """The system's wall clock plus an offset the test changes: a step."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def wall(self) -> float:
        return time.time() + self.offset


# -- the clock itself ---------------------------------------------------------------------------

def test_the_clock_does_not_go_back_with_the_wall_clock_and_catches_up_with_it():
    wall, monotonic = [1000.0], [50.0]
    clock = DeliveryClock(lambda: wall[0], lambda: monotonic[0])
    wall[0], monotonic[0] = 1010.0, 60.0
    assert clock.now() == 1010.0
    wall[0], monotonic[0] = 1010.0 - HOUR, 70.0  # stepped back an hour
    assert clock.now() == 1020.0  # ten seconds on, by the monotonic clock
    wall[0], monotonic[0] = 1030.0, 80.0  # corrected again
    assert clock.now() == 1030.0


def test_steps_forward_do_not_age_events_accepted_before_them():
    wall, monotonic = [1000.0], [0.0]
    clock = DeliveryClock(lambda: wall[0], lambda: monotonic[0])
    wall[0], monotonic[0] = 1000.0 + 24 * HOUR + 5, 5.0  # a day forward, 5 s later
    now = clock.now()
    assert clock.age(990.0, now) == 15.0  # accepted before the step: its real age
    assert clock.age(now - 3, now) == 3.0  # accepted after it: as the wall clock says


def test_after_a_step_back_events_are_aged_by_the_wall_clock_for_good():
    # The clock stays ahead of the wall clock by the step (the wall clock runs at the same
    # rate and never catches up); an event the wall clock stamps after the step is as old
    # as the wall clock says, a minute or a month later.
    wall, monotonic = [1000.0 + 5 * HOUR], [0.0]
    clock = DeliveryClock(lambda: wall[0], lambda: monotonic[0])
    wall[0], monotonic[0] = 1001.0, 1.0  # stepped back five hours
    assert clock.now() == 1001.0 + 5 * HOUR
    for later in (10.0, 30 * 24 * HOUR):
        wall[0], monotonic[0] = 1001.0 + later, 1.0 + later
        assert clock.age(1001.0, clock.now()) == later


def test_a_step_forward_while_behind_does_not_age_events_either():
    wall, monotonic = [1000.0 + 5 * HOUR], [0.0]
    clock = DeliveryClock(lambda: wall[0], lambda: monotonic[0])
    wall[0], monotonic[0] = 1000.0, 0.0
    clock.now()  # five hours back
    wall[0], monotonic[0] = 1010.0 + HOUR, 10.0  # then one forward: still four behind
    assert clock.age(1005.0, clock.now()) == 5.0
    wall[0], monotonic[0] = 1020.0 + 10 * HOUR, 20.0  # and nine more: ahead of it again
    assert clock.age(1005.0, clock.now()) == 15.0


def test_an_http_date_retry_after_is_read_against_the_servers_date():
    server_now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    headers = {"Retry-After": format_datetime(server_now + timedelta(seconds=30), usegmt=True),
               "Date": format_datetime(server_now, usegmt=True)}
    our_clock_an_hour_slow = server_now.timestamp() - HOUR
    assert retry.retry_after(headers, now=our_clock_an_hour_slow) == 30.0
    del headers["Date"]  # without it, our clock is all there is
    assert retry.retry_after(headers, now=server_now.timestamp()) == 30.0


# -- delivery across a step -----------------------------------------------------------------------

async def deliver_across_a_step(tmp_path, server, step: float, **delivery) -> list:
    """One event answered as ``server`` is scripted (503 with Retry-After: 1 s, until 200),
    with the clock stepped by ``step`` seconds after the first answer; the dead letters when
    it is over."""
    router = router_for(tmp_path, [webhook("hook", server.url, **delivery)], deliver=False)
    clock = ShiftedClock()
    async with router:
        service = DeliveryService(router.destinations, router.storage, egress=router.egress,
                                  clock=DeliveryClock(clock.wall))
        await service.start()
        try:
            await router.route(track(1))
            await server.wait_for(1, timeout=5)
            await asyncio.sleep(0.2)  # the retry is recorded, due a second from now
            clock.offset = step
            assert await router.drain(timeout=10)
        finally:
            await service.stop(grace=1)
        return await router.storage.dead_letters(DeadLetterFilter())


async def test_a_retry_is_not_held_back_by_a_clock_stepped_back(tmp_path):
    # It was due at a wall time an hour away once the clock went back: held for an hour.
    async with FakeDestinationServer() as server:
        server.script([Answer(503, headers={"Retry-After": "1"}), Answer(200)])
        letters = await deliver_across_a_step(tmp_path, server, -HOUR)
        assert letters == [] and len(server.requests) == 2


async def test_a_clock_stepped_forward_does_not_make_a_retry_too_old(tmp_path):
    # Its age was the step: "older than the maximum age (4 h)" seconds after it was accepted.
    async with FakeDestinationServer() as server:
        server.script([Answer(503, headers={"Retry-After": "1"})] * 2 + [Answer(200)])
        letters = await deliver_across_a_step(tmp_path, server, 24 * HOUR, max_age="4h")
        assert letters == [] and len(server.requests) == 3


async def test_an_event_accepted_after_a_step_back_keeps_its_whole_max_age(tmp_path):
    # The clock ran five hours fast, then NTP put it right: delivery's clock stayed five
    # hours ahead, and a new event's first retry made it "older than the maximum age (4 h)".
    async with FakeDestinationServer() as server:
        server.script([Answer(503, headers={"Retry-After": "1"}), Answer(200)])
        router = router_for(tmp_path, [webhook("hook", server.url, max_age="4h")],
                            deliver=False)
        clock = ShiftedClock(5 * HOUR)
        async with router:
            service = DeliveryService(router.destinations, router.storage,
                                      egress=router.egress, clock=DeliveryClock(clock.wall))
            clock.offset = 0.0
            await service.start()
            try:
                await router.route(track(1))
                assert await router.drain(timeout=10)
            finally:
                await service.stop(grace=1)
            assert await router.storage.dead_letters(DeadLetterFilter()) == []
        assert len(server.requests) == 2


async def test_a_partial_batch_waits_batch_wait_at_most_when_this_clock_is_behind(tmp_path):
    # Jobs accepted an hour "later" than the delivering clock (the clock stepped back between
    # accept and lease, or another host accepted them): the batch once waited that hour.
    async with FakeDestinationServer() as server:
        segment = {"name": "seg", "plugin": "segment",
                   "settings": {"write_key": "k-1", "base_url": server.url},
                   "delivery": {"batch_wait": "200ms"}}
        router = router_for(tmp_path, [segment], deliver=False)
        async with router:
            service = DeliveryService(router.destinations, router.storage,
                                      egress=router.egress,
                                      clock=DeliveryClock(ShiftedClock(-HOUR).wall))
            await service.start()
            try:
                await router.route_many([track(n) for n in range(3)])
                assert await router.drain(timeout=10)
            finally:
                await service.stop(grace=1)
        assert len(server.requests) == 1


def test_a_retry_after_that_is_not_a_finite_number_is_ignored():
    # "nan" slipped past every comparison, so the server's wait was silently dropped.
    for value in ("nan", "inf", "-inf"):
        assert retry.retry_after({"Retry-After": value}, now=0.0) is None
    assert retry.retry_after({"X-RateLimit-Retry-After": "nan", "Retry-After": "7"},
                             now=0.0) == 7.0


def test_a_vendors_retry_after_header_is_read_when_retry_after_is_missing_or_unreadable():
    # docs/delivery.md: "or a vendor's equivalent (X-Ratelimit-Retry-After)"
    assert retry.retry_after({"X-Ratelimit-Retry-After": "12"}, now=0.0) == 12.0  # Braze
    assert retry.retry_after({"X-Rate-Limit-Retry-After": "3"}, now=0.0) == 3.0
    for unreadable in ("soon", "nan"):
        assert retry.retry_after({"Retry-After": unreadable, "X-RateLimit-Retry-After": "5"},
                                 now=0.0) == 5.0


def test_a_retry_after_is_capped_at_15_minutes_and_one_already_past_means_now():
    assert retry.retry_after({"Retry-After": "86400"}, now=0.0) == 15 * 60
    assert retry.retry_after({"Retry-After": "0"}, now=0.0) == 0.0
    assert retry.retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
                             now=1445412480.0 + 60) == 0.0


def test_a_retry_after_date_is_read_in_its_own_zone_whatever_this_hosts_zone(monkeypatch):
    at = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry.retry_after({"Retry-After": "Wed, 21 Oct 2015 09:28:30 +0200"}, now=at) == 30.0
    # "-0000" is UTC with its source's zone unknown (RFC 5322), not this host's local time
    monkeypatch.setenv("TZ", "XYZ-3")
    time.tzset()
    try:
        assert retry.retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:30 -0000"},
                                 now=at) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_date_or_retry_after_with_an_absurd_zone_is_ignored_not_raised():
    # Found by review: OverflowError from the date's zone, inside the delivery of a batch.
    absurd = "Wed, 21 Oct 2015 07:28:00 +99999999999999999999"
    assert retry.retry_after({"Retry-After": absurd}, now=0.0) is None
    assert retry.retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT", "Date": absurd},
                             now=1445412480.0) == 30.0
