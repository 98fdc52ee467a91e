"""A fake destination API: a real aiohttp server on loopback that records what it receives
and answers from a script.

It speaks real HTTP on a real socket, so what it exercises is what production runs: the
transport, timeouts, connection errors, ``Retry-After``, batching and retries. Tests script
the answers (a status sequence, a slow answer, a dropped connection) and then assert on the
requests it recorded::

    async with FakeDestinationServer() as server:
        server.script([503, Answer(429, headers={"Retry-After": "1"}), 200])
        ...  # point a destination at server.url and route events
        await server.wait_for(3, timeout=10)
        assert [r.status for r in server.requests] == [503, 429, 200]

It binds 127.0.0.1 only, on a free port, and never anything else.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

LOOPBACK = "127.0.0.1"
MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""Larger than any vendor's batch limit, so the fake never refuses what a real API accepts."""
SHUTDOWN_GRACE = 0.5
"""Seconds ``stop`` waits for handlers before cancelling them: delayed answers are cut short."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One scripted answer.

    ``body`` is bytes, text, or JSON-able data (sent as JSON). ``delay`` holds the answer back
    that many seconds (to trigger the client's timeout); ``reset`` drops the connection
    instead of answering (the client sees a connection error, as with a crashed server or a
    load balancer resetting it).
    """

    status: int = 200
    body: Any = b"{}"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        """The body as bytes, and the headers with a Content-Type that fits it."""
        headers = dict(self.headers)
        if isinstance(self.body, bytes):
            data = self.body
        elif isinstance(self.body, str):
            data = self.body.encode()
        else:
            data = orjson.dumps(self.body)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json" if _is_json(data) \
                else "text/plain; charset=utf-8"
        return data, headers


AnswerLike = Answer | int
"""A status alone means ``Answer(status)``."""


@dataclass(slots=True)
class RecordedRequest:
    """A request as the fake received it. ``body`` is after any ``Content-Encoding`` was
    decoded; ``json`` is the body parsed, or None when it is not JSON. ``time`` is when it
    arrived (``time.time()``). ``answer`` is the answer chosen for it; ``status`` is the
    status actually sent, None while a delayed answer is held back, when the client gave up
    first, or when the connection was dropped instead."""

    method: str
    path: str
    query: MultiDictProxy[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any
    time: float
    status: int | None = None
    answer: Answer | None = None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


Handler = Callable[[RecordedRequest], "AnswerLike | None | Awaitable[AnswerLike | None]"]
"""Custom answering logic: called with each request; return an answer, or None to fall back
to the script and then the default. May be a coroutine function."""


class FakeDestinationServer:
    """A destination API on ``http://127.0.0.1:<free port>``; see the module docstring.

    How a request is answered, first match wins: the ``handler`` (when it returns an answer),
    the script for the request's path, the global script, then ``default`` (200 ``{}``).
    Scripts are consumed in arrival order, one answer per request.
    """

    def __init__(self, *, handler: Handler | None = None,
                 default: AnswerLike = Answer(200)) -> None:
        self.handler = handler
        self.default = default
        self.requests: list[RecordedRequest] = []
        self._scripts: dict[str | None, deque[Answer]] = {}
        self._arrived = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> FakeDestinationServer:
        if self._runner is not None:
            raise RuntimeError("the fake destination server is already running")
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE,
                               handler_cancellation=True)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, 0))  # port 0: the kernel picks a free one
            self._port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._closing.clear()
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop listening and end every connection; delayed answers are dropped. The URL
        stays known, so a test can use it as "a port nothing listens on"."""
        if self._runner is None:
            return
        self._closing.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> FakeDestinationServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("start the fake destination server first")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, without a trailing slash: append paths to it."""
        return f"http://{LOOPBACK}:{self.port}"

    # -- scripting --------------------------------------------------------------------------

    @property
    def default(self) -> Answer:
        """The answer when no handler or script gives one."""
        return self._default

    @default.setter
    def default(self, answer: AnswerLike) -> None:
        self._default = _as_answer(answer)

    def script(self, answers: Iterable[AnswerLike], *, path: str | None = None) -> None:
        """Answer the next requests with ``answers``, in order, then fall back to the default.

        With ``path`` (``"/import"``), only requests to that path consume them. A new script
        for the same path replaces the old one.
        """
        self._scripts[path] = deque(_as_answer(answer) for answer in answers)

    def clear(self) -> None:
        """Forget the recorded requests and every script."""
        self.requests.clear()
        self._scripts.clear()

    # -- observing --------------------------------------------------------------------------

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests whose path is ``path``."""
        return [request for request in self.requests if request.path == path]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests have arrived; ``TimeoutError`` saying how
        many did when they do not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"expected {count} requests at {self.url} within "
                                   f"{timeout:g}s, got {len(self.requests)}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass
        return list(self.requests)

    # -- answering --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = RecordedRequest(
            method=request.method, path=request.path,
            query=MultiDictProxy(MultiDict(request.query)),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body, json=_json_or_none(body), time=time.time())
        self.requests.append(recorded)
        self._arrived.set()

        answer = await self._choose(recorded)
        recorded.answer = answer
        if answer.delay > 0:
            try:
                await asyncio.wait_for(self._closing.wait(), answer.delay)
                return _drop(request)  # stopping: a held answer is never sent
            except TimeoutError:
                pass
        if answer.reset:
            return _drop(request)
        data, headers = answer.encoded()
        recorded.status = answer.status
        return web.Response(status=answer.status, body=data, headers=headers)

    async def _choose(self, request: RecordedRequest) -> Answer:
        if self.handler is not None:
            chosen = self.handler(request)
            if inspect.isawaitable(chosen):
                chosen = await chosen
            if chosen is not None:
                return _as_answer(chosen)
        for key in (request.path, None):
            queue = self._scripts.get(key)
            if queue:
                return queue.popleft()
        return self._default


def _drop(request: web.Request) -> web.StreamResponse:
    """Reset the connection: SO_LINGER 0 makes close() send RST, as a crashed peer does.

    The handler still has to return a response to aiohttp; it is never written, since the
    transport is gone.
    """
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=499)


def _as_answer(answer: AnswerLike) -> Answer:
    if isinstance(answer, Answer):
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        return Answer(answer)
    raise TypeError(f"expected a status (int) or an Answer, got {answer!r}")


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
