"""Reading a request body: encoding, size limit and decompression, before any parsing.

Everything here works on bytes as they arrive, so a hostile request costs at most the limit in
memory: a ``Content-Length`` over the limit is refused before a byte is read, a chunked body
is counted while it is read and refused the moment it passes the limit, and a gzip body is
inflated in steps that never produce more than the limit (a 10 MB gzip bomb that would expand
to 10 GB stops after ``limit + 1`` bytes of output).

aiohttp would decompress request bodies itself (bounded since 3.13.3, CVE-2025-69223); the
app runs with ``auto_decompress=False`` (see ``app.create_runner``) so that the raw bytes, not
the inflated ones, are what the size limit counts, and so that the cap on the inflated size
is ours and the same as the request limit.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from router.server.problems import Problem

BODY_TIMEOUT = 30.0
"""Seconds a client may take to send its body; a slow-loris sender is cut off with 408."""

_IDENTITY = frozenset({"", "identity"})
_GZIP = frozenset({"gzip", "x-gzip"})


def empty_body() -> Problem:
    return Problem(400, "empty_body", "the request body is empty; expected a JSON object")


def too_large(limit: int) -> Problem:
    return Problem(413, "request_too_large",
                   f"the request body is over the {_kilobytes(limit)} limit")


def check_headers(request: web.BaseRequest, limit: int) -> None:
    """What the headers alone can refuse: a transfer coding other than chunked (501), an
    encoding other than gzip (415) and a declared ``Content-Length`` over the limit (413).
    Also used to answer ``Expect: 100-continue`` without inviting a body that would be
    refused."""
    codings = ",".join(request.headers.getall("Transfer-Encoding", [])).lower().split(",")
    if any(coding.strip() not in ("", "chunked") for coding in codings):
        # aiohttp reads the chunks and ignores the rest (`gzip, chunked` came in as if
        # plain): RFC 9112 answers a transfer coding the server does not know with 501.
        raise Problem(501, "unsupported_transfer_encoding",
                      "unsupported Transfer-Encoding: send chunked or a Content-Length "
                      "(compress with Content-Encoding: gzip)")
    encoding = _encoding(request)
    if encoding not in _IDENTITY and encoding not in _GZIP:
        raise Problem(415, "unsupported_encoding",
                      "unsupported Content-Encoding: send gzip or no encoding")
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)


async def read_body(request: web.BaseRequest, *, limit: int,
                    timeout: float | None = None) -> bytes:
    """The body as sent, at most ``limit`` bytes (``inflate`` it next).

    Raises ``Problem``: 415 for an encoding other than gzip, 413 past the limit, 400 for a
    broken chunked encoding or an empty body, 408 when the body takes over ``timeout``
    seconds (default ``BODY_TIMEOUT``) to arrive. Not inflated here: a body is read before
    its request has a turn (its write key may be inside), and a 7 KB gzip body that
    inflates to 480 KB would let clients without a key make the router hold 60 times what
    they send.
    """
    check_headers(request, limit)
    timeout = BODY_TIMEOUT if timeout is None else timeout
    parts: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise Problem(408, "body_timeout",
                      f"the request body did not arrive within {timeout:g} s") from None
    except RequestPayloadError:
        raise Problem(400, "unreadable_body", "the request body could not be read "
                      "(broken chunked encoding or a length that does not match)") from None
    except ConnectionResetError:
        # Nobody is left to read the answer; the code makes the access log and metrics
        # say what happened instead of logging a traceback.
        raise Problem(400, "client_disconnected",
                      "the client closed the connection before the body ended") from None
    if not parts:
        raise empty_body()
    return b"".join(parts)


def inflate(request: web.BaseRequest, body: bytes, *, limit: int) -> bytes:
    """``body`` decompressed as its ``Content-Encoding`` says, at most ``limit`` bytes once
    inflated (413 past it, 400 for a broken gzip stream or one that inflates to nothing)."""
    if _encoding(request) not in _GZIP:
        return body
    decoder = GzipDecoder(limit)
    inflated = decoder.feed(body)
    decoder.finish()
    if not inflated:
        raise empty_body()
    return inflated


MAX_GZIP_MEMBERS = 1024
"""Most gzip members a body may hold, as aiohttp allows since 3.14.5. Each member starts a
new inflater over the rest of the body, which is copied each time: thousands of empty
members (about 20 bytes each) held the event loop for seconds, quadratic in the body's size
(CVE-2026-128131 is aiohttp's own case of it). A writer makes one, or a few."""


class GzipDecoder:
    """Inflates a gzip stream fed in pieces, never holding more than ``limit`` bytes of
    output. Concatenated gzip members (valid gzip, and what some writers produce) are
    inflated one after the other, up to ``MAX_GZIP_MEMBERS``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._members = 1

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            if self._inflater.eof:  # the previous member ended: another one follows
                self._members += 1
                if self._members > MAX_GZIP_MEMBERS:
                    raise Problem(400, "invalid_gzip", "the gzip body has more than "
                                  f"{MAX_GZIP_MEMBERS} members")
                self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                piece = self._inflater.decompress(data, self._limit - self._size + 1)
            except zlib.error:
                raise Problem(400, "invalid_gzip",
                              "the body is not valid gzip data (Content-Encoding: gzip)") from None
            self._size += len(piece)
            if self._size > self._limit:
                raise Problem(413, "request_too_large", "the request body inflates to over "
                              f"the {_kilobytes(self._limit)} limit")
            out.append(piece)
            data = self._inflater.unused_data if self._inflater.eof \
                else self._inflater.unconsumed_tail
        return b"".join(out)

    def finish(self) -> None:
        """The body ended: it must have ended with a complete gzip member."""
        if not self._inflater.eof:
            raise Problem(400, "invalid_gzip", "the gzip body is truncated")


def _encoding(request: web.BaseRequest) -> str:
    """The body's encoding; two ``Content-Encoding`` fields count as a stacked one, as
    ``gzip, br`` in one field does (HTTP joins them so)."""
    return ", ".join(request.headers.getall("Content-Encoding", [])).strip().lower()


def _kilobytes(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} bytes"
