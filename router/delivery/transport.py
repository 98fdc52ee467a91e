"""The one place that talks HTTP: a shared aiohttp session, and the mapping of every client
error to the router's typed errors.

Redirects are not followed and ambient proxy settings are ignored, so the egress policy
checked on each request is the one that applies (see ``egress.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

# The methods aiohttp itself sends once more when their connection closes before an answer:
# the transport adds no second resend to those.
from aiohttp.client import IDEMPOTENT_METHODS as AIOHTTP_RESENDS

from router.delivery.egress import (ConnectionNotes, EgressBlocked, EgressPolicy,
                                    GuardedConnector, check_url, connection_notes,
                                    egress_reason, pooled_connections_refused, session_kwargs)
from router.destination import HttpRequest, HttpResponse
from router.errors import PermanentError, RetryableError
from router.redaction import cut_at_first_url
from router.runtime import pool_share, release_descriptors, reserve_descriptors

RESEND_WITHIN = 0.5
"""Seconds from sending within which a pooled connection's close counts as the keep-alive
race (it comes within a round trip): a server that held the request longer may well have
read it, and gets no second copy."""

MAX_RESPONSE_BYTES = 256 * 1024
"""Enough for any vendor's error report; a larger answer is cut, never held in full."""


class EgressRefused(PermanentError):
    """The egress policy refused the request's address before anything was sent: counted
    apart (``router_requests_total{status="egress_refused"}``), since it is more often an
    attempt to reach an internal service than a destination's fault."""


class Transport:
    """One session, and one pool of keep-alive connections, for every destination.

    The pool holds as many connections as the destinations may have requests in flight in
    all (the sum of their ``concurrency``), so no request ever waits for a connection: with
    a smaller pool, thirty hung destinations held every connection, and the healthy ones'
    requests waited for one and timed out (the timeout counts that wait)."""

    def __init__(self, policy: EgressPolicy, *, connections: int = 256) -> None:
        self.policy = policy
        self.connections = connections
        self._reserved = 0
        self._session: aiohttp.ClientSession | None = None
        self._connector: GuardedConnector | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        self._reserved = reserve_descriptors(
            self.connections, "connections to destinations (the sum of their concurrency)",
            share=pool_share())
        kwargs = session_kwargs(self.policy, limit=self._reserved, limit_per_host=0,
                                ttl_dns_cache=60)
        self._connector = kwargs["connector"]
        # No cookie jar: a cookie one destination's server sets would be sent to every
        # destination on that host (another tenant's webhook, say) and stay for good. The
        # session's User-Agent replaces aiohttp's (a plugin's own replaces it): no
        # ``skip_auto_headers``, which costs every request a copy of its headers.
        self._session = aiohttp.ClientSession(**kwargs, cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=True,
                                              headers={"User-Agent": "event-router"})

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            release_descriptors(self._reserved)

    async def send(self, request: HttpRequest, *, timeout: float,
                   on_resend: Callable[[], object] | None = None) -> HttpResponse:
        """Send one request. Returns the response whatever its status; raises
        ``RetryableError`` for network failures and timeouts, ``PermanentError`` for a
        request the egress policy refuses. Reasons never quote the URL: aiohttp's messages
        do, query string (and any key in it) included. ``on_resend`` is called when the
        request goes out a second time after the keep-alive race below."""
        started = time.monotonic()
        notes = ConnectionNotes()
        connection_notes.set(notes)  # filled in by the connector (egress.py)
        try:
            try:
                return await self._exchange(request, self._timeout(timeout))
            except aiohttp.ClientConnectorError:
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # Closed at once, before any answer, on a connection from the keep-alive
                # pool: the server closed it as the request went out (its idle timeout
                # raced ours) and most likely never read the request. Sent once more on a
                # new connection, within what is left of the timeout, as browsers do,
                # rather than spending one of the event's attempts. aiohttp already does
                # this itself for the methods it deems idempotent.
                elapsed = time.monotonic() - started
                if (not notes.reused or request.method in AIOHTTP_RESENDS
                        or elapsed > RESEND_WITHIN or elapsed >= timeout):
                    raise
                if on_resend is not None:
                    on_resend()
                refused = pooled_connections_refused.set(True)
                connection_notes.set(ConnectionNotes())  # the second connection's
                try:
                    return await self._exchange(
                        request, aiohttp.ClientTimeout(total=timeout - elapsed))
                finally:
                    pooled_connections_refused.reset(refused)
        except EgressBlocked as exc:
            raise EgressRefused(f"egress refused: {exc}") from None
        except TimeoutError:
            host = self._connector.lookup_unfinished() if self._connector is not None else None
            if host is not None:
                # Said apart: "timed out" alone sent operators looking at the destination,
                # when its name never resolved (a nameserver that does not answer).
                raise RetryableError(f"timed out after {timeout:g}s: the lookup of the "
                                     f"address of {host} did not finish") from None
            raise RetryableError(f"timed out after {timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            reason = egress_reason(exc)
            if reason:
                raise EgressRefused(f"egress refused: {reason}") from None
            # A TLS handshake reset has an os_error with no text at all.
            detail = str(exc.os_error or "") or str(exc)
            raise RetryableError(f"cannot connect: {cut_at_first_url(detail)}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError) as exc:
            raise RetryableError(f"connection lost: {_described(exc)}") from None
        except aiohttp.NonHttpUrlClientError:
            # aiohttp refuses gopher://, file:// ... before the guarded connector sees them:
            # said and counted as the egress rule refuses them, as a dry run says it.
            reason = check_url(request.url, self.policy) or "not an http or https URL"
            raise EgressRefused(f"egress refused: {reason}") from None
        except aiohttp.InvalidUrlClientError as exc:
            raise PermanentError(f"invalid URL: {_described(exc)}") from None  # again won't help
        except aiohttp.ClientResponseError as exc:  # an answer that is not HTTP/1.1 as written
            # Its status is aiohttp's own (400), not one the server sent.
            raise RetryableError(f"invalid response: {_described(exc, text=exc.message)}"
                                 ) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(f"request failed: {_described(exc)}") from None
        except ValueError as exc:
            # A request aiohttp will not build: credentials in the URL beside an
            # Authorization header, a line break in a header. Sending it again won't help;
            # as a bug it was retried with a traceback each time (observability audit).
            raise PermanentError(f"invalid request: {_described(exc)}") from None

    async def _exchange(self, request: HttpRequest, timeout: aiohttp.ClientTimeout
                        ) -> HttpResponse:
        assert self._session is not None, "transport not started"
        # The guarded connector checks the URL against the egress policy on every request,
        # pooled connection or not (egress.py), so it is not checked here too.
        async with self._session.request(
                request.method, request.url, headers=request.headers, data=request.body,
                allow_redirects=False, timeout=timeout) as answer:
            unwatch = _fail_body_when_connection_lost(answer)
            try:
                body = await _read_body(answer.content)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError, aiohttp.ClientResponseError, HttpProcessingError):
                # The status came, so the server has judged the request, and the answer is
                # judged by it as one without a body is: a 200 whose body was cut short, does
                # not decompress or whose chunked framing is broken was sent again, a second
                # copy downstream (Braze keeps no dedup id). What the body would have said
                # of single events is lost. HttpProcessingError is not a ClientError:
                # aiohttp's pure-Python parser raises its TransferEncodingError as it is.
                body = b""
            finally:
                unwatch()
            # aiohttp's case-insensitive view, not a copy: vendors' header names vary
            return HttpResponse(answer.status, answer.headers, body)


def _fail_body_when_connection_lost(answer: aiohttp.ClientResponse) -> Callable[[], None]:
    """Make the read of ``answer``'s body fail, rather than wait out the request's timeout,
    once its connection is gone with the body neither ended nor failed: nothing can end it
    then. aiohttp's C parser, on a broken chunked body that comes in a later packet than the
    status, closes the connection and drops the body's stream without ending it (aiohttp
    3.14.5; its pure-Python parser fails the read): a 200 waited out the whole timeout,
    and was sent again. Returns what stops watching, to call once the body is read."""
    connection = answer.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None:
        return _nothing  # the whole body came with the status: its connection is released
    content = answer.content

    def lost(_: object = None) -> None:
        if not content.is_eof() and content.exception() is None:
            content.set_exception(aiohttp.ClientPayloadError(
                "the connection closed before the body ended"))

    closed = protocol.closed
    if closed is None:  # lost before anyone asked: the future is never made
        lost()
        return _nothing
    # Asking for the future made it: should the pooled connection die of an error long
    # after this request, that error, never retrieved, would be logged as a bug. Added
    # once, however many requests the connection carries.
    closed.remove_done_callback(_retrieve)
    closed.add_done_callback(_retrieve)
    closed.add_done_callback(lost)

    def unwatch() -> None:
        closed.remove_done_callback(lost)

    return unwatch


def _retrieve(future: asyncio.Future[None]) -> None:
    """Reads the error of a connection's close, so asyncio does not log it as unread."""
    if not future.cancelled():
        future.exception()


def _nothing() -> None:
    pass


async def _read_body(content: aiohttp.StreamReader) -> bytes:
    """The body, up to ``MAX_RESPONSE_BYTES``. One ``read(n)`` returns only what has arrived
    so far: a vendor's list of refused items sent in two packets was read as its first, not
    JSON, so its refusals went unseen and the events counted as delivered."""
    first = await content.read(MAX_RESPONSE_BYTES)
    if content.at_eof() or len(first) >= MAX_RESPONSE_BYTES:
        return first  # the whole answer came at once, as most do
    chunks = [first]
    size = len(first)
    while size < MAX_RESPONSE_BYTES:
        chunk = await content.read(MAX_RESPONSE_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _described(error: BaseException, *, text: str | None = None) -> str:
    """``error`` as ``Type: text`` for a reason (its own text unless given one)."""
    text = cut_at_first_url(str(error) if text is None else text)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
