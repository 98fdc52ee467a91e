"""Batching: up to the plugin's limits, prompt when quiet, and one bad event never costs its
neighbours (a refused batch is split until the event at fault is found)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from router.destination import DeliveryDefaults
from router.storage.base import DeadLetterFilter
from router.testing.fake_server import Answer, FakeDestinationServer
from tests.delivery_helpers import FAST_RETRIES, router_for, track


def acme(url: str, **delivery) -> dict:
    """The example plugin (examples/router-acme): batches of up to 100 events."""
    return {"name": "acme", "plugin": "acme", "settings": {"api_key": "k-123456", "base_url": url},
            "delivery": {**FAST_RETRIES, "batch_wait": "200ms", **delivery}}


def ids_in(request) -> list[str]:
    return [event["id"] for event in request.json["events"]]


async def test_events_are_sent_in_batches_up_to_the_plugin_limit(tmp_path):
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(250)])
            assert await router.drain(timeout=10)
        sizes = [len(ids_in(request)) for request in server.requests]
        assert sum(sizes) == 250 and max(sizes) == 100
        assert len(server.requests) <= 4


async def test_a_quiet_stream_is_sent_after_batch_wait_not_held_for_a_full_batch(tmp_path):
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [acme(server.url, batch_wait="300ms")])
        async with router:
            sent = time.time()
            await router.route(track(1))
            (request,) = await server.wait_for(1, timeout=5)
        assert ids_in(request) == ["m-1"]
        assert request.time - sent < 5  # sent alone, long before a batch of 100 could fill


async def test_a_413_splits_the_batch_instead_of_failing_it(tmp_path):
    def handler(request):
        return Answer(413) if len(request.json["events"]) > 20 else Answer(200)

    async with FakeDestinationServer(handler=handler) as server:
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(100)])
            assert await router.drain(timeout=10)
            assert await router.storage.dead_letters(DeadLetterFilter()) == []
            # Each event counted delivered once, though its batch was recorded in parts.
            assert router.delivery_metrics.delivered.get("acme") == 100
        delivered = [i for r in server.requests if r.status == 200 for i in ids_in(r)]
        assert sorted(delivered) == sorted(f"m-{n}" for n in range(100))


@pytest.mark.parametrize("status", [400, 422])  # docs/delivery.md: both refuse a batch whole
async def test_one_bad_event_in_a_refused_batch_costs_only_itself(tmp_path, status):
    def handler(request):
        bad = any(event["props"].get("n") == 37 for event in request.json["events"])
        return Answer(status, body={"error": "event 37 is malformed"}) if bad else Answer(200)

    async with FakeDestinationServer(handler=handler) as server:
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(64)])
            assert await router.drain(timeout=10)
            letters = await router.storage.dead_letters(DeadLetterFilter())
        assert [letter.message_id for letter in letters] == ["m-37"]
        delivered = {i for r in server.requests if r.status == 200 for i in ids_in(r)}
        assert delivered == {f"m-{n}" for n in range(64)} - {"m-37"}
        assert len(server.requests) < 20  # a binary search, not a request per event


async def test_a_batch_refused_for_a_reason_no_event_has_is_not_split_to_pieces(tmp_path):
    async with FakeDestinationServer() as server:
        server.default = Answer(400, body={"error": "invalid api key"})
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(64)])
            assert await router.drain(timeout=10)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=1000)
        assert len(letters) == 64
        assert len(server.requests) == 3  # the batch, then its two halves: then it stops


async def test_a_batch_never_mixes_the_groups_a_plugin_puts_its_payloads_in(tmp_path):
    # Mixpanel's events go to /import and its profile updates to /engage: each group of
    # payloads is a request of its own, however the events came in together.
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [{
            "name": "mix", "plugin": "mixpanel",
            "settings": {"project_token": "tok-0001", "api_secret": "secret-0001",
                         "base_url": server.url},
            "delivery": {"batch_wait": "300ms"}}])
        async with router:
            await router.route_many([
                track(0), {"type": "identify", "userId": "u1", "messageId": "m-identify",
                           "traits": {"plan": "pro"}}, track(1)])
            assert await router.drain(timeout=10)
    sent = sorted((request.path, len(request.json)) for request in server.requests)
    assert sent == [("/engage", 1), ("/import", 2)]


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_batch_refused_with_a_status_that_is_no_events_fault_is_not_split(tmp_path,
                                                                                  status):
    # docs/delivery.md: only 400, 422 and 413 split a batch; a bad key or a wrong URL would
    # only be refused again in every half.
    async with FakeDestinationServer() as server:
        server.default = Answer(status, body={"error": "nope"})
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(8)])
            assert await router.drain(timeout=10)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=100)
        assert len(letters) == 8
        assert len(server.requests) == 1


async def test_a_plugin_can_fail_single_events_of_a_batch(tmp_path):
    """Acme answers 207 naming the events it refused: only those are dead-lettered."""
    def handler(request):
        errors = [{"index": i, "error": "bad name"} for i, event in
                  enumerate(request.json["events"]) if event["props"]["n"] % 10 == 0]
        return Answer(207, body={"errors": errors})

    async with FakeDestinationServer(handler=handler) as server:
        router = router_for(tmp_path, [acme(server.url)])
        async with router:
            await router.route_many([track(n) for n in range(30)])
            assert await router.drain(timeout=10)
            letters = await router.storage.dead_letters(DeadLetterFilter())
        assert sorted(letter.message_id for letter in letters) == ["m-0", "m-10", "m-20"]
        assert all("Acme refused it: bad name" in letter.reason for letter in letters)
        assert len(server.requests) == 1


async def test_the_rate_limit_spaces_requests(tmp_path):
    from tests.delivery_helpers import webhook
    async with FakeDestinationServer() as server:
        router = router_for(tmp_path, [webhook("hook", server.url, rate_limit="10/s")])
        async with router:
            await router.route_many([track(n) for n in range(15)])
            assert await router.drain(timeout=10)
        times = sorted(request.time for request in server.requests)
        # a burst of up to 10, then no faster than 10 a second
        assert times[-1] - times[0] >= 0.4


async def test_an_opaque_destination_sends_the_spooled_bodies_as_they_were(tmp_path):
    """segment declares opaque_bodies: its batches splice the spooled JSON instead of
    parsing it back, and what arrives is the same events, byte for byte per event."""
    from plugins.segment.destination import Segment  # noqa: PLC0415 - the plugin under test
    assert Segment.opaque_bodies
    async with FakeDestinationServer() as server:
        destination = {"name": "seg", "plugin": "segment",
                       "settings": {"write_key": "wk", "base_url": server.url},
                       "delivery": {**FAST_RETRIES, "batch_wait": "100ms"}}
        router = router_for(tmp_path, [destination])
        events = [track(n, properties={"n": n, "price": 1.5, "tags": ["a", "é"]})
                  for n in range(30)]
        async with router:
            results = await router.route_many(events)
            assert await router.drain(timeout=10)
        received = [event for request in server.requests for event in request.json["batch"]]
        spooled = [result.status_of("seg").payloads[0].body for result in results]
        assert [event["messageId"] for event in received] == [f"m-{n}" for n in range(30)]
        assert received == [orjson.loads(orjson.dumps(body)) for body in spooled]


async def test_a_storage_error_recording_one_failure_still_completes_the_delivered(tmp_path):
    """The delivered events of a batch are recorded before its failures, so a storage call
    that raises for a failed one cannot leave them to be sent again once their lease ends."""
    from router.routing import Router
    from router.storage.sqlite import SqliteStorage

    class DeadLetterFailsOnce(SqliteStorage):
        failed = False

        async def dead_letter(self, jobs, *, now, failure):
            if not self.failed:
                self.failed = True
                raise OSError("disk hiccup")
            await super().dead_letter(jobs, now=now, failure=failure)

    def handler(request):
        return Answer(207, body={"errors": [{"index": 0, "error": "bad name"}]})

    async with FakeDestinationServer(handler=handler) as server:
        loaded = router_for(tmp_path, [acme(server.url)]).loaded
        router = Router(loaded, storage=DeadLetterFailsOnce(tmp_path / "spool.db"))
        async with router:
            await router.route_many([track(n) for n in range(5)])
            await server.wait_for(1)
            for _ in range(100):  # the worker completes what it delivered on its next round
                if router.delivery_metrics.delivered.get("acme") == 4:
                    break
                await asyncio.sleep(0.05)
            assert router.delivery_metrics.delivered.get("acme") == 4


def test_payload_overhead_must_leave_room_for_a_payload():
    with pytest.raises(ValueError, match="payload_overhead .2000. must be less than batch_bytes"):
        DeliveryDefaults(batch_bytes=1024, payload_overhead=2000)


def test_without_max_payload_bytes_a_payload_may_fill_a_request_less_the_overhead():
    # As DeliveryDefaults.max_payload_bytes and docs/plugins.md say: batch_bytes less
    # payload_overhead, the room a request has for one payload once build_request adds its part.
    from router.delivery.batching import payload_limit
    assert payload_limit(DeliveryDefaults(batch_bytes=2048)) == 2048
    assert payload_limit(DeliveryDefaults(batch_bytes=2048, payload_overhead=100)) == 1948
    assert payload_limit(DeliveryDefaults(batch_bytes=2048, payload_overhead=100,
                                          max_payload_bytes=500)) == 500
    described = DeliveryDefaults.model_fields["max_payload_bytes"].description or ""
    assert "batch_bytes less payload_overhead" in described


def _cut(bodies: list[bytes], **delivery) -> list[list[bytes]]:
    from router.delivery.batching import batches
    return batches(bodies, DeliveryDefaults(**delivery), group=lambda body: "", size=len)


def test_a_batch_filled_by_bytes_holds_bodies_and_separators_up_to_batch_bytes_exactly():
    # A plugin's batch_bytes is its API's request limit less the envelope (Segment's 500 KB
    # less '{"batch":[]}'): the bodies and the commas between them may fill it to the byte,
    # and one byte more must go in the next request, or the API refuses the whole batch.
    a, b, c = b"a" * 340, b"b" * 340, b"c" * 342
    assert len(b",".join([a, b, c])) == 1024
    assert _cut([a, b, c], batch_size=100, batch_bytes=1024) == [[a, b, c]]
    assert _cut([a, b, c + b"!"], batch_size=100, batch_bytes=1024) == [[a, b], [c + b"!"]]
    # Every batch counts from nothing, not only the first.
    assert _cut([a, b, c] * 2, batch_size=100, batch_bytes=1024) == [[a, b, c]] * 2
    # What build_request adds around each body counts too: (505 + 6) + 1 + (506 + 6) fits.
    d, e = b"d" * 505, b"e" * 506
    assert _cut([d, e], batch_size=100, batch_bytes=1024, payload_overhead=6) == [[d, e]]
    assert _cut([e, e], batch_size=100, batch_bytes=1024, payload_overhead=6) == [[e], [e]]


def test_a_body_larger_than_batch_bytes_goes_alone_and_no_empty_request_is_made():
    # Queued before batch_bytes was lowered, a body may no longer fit any request: it is
    # sent alone (the API judges it), never preceded by a request with no events.
    big, small = b"x" * 2000, b"y" * 5
    assert _cut([big, small], batch_size=100, batch_bytes=1024) == [[big], [small]]
    assert _cut([small, big], batch_size=100, batch_bytes=1024) == [[small], [big]]


def _cut_one_by_one(items, delivery, group, size):
    """``batches`` as it was written before it asked whole batches first: item by item."""
    by_group: dict[str, list] = {}
    for item in items:
        by_group.setdefault(group(item), []).append(item)
    result = []
    for group_items in by_group.values():
        batch, total = [], 0
        for item in group_items:
            item_size = size(item) + delivery.payload_overhead
            if batch and (len(batch) >= delivery.batch_size
                          or total + item_size > delivery.batch_bytes):
                result.append(batch)
                batch, total = [], 0
            batch.append(item)
            total += item_size + 1
        if batch:
            result.append(batch)
    return result


@settings(max_examples=300, deadline=None)  # no wall-clock limit on a loaded machine
@given(items=st.lists(st.tuples(st.sampled_from("aab"), st.integers(0, 600)), max_size=60),
       batch_size=st.integers(1, 12), batch_bytes=st.integers(1024, 3000),
       overhead=st.integers(0, 80))
def test_batches_are_cut_as_item_by_item_whatever_the_groups_sizes_and_limits(
        items, batch_size, batch_bytes, overhead):
    # Whole batches are asked first, over map (the usual lease: one group, well under
    # batch_bytes); the batches must be exactly those of the item-by-item cut, to the byte.
    from router.delivery.batching import batches
    delivery = DeliveryDefaults(batch_size=batch_size, batch_bytes=batch_bytes,
                                payload_overhead=overhead)
    # Each item its own object (a tuple), so that the batches hold the very items given.
    numbered = [(group, size, n) for n, (group, size) in enumerate(items)]
    group, size = (lambda item: item[0]), (lambda item: item[1])
    assert batches(iter(numbered), delivery, group=group, size=size) == \
        _cut_one_by_one(numbered, delivery, group, size)
    # The same given every size of a run at once (``sizes``, as the worker reads them).
    assert batches(iter(numbered), delivery, group=group, size=size,
                   sizes=lambda chunk: [item[1] for item in chunk]) == \
        _cut_one_by_one(numbered, delivery, group, size)


def test_the_workers_sizes_of_a_run_of_jobs_are_its_size_of_each():
    from router.delivery.worker import _size_of, _sizes_of
    from router.storage.base import Job
    jobs = [Job(n, "d", f"m{n}", "u", "g", b"x" * n, 1.0) for n in (0, 1, 5, 700)]
    assert list(_sizes_of(jobs)) == [_size_of(job) for job in jobs] == [0, 1, 5, 700]


@pytest.mark.parametrize("opaque", [False, True])
def test_a_batchs_payloads_come_from_the_spool_as_each_alone_would(opaque):
    # The sender reads a batch's bodies in one call (all_from_spool); build_request must get
    # what from_spool gives for each body: parsed, or for opaque_bodies the JSON as it is.
    from router.delivery.batching import all_from_spool, from_spool
    bodies = [b'{"a":1,"t":"2024-03-01T12:00:00Z"}', b'[1,2]', b'"x"']
    together = all_from_spool(bodies, "g", opaque=opaque)
    alone = [from_spool(body, "g", opaque=opaque) for body in bodies]
    assert [payload.group for payload in together] == ["g"] * 3
    assert orjson.dumps([payload.body for payload in together]) == \
        orjson.dumps([payload.body for payload in alone])
    assert all(isinstance(payload.body, orjson.Fragment) == opaque for payload in together)
