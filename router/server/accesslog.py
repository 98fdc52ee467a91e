"""One JSON line per request, for operators and log pipelines.

Only what is safe to keep: method, path (without the query string, where a careless client
might put a key), status, response size, duration, the remote address, the source the write
key belongs to, and for a refusal its reason code. Never the ``Authorization`` header, never
the body: both can carry secrets and personal data.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from router.config import IPNetwork
from router.delivery.failure_log import FailureLog
from router.events import format_time
from router.logs import json_line
from router.metrics import Counter

ACCESS_LOGGER = logging.getLogger("router.access")

SOURCE = web.RequestKey("source", str)
"""Set by the ingest handler once the write key is known: the source's configured name."""
REFUSAL = web.RequestKey("refusal", str)
"""Set when the request is refused as a whole: the ``Problem`` code (e.g. ``unauthorized``)."""

PROBE = web.RequestKey("probe", bool)
"""Set by ``/health`` and ``/metrics`` unless ``server.log_probes``: a load balancer and a
scraper ask every few seconds, and their lines would bury the ones about events. A probe
that did not get a 200 is logged all the same."""

CLIENT = web.RequestKey("client", str)
"""Set for every answer when ``server.trusted_proxies`` is configured: the client's address
as ``client_address`` finds it."""

MAX_LOGGED_PATH = 200
MAX_FORWARDED_HOPS = 20
"""``X-Forwarded-For`` entries read, from the right: more proxies than that is not a chain."""


class MalformedRequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's own log, given to its request handlers: a request its parser refuses (a
    request line that is no HTTP, a header over 8 KB, a method it does not know) is counted
    in ``/metrics`` (``router_http_requests_total{endpoint="unread"}`` and
    ``router_http_refused_total{code="malformed_request"}``) and said in one line, at most
    a few a second; anything else aiohttp logs goes on as it was, tracebacks of bugs included.
    Each such request was an ERROR with a traceback, so any client could flood the log, and
    none was counted, so the metrics and the access log disagreed (observability audit)."""

    def __init__(self, requests: Counter, refusals: Counter) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.requests, self.refusals = requests, refusals
        self.lines = FailureLog(logging.getLogger("router.server"), kind=("action",))

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            status = error.code or 400
            self.requests.inc("unread", str(status))
            self.refusals.inc("malformed_request")
            self.lines.write({"action": "malformed_request", "status": status,
                              "remote": args[0] if args else None, "reason": _why(error)})
            return
        super().log(level, msg, *args, **kwargs)


_QUOTED_BYTES = re.compile(r"bytearray\(|b?['\"]")


def _why(error: HttpProcessingError) -> str:
    """aiohttp's reason, cut where it starts quoting what the client sent: a line over the
    limit is quoted (``bytearray(b'/v1/track?writeKey=...'``), and so is a too-long
    Authorization header (hostile clients audit)."""
    why = str(error.message).strip().splitlines()[0] if error.message else ""
    why = _QUOTED_BYTES.split(why, maxsplit=1)[0].rstrip(" :")
    return f"{type(error).__name__}: {why}" if why else type(error).__name__


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status == 200 and request.get(PROBE):
            return
        line = {
            "time": _now(),
            "method": request.method,
            "path": request.path[:MAX_LOGGED_PATH],
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            "remote": request.get(CLIENT, request.remote),
            "source": request.get(SOURCE),
        }
        refusal = request.get(REFUSAL)
        if refusal is not None:
            line["refusal"] = refusal
        self.logger.info("%s", json_line(line))  # a path may decode to a lone surrogate

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def client_address(peer: str | None, forwarded_for: str | None,
                   trusted: Sequence[IPNetwork]) -> str | None:
    """Who sent the request: the peer, unless the peer is a trusted proxy. Each proxy appends
    to ``X-Forwarded-For`` the address it got the request from, and anything to their left
    came from the client, who can write what it likes there. So the entries are read from the
    right, past the trusted proxies, and the first other address is the client's; a chain
    made only of trusted proxies started at its leftmost. An entry that is not an address
    ends the reading: the last proxy that could be believed is named instead."""
    peer_address = _address(peer) if peer else None
    if not forwarded_for or peer_address is None or not _trusted(peer_address, trusted):
        return peer
    client = peer
    for hop in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
        address = _address(hop.strip())
        if address is None:
            break
        client = str(address)
        if not _trusted(address, trusted):
            break
    return client


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
             trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def log_turned_away(remote: str | None, status: int, size: int, refusal: str) -> None:
    """The line for a connection refused before any request was read from it (over
    ``server.max_connections``): no method, path or source, since none was read."""
    if ACCESS_LOGGER.isEnabledFor(logging.INFO):
        line = {"time": _now(), "method": None, "path": None, "status": status, "bytes": size,
                "duration_ms": 0.0, "remote": remote, "source": None, "refusal": refusal}
        ACCESS_LOGGER.info("%s", json_line(line))


def _now() -> str:
    """When the answer went out, in UTC: the access log goes to stdout, where no log
    formatter adds a time, and a pipeline reading it needs one."""
    return format_time(datetime.now(UTC))
