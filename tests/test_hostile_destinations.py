"""Destinations that misbehave below the status code: answers in pieces, keep-alive
connections closed under the client, answers that are not HTTP, TLS that never settles.
Each server is a raw asyncio socket server on 127.0.0.1 that writes exactly the bytes a test
needs."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest

from router.delivery.egress import EgressPolicy
from router.delivery.retry import classify_status
from router.delivery.transport import Transport
from router.destination import HttpRequest
from router.errors import PermanentError, RetryableError
from router.storage.base import DeadLetterFilter
from tests.delivery_helpers import FAST_RETRIES, router_for, track, webhook

TLS_FIXTURES = Path(__file__).parent / "fixtures" / "tls"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server running ``handler`` for each connection; counts connections.

    Handlers still running when the block ends (one holding its connection, one sleeping
    after its answer) are cancelled and awaited there: left pending, they were collected
    after the test's loop had closed, where ``writer.close()`` raised "Event loop is closed"
    and pytest failed the test for the unraisable exception (with pytest-asyncio before 1.1,
    which the ``testing`` extra admits; 1.1 cancels a loop's leftover tasks itself)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self._handlers.discard(task)

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self.server.wait_closed()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await reader.readexactly(length)
        self.requests.append(body)
        return body


def answer(status: int, body: bytes = b"{}", *, reason: bytes = b"OK") -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, reason, len(body)) + body)


async def send(request: HttpRequest, *, timeout: float = 5.0):
    transport = Transport(EgressPolicy(allow_private_addresses=True), connections=8)
    await transport.start()
    try:
        return await transport.send(request, timeout=timeout)
    finally:
        await transport.close()


@pytest.mark.parametrize("url_credentials, headers", [
    ("svc:pw@", {"Authorization": "Bearer t-1"}),  # aiohttp takes one or the other
    ("", {"X-Token": "a\r\nX-Injected: 1"}),  # a line break in a header
])
async def test_a_request_aiohttp_will_not_build_is_a_permanent_failure(
        url_credentials, headers) -> None:
    # It went to the "bug" path: retried for hours, a traceback at every attempt.
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("nothing should be sent")

    async with RawServer(never) as server:
        url = server.url().replace("http://", f"http://{url_credentials}")
        with pytest.raises(PermanentError, match="invalid request: ValueError"):
            await send(HttpRequest("POST", url, headers, b"{}"))
    assert server.requests == []


async def test_an_answer_that_arrives_in_pieces_is_read_whole() -> None:
    body = orjson.dumps({"errors": [{"index": n, "type": "'name' is required"}
                                    for n in range(50)]})

    async def in_two_packets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        whole = answer(201, body, reason=b"Created")
        writer.write(whole[:100])
        await writer.drain()
        await asyncio.sleep(0.1)  # the first packet has long been read by then
        writer.write(whole[100:])
        await writer.drain()

    async with RawServer(in_two_packets) as server:
        response = await send(HttpRequest("POST", server.url(), {}, b"{}"))
    assert response.status == 201
    assert response.body == body


@pytest.mark.parametrize("status", [200, 500])
@pytest.mark.parametrize("spoilt", ["not gzip", "cut short", "broken chunk after the status"])
async def test_an_answer_whose_body_cannot_be_read_is_judged_by_its_status(
        tmp_path, status, spoilt) -> None:
    """A 200 whose body did not decompress, or whose connection closed mid-body, was retried
    as a lost connection: the events went downstream twice (left alone in session 13). One
    whose chunked body broke in a later packet than its status waited out the timeout (the
    network audit): aiohttp's C parser closed the connection and never ended the body."""
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n" % status
    packets = {
        "not gzip": [head + b"Content-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"],
        "cut short": [head + b"Content-Length: 100\r\n\r\n{\"ok\": tr"],
        "broken chunk after the status": [head + b"Transfer-Encoding: chunked\r\n\r\n",
                                          b"zz\r\n{}\r\n0\r\n\r\n"],
    }[spoilt]

    async def spoils_the_first(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if len(server.requests) == 1:
            for packet in packets:
                writer.write(packet)
                await writer.drain()
                await asyncio.sleep(0.1)  # each packet read on its own
        else:
            writer.write(answer(200))
            await writer.drain()
        if spoilt == "cut short" or len(server.requests) == 1:
            return  # closes the connection
        while True:
            await server.read_request(reader)
            writer.write(answer(200))
            await writer.drain()

    async with RawServer(spoils_the_first) as server:
        # A request timeout far past the drain's deadline: a read that waited for a body that
        # cannot come would miss the deadline (no measured time to compare with a bound).
        router = router_for(tmp_path, [webhook("hook", server.url(), timeout="120s")])
        async with router:
            await router.route(track(1))
            assert await router.drain(timeout=15)
            letters = await router.storage.dead_letters(DeadLetterFilter())
    assert letters == []
    assert len(server.requests) == (1 if status == 200 else 2)  # a 500 is retried


@pytest.fixture(params=["C", "Python"])
def http_parser(request, monkeypatch) -> str:
    """aiohttp's response parser: its C one where the wheel has it, its pure-Python one with
    AIOHTTP_NO_EXTENSIONS=1. They fail differently on the same broken answer."""
    from aiohttp import client_proto, http_parser

    if request.param == "Python":
        monkeypatch.setattr(client_proto, "HttpResponseParser",
                            http_parser.HttpResponseParserPy)
    elif client_proto.HttpResponseParser is http_parser.HttpResponseParserPy:
        pytest.skip("aiohttp's C parser is not installed")
    return str(request.param)


@pytest.mark.parametrize("then", ["closes", "holds the connection"])
async def test_a_body_broken_after_the_status_is_judged_by_it_with_either_parser(
        http_parser, then) -> None:
    """With the C parser the read waited out the timeout although the client had closed the
    connection itself; with the pure-Python one its TransferEncodingError (not an aiohttp
    ClientError) escaped the transport as a bug (the network audit)."""
    async def broken_chunk_later(reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"zz\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        if then == "holds the connection":
            await asyncio.sleep(30)

    async with RawServer(broken_chunk_later) as server:
        # the answer, not the request's timeout: one far past this deadline
        response = await asyncio.wait_for(
            send(HttpRequest("POST", server.url(), {}, b"{}"), timeout=120), 15)
    assert (response.status, response.body) == (200, b"")


@pytest.mark.parametrize("broken", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}GARBAGE-LEFTOVER\r\n\r\n",
], ids=["broken chunk with the status", "garbage after a whole answer"])
async def test_an_answer_broken_before_its_status_is_seen_is_an_invalid_response(
        http_parser, broken) -> None:
    """aiohttp parses a packet whole and reports no status when any of it is broken: the
    router cannot know what the server said, and retries, as docs/delivery.md says (a
    webhook may then get the event twice)."""
    async def in_one_packet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(broken)
        await writer.drain()
        await asyncio.sleep(0.5)

    async with RawServer(in_one_packet) as server:
        with pytest.raises(RetryableError, match="^invalid response: ClientResponseError"):
            await send(HttpRequest("POST", server.url(), {}, b"{}"))


async def test_a_pooled_connection_reset_later_logs_no_unretrieved_error(caplog) -> None:
    """Watching for a lost connection makes aiohttp's future of its close; a pooled connection
    reset long after its request set an error on it that nobody read, and asyncio logged
    "Future exception was never retrieved" as a bug."""
    reset = asyncio.Event()

    async def resets_when_idle(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the body after the status: the read is watched
        writer.write(b"2\r\n{}\r\n0\r\n\r\n")
        await writer.drain()
        if len(server.requests) == 1:
            await asyncio.sleep(0.2)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # a reset, not a close
            reset.set()

    transport = Transport(EgressPolicy(allow_private_addresses=True), connections=8)
    await transport.start()
    try:
        async with RawServer(resets_when_idle) as server:
            request = HttpRequest("POST", server.url(), {}, b"{}")
            assert (await transport.send(request, timeout=5)).body == b"{}"
            await reset.wait()
            await asyncio.sleep(0.1)
            # The pool drops the reset connection, so nothing else ever reads its close.
            assert (await transport.send(request, timeout=5)).body == b"{}"
            gc.collect()
            await asyncio.sleep(0)
    finally:
        await transport.close()
    assert "never retrieved" not in caplog.text


async def test_item_refusals_in_a_late_packet_are_dead_lettered(tmp_path) -> None:
    """Braze answers 201 with the events it refused; read as its first packet only, that
    answer was not JSON and all 20 events counted as delivered."""
    refused = [{"type": "'name' is required", "input_array": "events", "index": n}
               for n in range(5)]
    body = orjson.dumps({"message": "success", "errors": refused})

    async def braze(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            whole = answer(201, body, reason=b"Created")
            writer.write(whole[:120])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(whole[120:])
            await writer.drain()

    async with RawServer(braze) as server:
        destination = {"name": "braze", "plugin": "braze",
                       "settings": {"api_key": "k" * 36, "rest_endpoint": server.url("")},
                       "delivery": {**FAST_RETRIES, "batch_wait": "200ms"}}
        router = router_for(tmp_path, [destination])
        async with router:
            await router.route_many([track(n, user=f"u{n}") for n in range(20)])
            assert await router.drain(timeout=20)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=100)
            delivered = router.delivery_metrics.delivered.get("braze")
    assert len(server.requests) == 1
    assert sorted(letter.message_id for letter in letters) == [f"m-{n}" for n in range(5)]
    assert all("'name' is required" in letter.reason for letter in letters)
    assert delivered == 15


async def test_a_keep_alive_connection_closed_under_the_client_costs_no_attempt(
        tmp_path) -> None:
    """The server closes each connection it has answered on once the next request comes,
    without answering it: its idle timeout racing the client's reuse. With one attempt
    allowed, every event was dead-lettered but the first, never having reached the server."""
    async def one_answer_a_connection(reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(200))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: closed

    async with RawServer(one_answer_a_connection) as server:
        hook = webhook("hook", server.url(), max_attempts=1, concurrency=1)
        router = router_for(tmp_path, [hook])
        async with router:
            for n in range(10):  # one at a time, so each reuses the last connection
                await router.route(track(n))
                assert await router.drain(timeout=10)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=100)
            metrics = router.delivery_metrics
    assert letters == []
    assert sorted(orjson.loads(body)["messageId"] for body in server.requests) == \
        sorted(f"m-{n}" for n in range(10))
    assert server.connections >= 10
    # Each event after the first went out twice: counted apart, not as attempts.
    assert metrics.resent.get("hook") == 9
    assert metrics.requests.get("hook", "200") == 10


async def test_the_resend_goes_on_a_new_connection_past_every_stale_pooled_one() -> None:
    """Three pooled connections the server has given up on: the resend took the next stale
    one from the pool and failed the same way."""
    async def one_answer_a_connection(reader: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(0.05)  # so that the first three need three connections
        writer.write(answer(200))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: closed

    transport = Transport(EgressPolicy(allow_private_addresses=True), connections=8)
    await transport.start()
    try:
        async with RawServer(one_answer_a_connection) as server:
            first = [transport.send(HttpRequest("POST", server.url(), {}, b"{}"), timeout=5)
                     for _ in range(3)]
            assert [r.status for r in await asyncio.gather(*first)] == [200, 200, 200]
            assert server.connections == 3
            response = await transport.send(HttpRequest("POST", server.url(), {}, b"{}"),
                                            timeout=5)
    finally:
        await transport.close()
    assert response.status == 200
    assert server.connections == 4  # the other two stale ones were closed unused


async def test_a_pooled_connection_closed_after_holding_the_request_is_not_resent() -> None:
    """A server that held the request half a second or more before closing may well have
    read and acted on it: that is a failed attempt, not the keep-alive race."""
    async def hold_then_close(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(200))
        await writer.drain()
        await server.read_request(reader)
        await asyncio.sleep(0.8)

    transport = Transport(EgressPolicy(allow_private_addresses=True), connections=8)
    await transport.start()
    try:
        async with RawServer(hold_then_close) as server:
            request = HttpRequest("POST", server.url(), {}, b"{}")
            assert (await transport.send(request, timeout=5)).status == 200
            with pytest.raises(RetryableError, match="connection lost"):
                await transport.send(request, timeout=5)
    finally:
        await transport.close()
    assert len(server.requests) == 2


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_request_reset_on_a_new_connection_is_not_sent_again(method: str) -> None:
    """Only a pooled connection closed under the request is the keep-alive race: a server
    that reads a request on a new connection and then resets may well have processed it.
    (aiohttp itself sends a PUT once more; the transport adds nothing to that.)"""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with RawServer(reset) as server:
        with pytest.raises(RetryableError, match="connection lost"):
            await send(HttpRequest(method, server.url(), {}, b"{}"))
    assert len(server.requests) == (1 if method == "POST" else 2)


async def test_reasons_never_quote_a_webhook_url_and_its_key(tmp_path, caplog) -> None:
    """aiohttp's errors quote the whole URL: a key in a webhook's query string went into
    every log line, dead letter and ``router dlq list``."""
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HELLO THERE\r\n\r\n")
        await writer.drain()

    caplog.set_level(logging.WARNING)
    async with RawServer(not_http) as server:
        url = server.url("/hook?token=qtokLITERALabc12345&x=1")
        router = router_for(tmp_path, [webhook("hook", url, max_attempts=2)])
        async with router:
            await router.route_many([track(n) for n in range(3)])
            assert await router.drain(timeout=20)
            letters = await router.storage.dead_letters(DeadLetterFilter(), limit=100)
    assert len(letters) == 3
    for letter in letters:
        assert letter.reason.startswith("gave up after 2 attempts; last: invalid response: ")
        assert "Bad status line" in letter.reason
        assert "400" not in letter.reason  # aiohttp's own code, not the server's
    shown = caplog.text + "".join(letter.reason for letter in letters)
    assert "qtokLITERAL" not in shown


def tls_server_context(*, tls_1_0_only: bool = False) -> ssl.SSLContext:
    """A server context with the fixture's self-signed certificate for 127.0.0.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls_1_0_only:
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(TLS_FIXTURES / "localhost.crt", TLS_FIXTURES / "localhost.key")
    return context


async def tls_server(context: ssl.SSLContext) -> asyncio.Server:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(100)
        except (OSError, ssl.SSLError):
            pass
        writer.close()

    return await asyncio.start_server(swallow, "127.0.0.1", 0, ssl=context)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
async def test_a_tls_handshake_refused_says_why() -> None:
    """A server that speaks only TLS 1.0 ends the handshake with an error that has no text:
    the reason read ``cannot connect: `` and nothing more."""
    try:
        context = tls_server_context(tls_1_0_only=True)
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot serve TLS 1.0 at all")
    server = await tls_server(context)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(RetryableError) as raised:
            await send(HttpRequest("POST", f"https://127.0.0.1:{port}/hook?token=qtokLITERAL",
                                   {}, b"{}"))
    finally:
        server.close()
    reason = raised.value.reason
    assert reason.startswith("cannot connect: ")
    assert reason.removeprefix("cannot connect: ").strip(), reason
    assert "qtokLITERAL" not in reason


async def test_certificates_are_verified() -> None:
    server = await tls_server(tls_server_context())
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(RetryableError, match="certificate verify failed"):
            await send(HttpRequest("POST", f"https://127.0.0.1:{port}/hook", {}, b"{}"))
    finally:
        server.close()


async def test_a_private_ca_is_trusted_through_ssl_cert_file() -> None:
    """The documented way to trust a private CA: ``SSL_CERT_FILE`` names the bundle that
    OpenSSL reads instead of the system's, for the whole process."""
    async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(200))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_ok, "127.0.0.1", 0, ssl=tls_server_context())
    port = server.sockets[0].getsockname()[1]
    script = ("import asyncio, sys; from tests.test_hostile_destinations import send; "
              "from router.destination import HttpRequest; "
              f"print(asyncio.run(send(HttpRequest('POST', 'https://127.0.0.1:{port}/', {{}}, "
              "b'{}'))).status)")
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent,
            env={**os.environ, "SSL_CERT_FILE": str(TLS_FIXTURES / "localhost.crt")})
        out, err = await asyncio.wait_for(child.communicate(), 60)
    finally:
        server.close()
    assert out.decode().strip() == "200", err.decode()[-2000:]


async def test_a_redirect_names_where_without_its_path_or_query() -> None:
    async def moved(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://new.example.com/"
                     b"hooks/T000/B000/secretpath?token=abc\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with RawServer(moved) as server:
        response = await send(HttpRequest("POST", server.url(), {}, b"{}"))
    outcome = classify_status(response.status, response.headers, frozenset(), now=0.0)
    assert outcome is not None
    assert outcome.reason == ("HTTP 301 (to https://new.example.com/…): redirects are not "
                              "followed")


async def test_a_cookie_one_destination_sets_never_reaches_another(tmp_path) -> None:
    """Two tenants' webhooks on one host: aiohttp's default cookie jar kept the cookie the
    first one's endpoint set and sent it with the second's requests (and with every later
    request of the first, as a browser would, which no API asks of a server-to-server
    client)."""
    from router.testing.fake_server import Answer, FakeDestinationServer
    async with FakeDestinationServer() as server:
        server.default = Answer(200, headers={"Set-Cookie": "session=tenant-1; Path=/"})
        base = server.url.replace("127.0.0.1", "localhost")  # aiohttp keeps no IP's cookies
        router = router_for(tmp_path, [webhook("tenant_1", f"{base}/t1"),
                                       webhook("tenant_2", f"{base}/t2")])
        async with router:
            for n in range(3):
                await router.route(track(n))
                await server.wait_for(2 * (n + 1))
    assert len(server.requests) == 6
    assert [request.headers.get("Cookie") for request in server.requests] == [None] * 6
