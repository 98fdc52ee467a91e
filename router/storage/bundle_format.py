"""The byte format of a bundle: the jobs one accept queued for one destination, packed into
one blob of the SQLite spool's ``bundles`` table (see ``router.storage.sqlite``). Kept apart
from the spool's bookkeeping because ``router salvage`` reads it too, and because its
checksums are what finds a disk's damage that SQLite's own checks do not look at."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol

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


def pack_bundle(jobs: Sequence[NewJob]) -> bytes:
    """A bundle's jobs as one blob: ``CHECKED_BUNDLE``, the length and CRC-32 of a JSON
    header, the header (messageId, user key, group, body length and body CRC-32 of each job),
    then the bodies back to back, so that reading a bundle never parses a body. The CRCs
    find bytes that the disk or a copy changed, which SQLite's own checks do not look at:
    a damaged job is dead-lettered, not delivered with another messageId or value. The
    spool packs its bundles with ``pack_entries``, from what ``_lanes_of`` gathers."""
    return pack_entries([(job.message_id, job.user_key, job.group, len(job.body),
                          zlib.crc32(job.body)) for job in jobs], [job.body for job in jobs])


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
            message_ids, user_keys, groups, lengths, crcs = _header_fields(packed[:12],
                                                                           packed[12:offset])
        else:  # a layout 1 entry has no CRC
            offset = 4 + int.from_bytes(packed[:4], "big")
            message_ids, user_keys, groups, lengths = zip(*orjson.loads(packed[4:offset]))
            crcs = None
        ends = list(accumulate(lengths, initial=offset))
    except (ValueError, TypeError):  # unreadable, or not a list of entries of the layout
        return UnpackedBundle([""] * count, [""] * count, [""] * count, [b""] * count,
                              dict.fromkeys(range(count), UNREADABLE_HEADER))
    bodies = list(map(packed.__getitem__, map(slice, ends, ends[1:])))
    return UnpackedBundle(message_ids, user_keys, _one_string_a_group(groups), bodies,
                          _damaged(bodies, crcs) if crcs is not None else {})


def _header_fields(start: bytes, header: bytes) -> Iterator[tuple[Any, ...]]:
    """The fields of a checked bundle's header (``start``, its first 12 bytes, holds the
    header's CRC-32), each a tuple in the jobs' order: message ids, user keys, groups, body
    lengths and body CRC-32s. ``ValueError`` or ``TypeError`` when it is damaged."""
    if zlib.crc32(header) != int.from_bytes(start[8:12], "big"):
        raise ValueError("the header's checksum does not match")
    return zip(*orjson.loads(header))


class _Blob(Protocol):
    """What ``read_bundle`` needs of a ``sqlite3.Blob``."""

    def read(self, length: int = -1, /) -> bytes: ...
    def seek(self, offset: int, origin: int = 0, /) -> None: ...
    def __len__(self) -> int: ...


def read_bundle(blob: _Blob, count: int) -> UnpackedBundle:
    """``unpack_bundle`` of the bundle that ``blob`` (positioned at its start) holds, each
    body read from it on its own rather than the bundle whole.

    Why: a bundle is hundreds of KB. Read whole (a ``SELECT``), SQLite copied it into a buffer
    of its own and Python into a ``bytes`` of the same size, both freed once its bodies
    were sliced out; the writer thread's malloc arena gave the freed top of its heap back
    to the kernel (``madvise``) after nearly every bundle, and the next bundle's copies
    faulted the pages in again, zeroed: about 15,000 page faults each 60,000 jobs leased.
    Read in pieces of 64 KB, and each body then sliced out of its piece, every byte was
    still copied twice; read body by body (``map`` of the handle's ``read``, in C), once:
    callgrind's lease and complete, 42.4k -> 39.3k instructions an event, and 148 -> 129
    misses an event of a 1.25 MB L2 (its cache simulation; docs/performance.md, session 30).

    A bundle that is not of the checked layout, or whose header does not describe bodies
    that lie within the blob, is read whole and given to ``unpack_bundle``, so that every
    damaged bundle is judged exactly as before."""
    size = len(blob)
    start = blob.read(12)
    if not start.startswith(CHECKED_BUNDLE):
        return _read_whole(blob, count)
    offset = 12 + int.from_bytes(start[4:8], "big")
    header = blob.read(offset - 12) if offset <= size else b""
    try:
        message_ids, user_keys, groups, lengths, crcs = _header_fields(start, header)
        if min(lengths) < 0 or offset + sum(lengths) > size:
            raise ValueError("a body that is not in the blob")
    except (ValueError, TypeError):
        return _read_whole(blob, count)
    bodies = list(map(blob.read, lengths))  # the handle is at the first body
    return UnpackedBundle(message_ids, user_keys, _one_string_a_group(groups), bodies,
                          _damaged(bodies, crcs))


def _one_string_a_group(groups: tuple[str, ...]) -> tuple[str, ...]:
    """A bundle's jobs are nearly always of one group: then one string for all, not one
    each as orjson makes them. The worker judges a lease's groups in a set and batches by
    them, and each string of its own was hashed there, and compared in full: about 350
    instructions a job on the batching path."""
    if groups and groups.count(groups[0]) == len(groups):
        return (groups[0],) * len(groups)
    return groups


def _damaged(bodies: Sequence[bytes], crcs: tuple[int, ...]) -> dict[int, str]:
    """Why each body whose CRC-32 is not its header's cannot be sent, by its index: all
    checked at once, in C, and one by one only when one differs."""
    if tuple(map(zlib.crc32, bodies)) == crcs:
        return {}
    return {index: DAMAGED_BODY for index, (body, crc) in enumerate(zip(bodies, crcs))
            if zlib.crc32(body) != crc}


def _read_whole(blob: _Blob, count: int) -> UnpackedBundle:
    blob.seek(0)
    return unpack_bundle(blob.read(), count)
