"""The egress guard: which addresses a destination may reach, checked where it matters.

Webhook URLs are written by users, so without a guard the router is a ready-made SSRF
proxy into the network it runs in: cloud metadata (169.254.169.254 hands out credentials),
admin ports on loopback, the private network behind the firewall. The guard follows the
rules of Advocate, Sentry and GitLab (see ``docs/egress.md``):

* ``check_url`` is pure and fast: scheme, control characters, port, the name ``localhost``,
  and IP literals in every spelling libc accepts (``2130706433``, ``0177.0.0.1``,
  ``0x7f000001``, ``127.1``). Config load, ``--dry-run`` and the transport all call it, so a
  URL is judged the same way wherever it is seen.
* ``GuardedResolver`` judges the addresses a name resolves to, and the connector connects to
  exactly those addresses, so DNS rebinding (public at check time, private at connect time)
  has no window. A lookup with *any* refused address is refused whole (Sentry's rule).
* aiohttp never asks the resolver about IP-literal hosts, and a redirect may point anywhere,
  so the connector re-checks every request it opens, each redirect hop included. The
  router's own transport follows no redirect (a 3xx is the destination's answer).

What a caller of ``aiohttp.ClientSession(**session_kwargs(policy))`` sees when the guard
refuses:

* ``EgressBlocked`` raised from ``session.request(...)`` itself, for a refused URL, IP
  literal, port, proxy or redirect target;
* ``aiohttp.ClientConnectorDNSError`` for a *name* whose addresses are refused: aiohttp wraps
  every resolver error that way. Its ``os_error`` (and ``__cause__``) is a ``ResolutionBlocked``
  (an ``EgressBlocked`` that is also an ``OSError``), and ``str()`` of the aiohttp error
  carries the reason in brackets. ``egress_reason(exc)`` digs the reason out of either.

Both are permanent failures: retrying cannot make a refused address acceptable.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from yarl import URL

from router.config import IPNetwork
from router.errors import RouterError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

ALLOWED_SCHEMES = frozenset({"http", "https"})
URL_VERDICTS_KEPT = 4096
"""URLs whose egress verdict a connector remembers (``GuardedConnector._verdict``)."""
_NOT_CHECKED: Any = object()

CLOUD_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),   # AWS, GCP, Azure, ...
                            ipaddress.ip_address("fd00:ec2::254")})    # AWS over IPv6
"""Refused even when private addresses are allowed: a webhook whose method and headers the
user controls can do the IMDSv2 token dance, so only an explicit allowlist entry opens it."""

_CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_NOT_GLOBAL_GAPS = tuple(ipaddress.ip_network(n) for n in (
    "192.88.99.0/24",   # 6to4 relay anycast (RFC 7526): leads to whichever relay is nearest
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215); Python 3.11 still calls it global
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOOPBACK_V4 = ipaddress.ip_address("127.0.0.1")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_OCT_DIGITS = frozenset("01234567")
_DEC_DIGITS = frozenset("0123456789")


class EgressBlocked(RouterError):
    """The egress policy refuses a request. ``reason`` says why, for people; it names the
    address or the rule, never the whole URL (URLs may carry keys in their query)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ResolutionBlocked(EgressBlocked, OSError):
    """Raised by ``GuardedResolver``. An ``OSError`` because aiohttp expects resolvers to fail
    with one and then wraps it in ``ClientConnectorDNSError`` (whose message shows
    ``strerror``); anything else would escape aiohttp's error handling unpredictably."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.strerror = reason


@dataclass(frozen=True)
class EgressPolicy:
    """Where destinations may send. The default refuses everything that is not a public
    address; ``allowed_networks`` opens chosen CIDRs without opening all private space.

    Strings are accepted for networks and any iterable for ports, so config code can pass
    what it parsed; they are normalised here so the policy is hashable and immutable.
    """

    allow_private_addresses: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] | None = None
    """None means any port."""

    def __post_init__(self) -> None:
        networks = tuple(n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                         else ipaddress.ip_network(n, strict=False)
                         for n in self.allowed_networks)
        object.__setattr__(self, "allowed_networks", networks)
        if self.allowed_ports is not None:
            object.__setattr__(self, "allowed_ports", frozenset(self.allowed_ports))


# --- addresses -------------------------------------------------------------------------


def address_allowed(ip: IPAddress | str, policy: EgressPolicy) -> str | None:
    """None if ``policy`` lets a connection reach ``ip``, else the reason, for people.

    IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo, NAT64) are judged by the
    IPv4 address too, because that is where the packets end up.
    """
    address = _as_address(ip)
    judged = _addresses_judged(address)
    for candidate in judged:
        if candidate in CLOUD_METADATA:
            if _listed_exactly(candidate, policy.allowed_networks):
                return None
            return _describe(address, candidate, "a cloud metadata address")
    if policy.allow_private_addresses:
        return None
    if any(candidate in network for candidate in judged
           for network in policy.allowed_networks):
        return None
    for candidate in judged:
        category = _category(candidate)
        if category:
            return _describe(address, candidate, category)
    return None


def _as_address(ip: IPAddress | str) -> IPAddress:
    """Parse resolver output, dropping an IPv6 zone (``fe80::1%eth0``): the zone does not
    change what the address is, and it would make ``fd00:ec2::254%eth0`` compare unequal to
    the metadata address."""
    text = str(ip).split("%", 1)[0]
    return ipaddress.ip_address(text)


def _addresses_judged(address: IPAddress) -> list[IPAddress]:
    """The addresses that decide, the embedded IPv4 first so a reason names it.

    An IPv4-mapped address *is* its IPv4 address, and a NAT64 address (64:ff9b::/96, what
    DNS64 hands out on IPv6-only networks) is translated to it, so both are judged by the
    IPv4 alone; Python calls all of 64:ff9b::/96 "reserved", which would cut an IPv6-only
    host off from every public destination. 6to4 and Teredo go through relays, so they are
    judged both by the IPv4 they embed and as themselves.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    embedded: list[IPAddress] = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)
    return [*embedded, address]


def _listed_exactly(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """A metadata address opens only when named on its own (``169.254.169.254/32``), never
    as a side effect of allowing a wider range such as ``169.254.0.0/16``."""
    return any(network.num_addresses == 1 and address in network for network in networks)


def _category(address: IPAddress) -> str | None:
    """What kind of non-public address this is, phrased to follow "is", or None if public."""
    checks: tuple[tuple[bool, str], ...] = (
        (address in CLOUD_METADATA, "a cloud metadata address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address"),
        (address in _CARRIER_GRADE_NAT, "a carrier-grade NAT (shared) address"),
        (any(address in network for network in _PRIVATE), "a private address"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
         "a site-local address"),
        (address.is_reserved, "a reserved address"),
        (any(address in network for network in _NOT_GLOBAL_GAPS) or not address.is_global,
         "not a public address"),
    )
    return next((label for matched, label in checks if matched), None)


def _describe(address: IPAddress, decisive: IPAddress, category: str) -> str:
    if decisive == address:
        return f"{address} is {category}"
    return f"{address} embeds {decisive}, which is {category}"


# --- URLs ------------------------------------------------------------------------------

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_url(url: str | URL, policy: EgressPolicy) -> str | None:
    """None if ``url`` may be sent to as far as can be told without DNS, else the reason.

    Pure, so config load and ``--dry-run`` can call it freely. Host names pass (except
    ``localhost``): what they resolve to is judged at connect time by ``GuardedResolver``,
    the only moment that counts.
    """
    if isinstance(url, str):
        if _CONTROL_CHARACTERS.search(url):
            # yarl silently drops CR/LF/TAB, browsers too: refuse rather than guess.
            return "the URL contains control characters (CR, LF, NUL, ...)"
        try:
            url = URL(url)
        except (ValueError, TypeError) as exc:
            return f"not a valid URL: {exc}"
    scheme = url.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"only http and https URLs are allowed, not {scheme or 'a relative URL'!r}"
    try:
        host = url.host  # decoded here: an invalid IDNA name ("xn--a-") fails only now
    except ValueError as exc:  # UnicodeError included
        return f"not a valid host name: {exc}"
    if not host:
        return "the URL has no host"
    port_reason = port_allowed(url.port, policy)
    if port_reason:
        return port_reason
    return host_allowed(host, policy)


def port_allowed(port: int | None, policy: EgressPolicy) -> str | None:
    """None if ``policy`` allows ``port``, else the reason."""
    if policy.allowed_ports is None or port in policy.allowed_ports:
        return None
    allowed = ", ".join(str(p) for p in sorted(policy.allowed_ports))
    return f"port {port} is not allowed (allowed: {allowed})"


def host_allowed(host: str, policy: EgressPolicy) -> str | None:
    """None unless ``host`` (a URL's decoded host) is an IP literal or loopback name the
    policy refuses. Names pass: they are judged after resolution.

    Cached: every request asks again about the same few hosts, and the verdict depends on
    nothing but the host and the (frozen) policy."""
    return _host_verdict(host, policy)


@functools.lru_cache(maxsize=4096)
def _host_verdict(host: str, policy: EgressPolicy) -> str | None:
    name = host.rstrip(".").lower()   # "127.0.0.1." and "localhost." mean the same thing
    if ":" not in name and "%" in name:
        # Browsers decode "%31%32%37.0.0.1" to 127.0.0.1; aiohttp does not. Refuse the doubt.
        return f"the host {host!r} contains percent-encoding"
    literal = ip_literal(name)
    if literal is not None:
        refused = address_allowed(literal, policy)
        if refused is None and literal.version == 4 and host != str(literal):
            # 134744072, 8.8.2056, "8.8.8.8.": aiohttp refuses some of these spellings when
            # it connects, and a request that can never be sent would be retried for hours.
            return (f"the host {host!r} spells an IPv4 address unusually; write it as "
                    f"{literal}")
        return refused
    if name == "localhost" or name.endswith(".localhost"):
        # RFC 6761: these names are loopback whatever DNS says, so judge them as 127.0.0.1.
        if address_allowed(_LOOPBACK_V4, policy) is not None:
            return f"{name} is a loopback host name"
    return None


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` denotes if it is an IP literal in any form libc's
    ``inet_aton`` (and so ``getaddrinfo``) or a browser accepts, else None.

    ``ipaddress`` only knows dotted quads, but ``2130706433``, ``0x7f000001``,
    ``0177.0.0.1`` and ``127.1`` all connect to 127.0.0.1; missing one is an SSRF bypass.
    """
    if ":" in host:
        try:
            return _as_address(host.strip("[]"))
        except ValueError:
            return None
    return parse_ipv4_loose(host)


def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """``inet_aton`` semantics in pure Python: one to four parts, each decimal, octal
    (leading 0) or hex (0x); the last part fills the remaining bytes. A single trailing dot
    is accepted, as browsers do. Pure so the answer does not depend on the platform's libc.
    """
    if text.endswith("."):
        text = text[:-1]
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_parse_ipv4_part(part) for part in parts]
    if any(value is None for value in values):
        return None
    numbers: list[int] = [value for value in values if value is not None]
    *head, last = numbers
    if any(value > 0xFF for value in head) or last >= 1 << (8 * (5 - len(numbers))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _parse_ipv4_part(part: str) -> int | None:
    if not part or not part.isascii():
        return None
    if part[:2].lower() == "0x":
        digits, base, alphabet = part[2:], 16, _HEX_DIGITS
        if not digits:
            return 0   # "0x" alone is 0 for both glibc and the WHATWG URL parser
    elif len(part) > 1 and part[0] == "0":
        digits, base, alphabet = part[1:], 8, _OCT_DIGITS
    else:
        digits, base, alphabet = part, 10, _DEC_DIGITS
    # int() would also take "_", "+", "-" and spaces; inet_aton takes none of them.
    if not set(digits) <= alphabet:
        return None
    return int(digits, base)


async def check_request_url(url: str | URL, policy: EgressPolicy, *,
                            resolver: AbstractResolver | None = None) -> None:
    """Raise ``EgressBlocked`` if ``url`` is refused. With ``resolver``, a host name is also
    resolved through ``GuardedResolver`` and its addresses judged: for previews (a config
    check or dry run that wants to report "resolves to 10.0.0.5"), never as the only
    guard, because the answer may differ at connect time."""
    reason = check_url(url, policy)
    if reason:
        raise EgressBlocked(reason)
    if resolver is None:
        return
    parsed = URL(url) if isinstance(url, str) else url
    assert parsed.host is not None
    if ip_literal(parsed.host.rstrip(".")) is None:
        try:
            await GuardedResolver(policy, resolver).resolve(parsed.host, parsed.port or 0,
                                                            family=socket.AF_UNSPEC)
        except ResolutionBlocked as exc:
            raise EgressBlocked(exc.reason) from None


def egress_reason(exc: BaseException) -> str | None:
    """The reason the egress policy refused, if ``exc`` (or what it wraps: aiohttp's
    ``os_error``, ``__cause__``, ``__context__``) is such a refusal; else None."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EgressBlocked):
            return current.reason
        pending.extend((getattr(current, "os_error", None), current.__cause__,
                        current.__context__))
    return None


# --- aiohttp ---------------------------------------------------------------------------


LOOKUP_THREADS = 32
"""Lookups under way at once, at most. A lookup whose nameserver never answers holds its
thread until the resolver's own timeout (30 s and more), whatever the request's timeout."""

_NUMERIC_ADDRESS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_ADDRCONFIG = getattr(socket, "AI_ADDRCONFIG", 0)


class DaemonThreadResolver(AbstractResolver):
    """``getaddrinfo`` on threads of its own, daemon threads, as aiohttp's
    ``ThreadedResolver`` does it on the event loop's default executor.

    On the default executor a lookup stuck on a silent nameserver held up the stop:
    ``asyncio.run`` waits for that executor's threads when it ends, so a stopping router
    waited for the lookups (about 23 s with a blackholed nameserver), not for its
    requests, which had timed out; and, on a small machine's six executor threads, stuck
    lookups queued everything else sent there (SQLite's work, the stop's metrics flush).
    A ``ThreadPoolExecutor`` of its own, even shut down without waiting, would only move
    the wait: ``concurrent.futures`` joins its threads at interpreter exit. Daemon threads
    are not joined; a lookup still under way at exit is abandoned with the process."""

    def __init__(self, *, threads: int = LOOKUP_THREADS) -> None:
        self._threads = asyncio.Semaphore(threads)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await self._in_thread(host, lambda: socket.getaddrinfo(
            host, port, family, socket.SOCK_STREAM, 0, _ADDRCONFIG))
        answers: list[ResolveResult] = []
        for info_family, _, proto, _, address in infos:
            if info_family == socket.AF_INET6:
                if len(address) < 4:
                    continue  # a Python built without IPv6
                if address[3]:
                    # A link-local address's zone (fe80::1%eth0): numeric, so no lookup.
                    text, port_text = socket.getnameinfo(address[:4], _NUMERIC_ADDRESS)
                    address_text, answer_port = text, int(port_text)
                else:
                    address_text, answer_port = str(address[0]), int(address[1])
            elif info_family == socket.AF_INET:
                address_text, answer_port = str(address[0]), int(address[1])
            else:
                continue
            answers.append(ResolveResult(
                hostname=host, host=address_text, port=answer_port, family=info_family,
                proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return answers

    async def _in_thread(self, host: str, call: Callable[[], T]) -> T:
        """``call()`` on a daemon thread. The thread is counted until ``call`` returns,
        not until its waiter gives up: a request that times out leaves the lookup
        running (aiohttp shares it with the next request for the same host)."""
        await self._threads.acquire()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()

        def settle(deliver: Callable[[], None]) -> None:
            self._threads.release()
            if not answer.done():  # done: cancelled, as the connector closed
                deliver()

        def look_up() -> None:
            deliver: Callable[[], None]
            try:
                deliver = functools.partial(answer.set_result, call())
            except Exception as exc:
                deliver = functools.partial(answer.set_exception, exc)
            try:
                loop.call_soon_threadsafe(settle, deliver)
            except RuntimeError:
                pass  # the loop is closed: its router stopped without waiting for this

        try:
            threading.Thread(target=look_up, name=f"lookup of {host}", daemon=True).start()
        except BaseException:
            self._threads.release()  # no thread started (the process is out of them)
            raise
        return await answer

    async def close(self) -> None:
        """Nothing to wait for: a lookup still under way ends with its daemon thread."""


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the whole answer if any address is refused.

    The connector connects only to addresses this returns, so what was checked is what is
    connected to. Refusing the whole answer rather than filtering it follows Sentry: a name
    that mixes public and private addresses is a rebinding attempt or a misconfiguration,
    and quietly dropping part of the answer would hide either.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner
        self._looking_up: Counter[str] = Counter()

    def looking_up(self, host: str) -> bool:
        """Whether a lookup of ``host`` is under way (to say so when a request times out)."""
        return self._looking_up[host] > 0

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        name_reason = host_allowed(host, self.policy)
        if name_reason:
            raise ResolutionBlocked(name_reason)
        if self._inner is None:
            self._inner = DaemonThreadResolver()
        self._looking_up[host] += 1
        try:
            answers = await self._inner.resolve(host, port, family)
        finally:
            self._looking_up[host] -= 1
            if not self._looking_up[host]:
                del self._looking_up[host]
        for answer in answers:
            reason = address_allowed(answer["host"], self.policy)
            if reason:
                raise ResolutionBlocked(
                    f"{host.rstrip('.')} resolves to a refused address: {reason}")
        return answers

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


@dataclass(slots=True)
class ConnectionNotes:
    """What ``GuardedConnector.connect`` notes of the connection it gives one request, for
    the transport that sent it: one object a request, set once in a ``ContextVar``
    (``connection_notes``) and filled in by the connector, rather than three ``ContextVar``
    sets a request, each a new context mapping (about 1 % of a request's instructions)."""

    connecting_to: str | None = None
    """The host it is connecting to, until it has a connection (None after). A request that
    times out with this set timed out connecting, and ``GuardedConnector.lookup_unfinished``
    says whether in the lookup of that host's addresses."""
    reused: bool = False
    """Whether its connection came from the keep-alive pool (the transport sends again a
    request whose reused connection the server had closed)."""


connection_notes: ContextVar[ConnectionNotes | None] = ContextVar("connection_notes",
                                                                  default=None)
"""Set by the caller, in the task that sends the request, to the ``ConnectionNotes`` the
connector fills in for it (nothing is noted while it is None)."""

pooled_connections_refused: ContextVar[bool] = ContextVar("pooled_connections_refused",
                                                          default=False)
"""Set by the caller for a request that must go on a new connection: the pooled ones it
would be given are closed instead (after one of them closed under a request, the others
to that server are as suspect)."""


class GuardedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that checks every request it opens a connection for.

    aiohttp skips the resolver for IP-literal hosts, and each redirect hop comes through
    here, so this is the one place every connection passes. Proxies are refused: a proxy
    resolves the name itself, out of the guard's sight. Being that place, it also notes
    whether each connection is a pooled one (``connection_notes``).
    """

    def __init__(self, policy: EgressPolicy, *, resolver: GuardedResolver,
                 **connector_kwargs: Any) -> None:
        super().__init__(resolver=resolver, **connector_kwargs)
        self.policy = policy
        self.guarded_resolver = resolver
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()
        self._verdicts: dict[URL, str | None] = {}
        """``check_url``'s verdict on each URL asked about (see ``_verdict``)."""

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Any],
                      timeout: aiohttp.ClientTimeout) -> Connection:
        if req.proxy is not None:
            raise EgressBlocked("requests through a proxy are refused: the proxy would "
                                "resolve the host beyond the egress check")
        reason = self._verdict(req.url)
        if reason:
            raise EgressBlocked(reason)
        notes = connection_notes.get()
        if notes is not None:
            notes.connecting_to = req.url.raw_host
        connection = await super().connect(req, traces, timeout)
        if pooled_connections_refused.get():
            while connection.protocol in self._used:
                connection.close()  # not put back in the pool: the next one, or a new one
                connection = await super().connect(req, traces, timeout)
        reused = connection.protocol in self._used
        if notes is not None:
            notes.reused, notes.connecting_to = reused, None
        if not reused:  # a weak reference made once a connection, not once a request
            self._used.add(connection.protocol)
        return connection

    def _verdict(self, url: URL) -> str | None:
        """``check_url(url, self.policy)``, remembered: it depends on nothing but the URL and
        the policy (frozen), and a destination sends its requests to the same few URLs (yarl
        hands out one ``URL`` object per string, its hash kept in it), so the check is made
        once a URL, not once a request. Forgotten all at once past ``URL_VERDICTS_KEPT``, for
        plugins whose URLs vary."""
        verdict = self._verdicts.get(url, _NOT_CHECKED)
        if verdict is _NOT_CHECKED:
            if len(self._verdicts) >= URL_VERDICTS_KEPT:
                self._verdicts.clear()
            verdict = self._verdicts[url] = check_url(url, self.policy)
        return verdict

    def lookup_unfinished(self) -> str | None:
        """The host whose address lookup the current task's request was waiting for, if
        it was still under way (called when the request timed out)."""
        notes = connection_notes.get()
        host = notes.connecting_to if notes is not None else None
        return host if host is not None and self.guarded_resolver.looking_up(host) else None


def make_connector(policy: EgressPolicy, *, resolver: AbstractResolver | None = None,
                   **connector_kwargs: Any) -> aiohttp.TCPConnector:
    """A connector enforcing ``policy``. ``resolver`` is the real DNS resolver to wrap
    (default ``DaemonThreadResolver``; tests inject a fake one). Must be called with an
    event loop running, as every aiohttp connector must."""
    return GuardedConnector(policy, resolver=GuardedResolver(policy, resolver),
                            **connector_kwargs)


def session_kwargs(policy: EgressPolicy, *, resolver: AbstractResolver | None = None,
                   **connector_kwargs: Any) -> dict[str, Any]:
    """What ``aiohttp.ClientSession(**...)`` needs to enforce ``policy``: the guarded
    connector, and ``trust_env=False`` so no ``HTTP(S)_PROXY`` from the environment routes
    requests around the guard. The connector checks every connection it opens, each hop of
    a redirect included, so a session that follows redirects is guarded as well (the
    router's own transport follows none: a 3xx is the destination's answer)."""
    return {"connector": make_connector(policy, resolver=resolver, **connector_kwargs),
            "trust_env": False}
