"""How queued payloads are cut into requests: pure, shared by the delivery workers and the
test kit, so a plugin's tests batch exactly as production does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import repeat
from typing import TypeVar

import orjson

from router.destination import DeliveryDefaults, Payload

Item = TypeVar("Item")


def batches(items: Iterable[Item], delivery: DeliveryDefaults, *,
            group: Callable[[Item], str], size: Callable[[Item], int],
            sizes: Callable[[Sequence[Item]], Iterable[int]] | None = None
            ) -> list[list[Item]]:
    """``items`` split into batches: one group per batch (in order of first appearance), at
    most ``delivery.batch_size`` items and about ``delivery.batch_bytes`` of bodies each,
    with what ``build_request`` adds for each (``delivery.payload_overhead``).

    Each batch takes items in order while the next one fits. A worker's lease is nearly
    always of one group, in runs of ``batch_size`` items well under ``batch_bytes``, so both
    are first asked of the whole (in C, over ``map``), not item by item: the same batches
    come out, a worker's lease of 2,000 jobs cut for about a fifth of the work.

    ``sizes``, when given, is ``size`` of each of a run of items at once (the same numbers):
    the worker's reads them all in C, where a call of ``size``, a Python function, for each
    job cost the batching path about 300 instructions a job."""
    items = list(items)
    groups = list(map(group, items))
    by_group: dict[str, list[Item]]
    if not groups or groups.count(groups[0]) == len(groups):
        by_group = {groups[0]: items} if groups else {}
    else:
        by_group = defaultdict(list)
        for item, item_group in zip(items, groups):
            by_group[item_group].append(item)
    result: list[list[Item]] = []
    for group_items in by_group.values():
        result += _cut(group_items, delivery, size, sizes)
    return result


def _cut(items: list[Item], delivery: DeliveryDefaults, size: Callable[[Item], int],
         sizes: Callable[[Sequence[Item]], Iterable[int]] | None = None) -> list[list[Item]]:
    """One group's ``items`` cut into batches, in order (see ``batches``)."""
    overhead = delivery.payload_overhead
    most, most_bytes = delivery.batch_size, delivery.batch_bytes
    if most == 1:  # one event a request: each item its own batch, whatever its size
        return [[item] for item in items]
    result: list[list[Item]] = []
    start = 0
    if sizes is None:
        sizes = partial(map, size)
    # Whole batches of ``most`` items while they fit: item by item, the last one's check,
    # the largest, is ``total + size + overhead <= most_bytes``, where ``total`` counts each
    # item before it with its overhead and a separator: the sum below, less one separator.
    while start < len(items):
        chunk = items[start:start + most]
        if len(chunk) > 1 and \
                sum(sizes(chunk)) + len(chunk) * (overhead + 1) - 1 > most_bytes:
            break  # the bytes cut this one short: item by item from here
        result.append(chunk)
        start += len(chunk)
    batch: list[Item] = []
    total = 0
    for item in items[start:]:
        item_size = size(item) + overhead
        if batch and (len(batch) >= most or total + item_size > most_bytes):
            result.append(batch)
            batch, total = [], 0
        batch.append(item)
        total += item_size + 1  # the separator between bodies
    if batch:
        result.append(batch)
    return result


def payload_limit(delivery: DeliveryDefaults) -> int:
    """The most bytes one payload's body may have: a larger one could never be sent."""
    return delivery.max_payload_bytes or delivery.batch_bytes - delivery.payload_overhead


def oversized(size: int, limit: int, plugin: str) -> str:
    """Why a payload of ``size`` bytes, over ``limit`` (from ``payload_limit``), is refused.
    The core measures each body as it serializes it for the spool, so plugins need not
    serialize it again to check."""
    return f"the {plugin} payload is {size} bytes, over its limit of {limit}"


BUILT_BY_END = "\x1f"
"""Ends the name of the plugin that built a queued job's payload, at the start of its group."""


def queued_group(plugin: str, group: str) -> str:
    """A job's ``group`` as it is queued: the name of the plugin that built its payload, then
    the plugin's own group. A destination's plugin may change while its jobs are queued
    (the config edited, or two destinations' names swapped, between two runs), and another
    plugin would put a payload it did not build in a request its API does not take."""
    return f"{plugin}{BUILT_BY_END}{group}"


def built_by(group: str) -> tuple[str | None, str]:
    """The plugin that built a queued job's payload, and the plugin's own group. None for a
    job queued before the plugin was noted, or replayed from the dead letters as it is."""
    plugin, end, own = group.partition(BUILT_BY_END)
    return (plugin, own) if end else (None, group)


def from_spool(body: bytes, group: str, *, opaque: bool = False) -> Payload:
    """A payload as ``build_request`` receives it: its body went to the spool as JSON and came
    back (tuples are lists, datetimes strings). For a destination with ``opaque_bodies`` the
    body stays that JSON, as an ``orjson.Fragment`` that orjson writes out as it is."""
    return Payload(orjson.Fragment(body) if opaque else orjson.loads(body), group)


def all_from_spool(bodies: Iterable[bytes], group: str, *, opaque: bool = False
                   ) -> list[Payload]:
    """``from_spool`` for each of a batch's bodies, in one call: a call of its own for each
    body cost the batching path about 3 % of its instructions. Each ``Payload`` is made by
    ``tuple.__new__``, all in C: the ``__new__`` that ``NamedTuple`` writes is a Python
    function, and with the loop here it was 21 bytecodes a job, an eighth of what the event
    loop's thread ran a job on the batching path."""
    read = orjson.Fragment if opaque else orjson.loads
    return list(map(tuple.__new__, repeat(Payload), zip(map(read, bodies), repeat(group))))


# all_from_spool builds each Payload from (body, group) alone: a field added to Payload must
# be added there too, or its Payloads would lack it.
assert Payload._fields == ("body", "group"), "see all_from_spool"
