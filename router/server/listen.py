"""Listening for connections, at most ``server.max_connections`` open at once.

Each open connection holds a file descriptor and a little memory for as long as its client
keeps it, up to the keep-alive timeout. Without a cap, a client opening connections faster
than they expire takes every descriptor the process may have, and then the router cannot
open its own files or sockets either: intake fails for everyone, with ``EMFILE`` errors
instead of an answer. With the cap, a connection over it gets ``503 too_many_connections``
at once, with ``Retry-After`` (which client libraries honour), and the connections already
open carry on.

aiohttp's own ``TCPSite`` takes no protocol factory, so ``listen`` opens the socket itself
with the public pieces: the runner's ``web.Server`` is the factory for admitted
connections and counts them (``connections``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

import orjson
from aiohttp import web

from router.server.app import OVERLOADED_RETRY_AFTER
from router.server.problems import problem_body

log = logging.getLogger("router.server")

BACKLOG = 128
"""Connections the kernel holds for us before we accept them (aiohttp's default)."""
LINGER = 2.0
"""Seconds a turned-away connection stays open after the answer, reading and discarding
what the client still sends: closing with unread data makes the kernel reset the connection,
and the client would see the reset instead of the 503."""
MAX_LINGERING = 64
"""Turned-away connections left open at once for ``LINGER``; those beyond are closed as
soon as the 503 is written. Each holds a file descriptor: clients reconnecting at once
(1,500 of them in a test) kept so many open that SQLite could not open its files, and
intake failed for everyone."""

TOO_MANY_CONNECTIONS = "too_many_connections"
UNREAD_ENDPOINT = "unread"
"""The endpoint label a turned-away connection counts under: its request was never read."""
_BODY = orjson.dumps(problem_body(TOO_MANY_CONNECTIONS, "too many open connections; retry later"))
TURN_AWAY_STATUS = 503
TURN_AWAY = (b"HTTP/1.1 503 Service Unavailable\r\n"
             b"Content-Type: application/json\r\n"
             b"Access-Control-Allow-Origin: *\r\n"
             b"Access-Control-Expose-Headers: Retry-After\r\n"
             b"Retry-After: %d\r\n"
             b"Connection: close\r\n"
             b"Content-Length: %d\r\n\r\n" % (OVERLOADED_RETRY_AFTER, len(_BODY))) + _BODY


class _TurnAway(asyncio.Protocol):
    """One connection over the cap: the 503, then close once the client is done (or after
    ``LINGER`` seconds). ``turned_away`` is told the client's address."""

    lingering: ClassVar[int] = 0
    """Turned-away connections open now, across every listening socket of the process."""

    def __init__(self, turned_away: Callable[[str | None], None]) -> None:
        self._turned_away = turned_away
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._turned_away(peer[0] if isinstance(peer, tuple) else None)
        transport.write(TURN_AWAY)
        if transport.can_write_eof():
            transport.write_eof()
        self._transport = transport
        _TurnAway.lingering += 1
        if _TurnAway.lingering > MAX_LINGERING:
            transport.close()  # written first; the client may see a reset if it sent more
        else:
            self._closer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        """What the client still sends is read and dropped."""

    def eof_received(self) -> bool:
        self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        _TurnAway.lingering -= 1
        if self._closer is not None:
            self._closer.cancel()


async def listen(runner: web.AppRunner, host: str, port: int, *, max_connections: int,
                 turned_away: Callable[[str | None], None] = lambda remote: None
                 ) -> asyncio.Server:
    """Serve ``runner``'s app on ``host:port``, at most ``max_connections`` connections at
    once; ``turned_away`` is called with the client's address for each connection over it.
    Close the returned server before ``runner.cleanup()`` (which then drains the connections
    still open)."""
    server = runner.server
    if server is None:
        raise RuntimeError("listen() needs a runner that is set up")
    loop = asyncio.get_running_loop()
    admitting = 0
    """Connections admitted whose ``connection_made`` may not have run yet: asyncio makes
    each protocol of a burst of accepts before any of them is told its connection is made
    (and so counted in ``server.connections``); counting only those let a burst of 200
    through a cap of 64."""

    def admitted() -> None:
        nonlocal admitting
        admitting -= 1

    def protocol() -> asyncio.BaseProtocol:
        nonlocal admitting
        if len(server.connections) + admitting >= max_connections:
            return _TurnAway(turned_away)
        admitting += 1
        # Scheduled twice, so as to run after the connection_made the transport schedules
        # next: a connection is counted twice for a moment, never not at all.
        loop.call_soon(loop.call_soon, admitted)
        return server()

    if _every_ipv6_address(host):
        return await loop.create_server(protocol, sock=_dual_stack_socket(port),
                                        backlog=BACKLOG)
    return await loop.create_server(protocol, host, port, backlog=BACKLOG, reuse_address=True)


def _every_ipv6_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def _dual_stack_socket(port: int) -> socket.socket:
    """A socket on ``::`` that takes IPv4 clients too, as Go's and Node's do: asyncio makes
    every IPv6 socket IPv6-only, so ``host: "::"`` refused every IPv4 client, though the
    config's own hint offers ``::`` beside ``0.0.0.0`` (deployment audit)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


ACCEPT_FAILURE = "socket.accept() out of system resource"
"""asyncio's message when ``accept()`` fails for want of descriptors (EMFILE) or memory."""
ACCEPT_FAILURE_EVERY = 60.0
"""Seconds between two log lines about failed accepts."""


def say_accept_failures_once_a_minute(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs every failed ``accept()`` with its traceback and tries again a second
    later: out of descriptors under a flood of clients, that was tens of thousands of
    six-line tracebacks a minute, burying what else the log said. They become one line a
    minute that says how often it happened and what the limit is; other errors are passed
    on as before."""
    passed_on = loop.get_exception_handler()
    said_at, held_back = -math.inf, 0

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal said_at, held_back
        if context.get("message") != ACCEPT_FAILURE:
            if passed_on is None:
                loop.default_exception_handler(context)
            else:
                passed_on(loop, context)
            return
        now = time.monotonic()
        if now - said_at < ACCEPT_FAILURE_EVERY:
            held_back += 1
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("cannot accept client connections: %s (this process may open %s files); "
                  "they wait in the kernel's queue meanwhile%s", context.get("exception"),
                  "any number of" if soft == resource.RLIM_INFINITY else soft,
                  f" ({held_back} more failures since the last line)" if held_back else "")
        said_at, held_back = now, 0

    loop.set_exception_handler(handler)
