"""The byte format of a bundle: the jobs one accept queued for one destination, packed into
one blob of the SQLite spool's ``bundles`` table (see ``router.storage.sqlite``). Kept apart
from the spool's bookkeeping because ``router salvage`` reads it too, and because its
checksums are what finds a disk's damage that SQLite's own checks do not look at."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import orjson

from router.storage.base import NewJob

CHECKED_BUNDLE = b"\xff\xffB2"
"""How a bundle with CRCs begins (layout 2): a layout 1 bundle begins with its header's
length, which SQLite's limit on a blob keeps far below this."""
DAMAGED_BODY = ("damaged in the spool: its bytes on disk no longer match their checksum "
                "(disk or file corruption); not sent, the body kept as read")
UNREADABLE_HEADER = ("damaged in the spool: the list of events of its bundle is unreadable "
                     "(disk or file corruption); its messageId and body are lost")


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
    header = orjson.dumps([(job.message_id, job.user_key, job.group, len(job.body), crc)
                           for job, crc in zip(jobs, crcs)])
    return b"".join([CHECKED_BUNDLE, len(header).to_bytes(4, "big"),
                     zlib.crc32(header).to_bytes(4, "big"), header, *[job.body for job in jobs]])


PackedJob = tuple[str, str, str, bytes]
"""A job as a bundle holds it: messageId, user key, group and body."""


def unpack_bundle(packed: bytes, count: int) -> tuple[list[PackedJob], dict[int, str]]:
    """The ``count`` jobs of a bundle, in id order, and why each damaged one cannot be sent,
    by its index. A bundle written before the CRCs (layout 1, whose first four bytes are a
    header length under SQLite's 1 GB limit) is read unchecked."""
    checked = packed.startswith(CHECKED_BUNDLE)
    try:
        if checked:
            offset = 12 + int.from_bytes(packed[4:8], "big")
            header = packed[12:offset]
            if zlib.crc32(header) != int.from_bytes(packed[8:12], "big"):
                raise ValueError("the header's checksum does not match")
        else:
            offset = 4 + int.from_bytes(packed[:4], "big")
            header = packed[4:offset]
        entries = orjson.loads(header)
    except ValueError:
        return [("", "", "", b"")] * count, dict.fromkeys(range(count), UNREADABLE_HEADER)
    if not checked:  # a layout 1 entry has no CRC: None, for one loop below
        entries = [[*entry, None] for entry in entries]
    jobs: list[PackedJob] = []
    damaged: dict[int, str] = {}
    # Each entry unpacked in one step (read by index, 47 bytecodes a job rather than 40):
    # this loop runs for every job a lease reads.
    for message_id, user_key, group, length, crc in entries:
        body = packed[offset:offset + length]
        offset += length
        if crc is not None and zlib.crc32(body) != crc:
            damaged[len(jobs)] = DAMAGED_BODY
        jobs.append((message_id, user_key, group, body))
    return jobs, damaged
