"""The egress guard (S6 of the test plan): what it refuses, where, and that it stays out of
the way of public destinations and of what the operator allows.

Nothing here sends traffic beyond loopback: public addresses appear only in pure checks or
as fake DNS answers that are refused or never connected to, and the ``loopback_only``
fixture fails any test whose code tries to open a socket anywhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import BaseModel
from yarl import URL

from router.delivery.egress import (
    DaemonThreadResolver,
    EgressBlocked,
    EgressPolicy,
    GuardedResolver,
    ResolutionBlocked,
    address_allowed,
    check_request_url,
    check_url,
    egress_reason,
    make_connector,
    parse_ipv4_loose,
    session_kwargs,
)
from router.config import parse_config
from router.delivery.transport import Transport
from router.destination import Destination, HttpRequest, Payload
from router.errors import PermanentError, RetryableError, RouterError
from router.hookspecs import hookimpl
from router.registry import create_registry
from router.routing import Router
from router.storage.base import DeadLetterFilter

DEFAULT = EgressPolicy()
PRIVATE_OK = EgressPolicy(allow_private_addresses=True)


# --- test doubles: DNS answers and a local server ---------------------------------------


class ScriptedResolver(AbstractResolver):
    """DNS as a script: each name answers its lists of addresses in turn (the last one
    repeats), so a test can play a rebinding attack without any real lookup."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.lookups.append(host)
        script = self.answers.get(host.rstrip("."))
        if not script:
            raise OSError(f"no such host {host!r} in the test script")
        addresses = script.pop(0) if len(script) > 1 else script[0]
        return [_result(host, address, port) for address in addresses]

    async def close(self) -> None:
        pass


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return {"hostname": host, "host": address, "port": port, "family": family,
            "proto": 0, "flags": 0}


@dataclass
class Server:
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def loopback_only(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[object]]:
    """A safety net, not part of what is tested: refuses and records any outgoing
    connection to a non-loopback address, so a guard bug fails the test instead of
    sending packets to 169.254.169.254 or the internet."""
    loop = asyncio.get_running_loop()
    real_sock_connect = loop.sock_connect
    escaped: list[object] = []

    async def sock_connect(sock: socket.socket, address: tuple) -> None:   # type: ignore[type-arg]
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            escaped.append(address)
            raise ConnectionRefusedError(f"test safety net: {address[0]} is not loopback")
        await real_sock_connect(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    yield escaped
    assert escaped == [], f"connections were attempted beyond loopback: {escaped}"


@pytest.fixture
async def server(loopback_only: list[object]) -> AsyncIterator[Server]:
    """An aiohttp server on 127.0.0.1 that records every request it receives."""
    app = web.Application()
    state = Server(port=0)

    async def ok(request: web.Request) -> web.Response:
        state.hits.append(request.path)
        return web.Response(text="ok")

    async def to_metadata(request: web.Request) -> web.Response:
        state.hits.append(request.path)
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def to_self(request: web.Request) -> web.Response:
        state.hits.append(request.path)
        raise web.HTTPFound("/")

    app.router.add_get("/", ok)
    app.router.add_post("/", ok)
    app.router.add_get("/to-metadata", to_metadata)
    app.router.add_get("/to-self", to_self)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


def _session(policy: EgressPolicy, resolver: AbstractResolver | None = None
             ) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(**session_kwargs(policy, resolver=resolver))


# --- S6: every case refused by the pure check (config load, dry-run) --------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
    ("http://localhost:8080/hook", "localhost is a loopback host name"),
    ("http://LOCALHOST./hook", "localhost is a loopback host name"),
    ("http://api.localhost/hook", "api.localhost is a loopback host name"),
    ("http://[::1]/hook", "::1 is a loopback address"),
    ("http://0.0.0.0/hook", "0.0.0.0 is the unspecified address"),
    ("http://[::]/hook", ":: is the unspecified address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254 is a cloud metadata address"),
    ("http://[::ffff:169.254.169.254]/", "embeds 169.254.169.254, which is a cloud metadata"),
    ("http://169.254.1.1/", "169.254.1.1 is a link-local address"),
    ("http://[fe80::1%25eth0]/", "fe80::1 is a link-local address"),
    ("http://10.0.0.1/", "10.0.0.1 is a private address"),
    ("http://10.255.255.254/", "10.255.255.254 is a private address"),
    ("http://172.16.0.1/", "172.16.0.1 is a private address"),
    ("http://172.31.255.254/", "172.31.255.254 is a private address"),
    ("http://192.168.1.1/", "192.168.1.1 is a private address"),
    ("http://[fd12:3456::1]/", "fd12:3456::1 is a private address"),
    ("http://100.64.0.1/", "100.64.0.1 is a carrier-grade NAT (shared) address"),
    ("http://100.127.255.254/", "100.127.255.254 is a carrier-grade NAT (shared) address"),
    ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
    ("http://255.255.255.255/", "255.255.255.255 is the broadcast address"),
    ("http://240.0.0.1/", "240.0.0.1 is a reserved address"),
    ("http://192.0.2.10/", "192.0.2.10 is not a public address"),
    # Numeric forms ipaddress does not parse but libc and browsers do.
    ("http://2130706433/", "127.0.0.1 is a loopback address"),
    ("http://0177.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://0x7f000001/", "127.0.0.1 is a loopback address"),
    ("http://0x7f.1/", "127.0.0.1 is a loopback address"),
    ("http://127.1/", "127.0.0.1 is a loopback address"),
    ("http://127.0.0.1./", "127.0.0.1 is a loopback address"),
    ("http://2852039166/", "169.254.169.254 is a cloud metadata address"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "127.0.0.1 is a loopback address"),
    # IPv6 forms that carry an IPv4 address.
    ("http://[2002:7f00:1::]/", "embeds 127.0.0.1, which is a loopback address"),
    ("http://[64:ff9b::a9fe:a9fe]/", "embeds 169.254.169.254, which is a cloud metadata"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fefe]/", "embeds 127.0.1.1, which is a loopback"),
    # Schemes and malformed URLs.
    ("file:///etc/passwd", "only http and https URLs are allowed, not 'file'"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "only http and https URLs are allowed, not 'gopher'"),
    ("ftp://example.com/", "only http and https URLs are allowed, not 'ftp'"),
    ("/relative/path", "only http and https URLs are allowed"),
    ("http:///no-host", "the URL has no host"),
    ("http://example.com/\r\nX-Injected: 1", "control characters"),
    ("http://example.com\n.evil/", "control characters"),
    ("http://127.0.0.1\x00.example.com/", "control characters"),
    ("http://%31%32%37.0.0.1/", "contains percent-encoding"),
])
def test_refused_by_default(url: str, reason: str) -> None:
    refusal = check_url(url, DEFAULT)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize("url", [
    "https://8.8.8.8/",
    "http://1.1.1.1:8080/x",
    "https://[2606:4700:4700::1111]/",
    "https://[::ffff:8.8.8.8]/",
    "https://[64:ff9b::808:808]/",      # what DNS64 hands out on an IPv6-only network
    "https://api.example.com/v1/track?api_key=x",
    "https://user:secret@hooks.example.com/",
    "HTTPS://Hooks.Example.COM/",
    "https://localhost.example.com/",   # only "localhost" and "*.localhost" are loopback names
    "https://100.128.0.1/",             # just past 100.64/10
    "https://172.32.0.1/",              # just past 172.16/12
])
def test_public_destinations_pass(url: str) -> None:
    assert check_url(url, DEFAULT) is None


async def test_check_request_url_raises_the_same_reason() -> None:
    with pytest.raises(EgressBlocked, match="169.254.169.254 is a cloud metadata address"):
        await check_request_url("http://169.254.169.254/", DEFAULT)
    await check_request_url("https://8.8.8.8/", DEFAULT)


def test_refusal_is_a_router_error_and_never_echoes_the_url() -> None:
    url = "http://10.0.0.1/hook?token=canary-secret"
    reason = check_url(url, DEFAULT)
    assert reason is not None and "canary-secret" not in reason
    assert issubclass(EgressBlocked, RouterError)


# --- libc's numeric IPv4 forms -----------------------------------------------------------


@pytest.mark.parametrize("text", [
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0X7F000001",
    "017700000001", "0177.0.0.1", "0x7f.0.0.1", "0x7f.1", "0.0.0.0", "0",
    "255.255.255.255", "4294967295", "1.2.65535", "010.010.010.010",
])
def test_loose_ipv4_matches_inet_aton(text: str) -> None:
    """The pure parser agrees with the platform's ``inet_aton``, which ``getaddrinfo``
    uses for numeric hosts: the forms an attacker would reach for."""
    expected = ipaddress.IPv4Address(socket.inet_aton(text))
    assert parse_ipv4_loose(text) == expected


def test_loose_ipv4_leans_to_the_browser_where_libc_differs() -> None:
    """glibc rejects a bare "0x"; the WHATWG URL parser reads it as 0. Taking the wider
    reading only ever refuses more."""
    assert parse_ipv4_loose("0x") == ipaddress.IPv4Address("0.0.0.0")
    assert parse_ipv4_loose("127.0.0.1.") == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize("text", [
    "256.0.0.1", "1.2.3.256", "4294967296", "1.2.3.4.5", "08.0.0.1", "0x1g.0.0.1",
    "1..2", "", "1_0.0.0.1", "+1.0.0.1", "example.com", "1.2.3.a",
])
def test_loose_ipv4_rejects_what_inet_aton_rejects(text: str) -> None:
    assert parse_ipv4_loose(text) is None
    with pytest.raises(OSError):
        socket.inet_aton(text)


# --- what the operator can open ----------------------------------------------------------


def test_allowed_networks_work_only_when_set() -> None:
    assert check_url("http://10.1.2.3/", DEFAULT) == "10.1.2.3 is a private address"
    policy = EgressPolicy(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),))
    assert check_url("http://10.1.2.3/", policy) is None
    assert check_url("http://[::ffff:10.1.2.3]/", policy) is None
    assert check_url("http://10.2.0.1/", policy) == "10.2.0.1 is a private address"
    assert check_url("http://127.0.0.1/", policy) == "127.0.0.1 is a loopback address"
    assert check_url("http://localhost/", policy) == "localhost is a loopback host name"


def test_allowed_networks_accept_strings_as_config_gives_them() -> None:
    policy = EgressPolicy(allowed_networks=("192.168.10.0/24", "fd00:1::/64"))
    assert address_allowed("192.168.10.7", policy) is None
    assert address_allowed("fd00:1::7", policy) is None
    assert address_allowed("192.168.11.7", policy) == "192.168.11.7 is a private address"


def test_allow_private_addresses_opens_everything_but_metadata() -> None:
    for url in ("http://127.0.0.1:9900/", "http://localhost/", "http://[::1]/",
                "http://10.0.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
                "http://169.254.1.1/"):
        assert check_url(url, PRIVATE_OK) is None, url
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/",
                "http://[::ffff:169.254.169.254]/", "http://2852039166/"):
        assert "cloud metadata" in (check_url(url, PRIVATE_OK) or ""), url


@pytest.mark.parametrize("url, policy, canonical", [
    ("http://134744072/", EgressPolicy(), "8.8.8.8"),
    ("http://8.8.2056/", EgressPolicy(), "8.8.8.8"),
    ("http://8.8.8.8./", EgressPolicy(), "8.8.8.8"),
    ("http://2130706433/", PRIVATE_OK, "127.0.0.1"),
    ("http://127.1:9900/", PRIVATE_OK, "127.0.0.1"),
])
def test_an_allowed_address_spelled_unusually_is_refused_with_its_usual_form(url, policy,
                                                                           canonical):
    # aiohttp refuses some of these spellings when it connects: accepted at load, each
    # request was retried for hours and then dead-lettered.
    assert check_url(url, policy) == (f"the host {URL(url).host!r} spells an IPv4 address "
                                      f"unusually; write it as {canonical}")


def test_an_invalid_international_host_name_is_refused_not_raised() -> None:
    assert (check_url("http://xn--localhost-/hook", EgressPolicy()) or "").startswith(
        "not a valid host name")


def test_metadata_opens_only_when_listed_on_its_own() -> None:
    wide = EgressPolicy(allowed_networks=("169.254.0.0/16", "0.0.0.0/0"))
    assert address_allowed("169.254.10.10", wide) is None
    assert address_allowed("169.254.169.254", wide) == "169.254.169.254 is a cloud metadata address"
    exact = EgressPolicy(allowed_networks=("169.254.169.254/32",))
    assert address_allowed("169.254.169.254", exact) is None


def test_allowed_ports() -> None:
    policy = EgressPolicy(allowed_ports=frozenset({80, 443}))
    assert check_url("https://example.com/", policy) is None
    assert check_url("http://example.com:8080/", policy) == \
        "port 8080 is not allowed (allowed: 80, 443)"
    assert check_url("http://example.com:22/", DEFAULT) is None


# --- the resolver: what names resolve to -------------------------------------------------


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    guard = GuardedResolver(DEFAULT, ScriptedResolver({"internal.test": [["127.0.0.1"]]}))
    with pytest.raises(ResolutionBlocked, match="internal.test resolves to a refused "
                                                "address: 127.0.0.1 is a loopback address"):
        await guard.resolve("internal.test", 80)


async def test_one_bad_address_refuses_the_whole_answer() -> None:
    guard = GuardedResolver(DEFAULT, ScriptedResolver(
        {"mixed.test": [["8.8.8.8", "2001:4860:4860::8888", "10.0.0.5"]]}))
    with pytest.raises(ResolutionBlocked, match="10.0.0.5 is a private address"):
        await guard.resolve("mixed.test", 443)


async def test_public_answers_pass_unchanged() -> None:
    inner = ScriptedResolver({"api.example.test": [["8.8.8.8", "2606:4700:4700::1111"]]})
    answers = await GuardedResolver(DEFAULT, inner).resolve("api.example.test", 443)
    assert [a["host"] for a in answers] == ["8.8.8.8", "2606:4700:4700::1111"]


async def test_dns_rebinding_second_lookup_is_refused() -> None:
    """Public on the first lookup, loopback on the second: each lookup is judged on its
    own, so the second is refused even though the name passed before."""
    guard = GuardedResolver(DEFAULT, ScriptedResolver(
        {"rebind.test": [["8.8.8.8"], ["127.0.0.1"]]}))
    first = await guard.resolve("rebind.test", 80)
    assert [a["host"] for a in first] == ["8.8.8.8"]
    with pytest.raises(ResolutionBlocked, match="rebind.test resolves to a refused address"):
        await guard.resolve("rebind.test", 80)


async def test_resolver_refuses_metadata_even_with_private_allowed() -> None:
    guard = GuardedResolver(PRIVATE_OK, ScriptedResolver(
        {"metadata.google.internal": [["169.254.169.254"]]}))
    with pytest.raises(ResolutionBlocked, match="cloud metadata"):
        await guard.resolve("metadata.google.internal", 80)


async def test_resolver_refuses_localhost_without_asking_dns() -> None:
    inner = ScriptedResolver({})
    with pytest.raises(ResolutionBlocked, match="localhost is a loopback host name"):
        await GuardedResolver(DEFAULT, inner).resolve("localhost", 80)
    assert inner.lookups == []


# --- connect time: real requests to a server on 127.0.0.1 --------------------------------


async def test_default_policy_refuses_loopback_and_private_allows_it(server: Server) -> None:
    async with _session(DEFAULT) as session:
        with pytest.raises(EgressBlocked, match="127.0.0.1 is a loopback address"):
            await session.get(server.url(), allow_redirects=False)
    assert server.hits == []

    async with _session(PRIVATE_OK) as session:
        async with session.get(server.url(), allow_redirects=False) as answer:
            assert answer.status == 200
            assert await answer.text() == "ok"
    assert server.hits == ["/"]


async def test_allowed_network_reaches_the_server(server: Server) -> None:
    policy = EgressPolicy(allowed_networks=("127.0.0.0/8",))
    async with _session(policy) as session:
        async with session.get(server.url(), allow_redirects=False) as answer:
            assert answer.status == 200
    assert server.hits == ["/"]


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"])
async def test_numeric_literal_refused_at_connect(server: Server, host: str) -> None:
    async with _session(DEFAULT) as session:
        with pytest.raises(EgressBlocked, match="127.0.0.1 is a loopback address"):
            await session.get(server.url(host=host), allow_redirects=False)
    assert server.hits == []


async def test_the_connector_alone_refuses_ip_literals(server: Server) -> None:
    """aiohttp never asks the resolver about IP literals; without the trace hooks the
    connector still refuses them."""
    async with aiohttp.ClientSession(connector=make_connector(DEFAULT),
                                     trust_env=False) as session:
        with pytest.raises(EgressBlocked, match="127.0.0.1 is a loopback address"):
            await session.get(server.url(), allow_redirects=False)
    assert server.hits == []


async def test_name_resolving_to_loopback_refused_at_connect(server: Server) -> None:
    """What a caller sees for a refused *name*: aiohttp's DNS error carrying our reason."""
    dns = ScriptedResolver({"internal.test": [["127.0.0.1"]]})
    async with _session(DEFAULT, dns) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
            await session.get(server.url(host="internal.test"), allow_redirects=False)
    reason = "internal.test resolves to a refused address: 127.0.0.1 is a loopback address"
    assert egress_reason(caught.value) == reason
    assert isinstance(caught.value.os_error, EgressBlocked)
    assert reason in str(caught.value)
    assert server.hits == []


async def test_resolved_address_is_the_one_connected_to(server: Server) -> None:
    """With private addresses allowed the same name reaches the server: the connector
    uses the answer the guard judged."""
    dns = ScriptedResolver({"internal.test": [["127.0.0.1"]]})
    async with _session(PRIVATE_OK, dns) as session:
        async with session.get(server.url(host="internal.test"),
                               allow_redirects=False) as answer:
            assert answer.status == 200
    assert server.hits == ["/"] and dns.lookups == ["internal.test"]


async def test_dns_rebinding_between_check_and_connect(server: Server) -> None:
    """The config check sees a public address, the connection lookup gets loopback: the
    lookup that decides where to connect is the one that is judged, so it is refused."""
    dns = ScriptedResolver({"rebind.test": [["8.8.8.8"], ["127.0.0.1"]]})
    url = server.url(host="rebind.test")
    await check_request_url(url, DEFAULT, resolver=dns)   # passes: 8.8.8.8
    async with _session(DEFAULT, dns) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
            await session.get(url, allow_redirects=False)
    assert egress_reason(caught.value) == \
        "rebind.test resolves to a refused address: 127.0.0.1 is a loopback address"
    assert dns.lookups == ["rebind.test", "rebind.test"]
    assert server.hits == []


async def test_check_request_url_with_resolver_previews_a_refusal() -> None:
    dns = ScriptedResolver({"internal.test": [["10.0.0.5"]]})
    with pytest.raises(EgressBlocked, match="internal.test resolves to a refused address: "
                                            "10.0.0.5 is a private address"):
        await check_request_url("https://internal.test/hook", DEFAULT, resolver=dns)


async def test_a_followed_redirect_to_metadata_is_refused_before_connecting(
        server: Server) -> None:
    async with _session(PRIVATE_OK) as session:
        # The transport's way: a 3xx is an answer, nothing is followed.
        async with session.get(server.url("/to-metadata"), allow_redirects=False) as answer:
            assert answer.status == 302
        # Following is attempted: the connector refuses the hop before connecting to it.
        with pytest.raises(EgressBlocked, match="169.254.169.254 is a cloud metadata"):
            await session.get(server.url("/to-metadata"), allow_redirects=True)
    assert server.hits == ["/to-metadata", "/to-metadata"]


async def test_allowed_redirect_is_followed(server: Server) -> None:
    async with _session(PRIVATE_OK) as session:
        async with session.get(server.url("/to-self"), allow_redirects=True) as answer:
            assert answer.status == 200
    assert server.hits == ["/to-self", "/"]


async def test_proxies_are_refused(server: Server) -> None:
    async with _session(PRIVATE_OK) as session:
        assert session.trust_env is False
        with pytest.raises(EgressBlocked, match="proxy"):
            await session.get(server.url(), proxy=server.url(), allow_redirects=False)
    assert server.hits == []


async def test_session_kwargs_ignore_the_environment() -> None:
    kwargs = session_kwargs(DEFAULT, limit=10)
    try:
        assert kwargs["trust_env"] is False
        assert kwargs["connector"].limit == 10
    finally:
        await kwargs["connector"].close()


# --- the transport: both refusal shapes become a permanent failure ----------------------


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    sender = Transport(EgressPolicy())
    await sender.start()
    try:
        yield sender
    finally:
        await sender.close()


async def test_transport_refuses_literals_permanently(server: Server, transport: Transport
                                                       ) -> None:
    with pytest.raises(PermanentError, match="egress refused: 127.0.0.1 is a loopback"):
        await transport.send(HttpRequest("POST", server.url(), body=b"{}"), timeout=2)
    assert server.hits == []


async def test_transport_refuses_resolved_names_permanently(server: Server) -> None:
    sender = Transport(EgressPolicy())
    await sender.start()
    try:
        # Swap in a session whose guard uses scripted DNS, as the transport builds it.
        assert sender._session is not None
        await sender._session.close()
        sender._session = _session(DEFAULT, ScriptedResolver({"internal.test": [["10.0.0.5"]]}))
        with pytest.raises(PermanentError, match="egress refused: internal.test resolves to "
                                                 "a refused address: 10.0.0.5"):
            await sender.send(HttpRequest("POST", server.url(host="internal.test"),
                                          body=b"{}"), timeout=2)
    finally:
        await sender.close()
    assert server.hits == []


class _InternalHost(Destination):
    """A plugin whose fixed host (not listed in ``endpoints``, as vendor APIs need not) is
    an internal address: only the guard at connect time stands in its way."""

    plugin_name = "internal_host"

    class Settings(BaseModel):
        pass

    def translate(self, event: Any, options: Any) -> list[Payload]:
        return [Payload({"id": event.messageId})]

    def build_request(self, payloads: Any) -> HttpRequest:
        return HttpRequest.json("POST", "http://127.0.0.1:9/in", [p.body for p in payloads])


class _InternalHostPlugin:
    @hookimpl
    def router_register_destinations(self, register: Any) -> None:
        register(_InternalHost)


async def test_a_request_the_egress_policy_refuses_is_counted_apart(tmp_path) -> None:
    # Dead-lettered, and counted as refused, not as the "error" of a destination that did
    # not answer: an alert can tell an attempt to reach an internal service from an outage.
    config = {"storage": f"sqlite:///{tmp_path / 'router.db'}",
              "destinations": [{"name": "internal", "plugin": "internal_host"}]}
    router = Router(parse_config(orjson.dumps(config).decode(), file="test.yaml", env={}),
                    registry=create_registry(extra_plugins=(_InternalHostPlugin(),)))
    async with router:
        await router.route({"type": "track", "event": "Tested", "userId": "u1"})
        assert await router.drain(timeout=10)
        (letter,) = await router.storage.dead_letters(DeadLetterFilter())
        metrics = router.delivery_metrics.registry.render()
    assert letter.reason.startswith("egress refused: 127.0.0.1 is a loopback")
    assert 'router_requests_total{destination="internal",status="egress_refused"} 1' in metrics
    assert 'status="error"' not in metrics


# --- lookups that do not finish ----------------------------------------------------------

_STUCK_LOOKUP = """
import asyncio, socket, sys, threading
real = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host == "api.stuck.test":
        threading.Event().wait()  # a nameserver that never answers
    return real(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo

from router.delivery.egress import EgressPolicy
from router.delivery.transport import Transport
from router.destination import HttpRequest
from router.errors import RetryableError

async def main():
    transport = Transport(EgressPolicy(), connections=4)
    await transport.start()
    try:
        await transport.send(HttpRequest("POST", "http://api.stuck.test/hook", {}, b"{}"),
                             timeout=0.5)
    except RetryableError as exc:
        print(exc, flush=True)
    finally:
        await transport.close()

asyncio.run(main())
"""


async def test_a_lookup_that_does_not_finish_does_not_hold_up_the_exit() -> None:
    """A stop took as long as the lookups stuck on a silent nameserver (23 s, against 3 s
    with IP literals, in the network audit), not as long as the requests under way: they ran
    on the default executor, which asyncio.run waits for as it ends."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STUCK_LOOKUP, stdout=asyncio.subprocess.PIPE)
    try:  # it exits at all: its lookup never ends
        out, _ = await asyncio.wait_for(child.communicate(), timeout=60)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    assert out.decode().startswith("timed out after 0.5s")


@pytest.fixture
def stuck_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """``api.stuck.test`` resolves only once the returned event is set (at teardown)."""
    answer = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "api.stuck.test":
            answer.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answer
    answer.set()


async def test_a_request_timed_out_in_its_lookup_says_so(stuck_lookups: threading.Event
                                                         ) -> None:
    # "timed out after 3s" alone sent operators to look at the destination.
    transport = Transport(DEFAULT, connections=4)
    await transport.start()
    try:
        with pytest.raises(RetryableError) as raised:
            await transport.send(HttpRequest("POST", "http://api.stuck.test/hook", {}, b"{}"),
                                 timeout=0.3)
    finally:
        await transport.close()
    assert str(raised.value) == ("timed out after 0.3s: the lookup of the address of "
                                 "api.stuck.test did not finish")


async def test_a_request_timed_out_after_its_lookup_says_only_that(
        stuck_lookups: threading.Event) -> None:
    """Another request's lookup still under way is not this request's: it had connected."""
    async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(holds, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(PRIVATE_OK, connections=4)
    await transport.start()
    try:
        stuck = asyncio.ensure_future(transport.send(
            HttpRequest("POST", "http://api.stuck.test/hook", {}, b"{}"), timeout=2))
        with pytest.raises(RetryableError) as raised:
            await transport.send(HttpRequest("POST", f"http://127.0.0.1:{port}/", {}, b"{}"),
                                 timeout=0.3)
        stuck.cancel()
    finally:
        await transport.close()
        server.close()
    assert str(raised.value) == "timed out after 0.3s"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNSPEC])
async def test_lookups_on_daemon_threads_answer_as_aiohttps_threaded_resolver(
        host: str, family: socket.AddressFamily) -> None:
    async def answers(resolver: AbstractResolver) -> object:
        try:
            return await resolver.resolve(host, 8080, family)
        except OSError as exc:
            return type(exc)

    assert (await answers(DaemonThreadResolver())
            == await answers(aiohttp.ThreadedResolver()))
