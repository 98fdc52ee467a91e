"""The byte format of a bundle: the jobs one accept queued for one destination, packed into
one blob of the SQLite spool's ``bundles`` table (see ``router.storage.sqlite``). Kept apart
from the spool's bookkeeping because ``router salvage`` reads it too, and because its
checksums are what finds a disk's damage that SQLite's own checks do not look at."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import orjson

from router.storage.base import NewJob

CHECKED_BUNDLE = b"\xff\xffB2"
"""How a bundle with CRCs begins (layout 2): a layout 1 bundle begins with its header's
length, which SQLite's limit on a blob keeps far below this."""
DAMAGED_BODY = ("damaged in the spool: its bytes on disk no longer match their checksum "
                "(disk or file corruption); not sent, the body kept as read")
UNREADABLE_HEADER = ("damaged in the spool: the list of events of its bundle is unreadable "
                     "(disk or file corruption); its messageId and body are lost")
BundleEntry = tuple[str, str, str, int, int]
"""A job's entry in its bundle's header: messageId, user key, group, body length, body CRC."""


def pack_bundle(jobs: Sequence[NewJob], crcs: Sequence[int] | None = None) -> bytes:
    """A bundle's jobs as one blob: ``CHECKED_BUNDLE``, the length and CRC-32 of a JSON
    header, the header (messageId, user key, group, body length and body CRC-32 of each job),
    then the bodies back to back, so that reading a bundle never parses a body. The CRCs
    find bytes that the disk or a copy changed, which SQLite's own checks do not look at:
    a damaged job is dead-lettered, not delivered with another messageId or value.
    ``crcs``, the bodies' CRC-32s in the jobs' order, when the caller has them already
    (``_lanes_of`` computes a body shared by several destinations' jobs once)."""
    if crcs is None:
        crcs = [zlib.crc32(job.body) for job in jobs]
    return pack_entries([(job.message_id, job.user_key, job.group, len(job.body), crc)
                         for job, crc in zip(jobs, crcs)], [job.body for job in jobs])


def pack_entries(entries: Sequence[BundleEntry], bodies: Sequence[bytes]) -> bytes:
    """``pack_bundle`` of jobs given as their header's entries (messageId, user key, group,
    body length, body CRC-32) and their bodies, as ``_lanes_of`` gathers them."""
    header = orjson.dumps(entries)
    return b"".join([CHECKED_BUNDLE, len(header).to_bytes(4, "big"),
                     zlib.crc32(header).to_bytes(4, "big"), header, *bodies])


@dataclass(slots=True)
class UnpackedBundle:
    """A bundle's jobs, in id order, field by field (the ``index``-th of each list is the
    ``index``-th job's), and why each damaged one cannot be sent, by its index. By field
    rather than a tuple a job: each list is made at once, in C, where a loop that sliced
    each body, checked its CRC and made its tuple was a fifth of the instructions of
    reading a bundle (this runs for every job a lease reads)."""

    message_ids: Sequence[str]
    user_keys: Sequence[str]
    groups: Sequence[str]
    bodies: Sequence[bytes]
    damaged: dict[int, str]


def unpack_bundle(packed: bytes, count: int) -> UnpackedBundle:
    """The ``count`` jobs of a bundle. A bundle written before the CRCs (layout 1, whose
    first four bytes are a header length under SQLite's 1 GB limit) is read unchecked."""
    checked = packed.startswith(CHECKED_BUNDLE)
    try:
        if checked:
            offset = 12 + int.from_bytes(packed[4:8], "big")
            header = packed[12:offset]
            if zlib.crc32(header) != int.from_bytes(packed[8:12], "big"):
                raise ValueError("the header's checksum does not match")
            message_ids, user_keys, groups, lengths, crcs = zip(*orjson.loads(header))
        else:  # a layout 1 entry has no CRC
            offset = 4 + int.from_bytes(packed[:4], "big")
            message_ids, user_keys, groups, lengths = zip(*orjson.loads(packed[4:offset]))
            crcs = None
        ends = list(accumulate(lengths, initial=offset))
    except (ValueError, TypeError):  # unreadable, or not a list of entries of the layout
        return UnpackedBundle([""] * count, [""] * count, [""] * count, [b""] * count,
                              dict.fromkeys(range(count), UNREADABLE_HEADER))
    bodies = list(map(packed.__getitem__, map(slice, ends, ends[1:])))
    damaged: dict[int, str] = {}
    if crcs is not None and tuple(map(zlib.crc32, bodies)) != crcs:
        damaged = {index: DAMAGED_BODY for index, (body, crc) in enumerate(zip(bodies, crcs))
                   if zlib.crc32(body) != crc}
    return UnpackedBundle(message_ids, user_keys, groups, bodies, damaged)
