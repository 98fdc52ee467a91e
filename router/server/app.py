"""The Segment-compatible HTTP ingest API: routes and handlers.

``POST /v1/track|identify|page|screen|group|alias`` take one event, ``POST /v1/batch`` many;
the one-letter paths (``/v1/t``, ``/v1/i``, ``/v1/p``, ``/v1/s``, ``/v1/g``, ``/v1/a``,
``/v1/b``) are the ones analytics.js (analytics-next) posts to. A request goes through, in
this order, each step refusing with a precise answer:

1. the write key in the ``Authorization`` header, if there is one (``auth.py``);
2. the body: encoding, size, decompression (``body.py``), then strict JSON (``parsing.py``);
3. the write key in the body, if there was no header;
4. each event's own checks (depth, NUL, encodability, 32 KB), then ``Router.route_many``,
   which judges the event against the spec and returns once the accepted ones are durable.

Only then is the answer 200. In a batch each event is judged alone: the invalid ones are
listed with their index and reason, the others accepted. ``GET /health`` and
``GET /metrics`` are for operators. Run it with ``create_runner`` (not a bare ``AppRunner``):
the runner must leave request bodies compressed so that ``body.py`` can count and cap them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler

from router.config import IPNetwork
from router.delivery.failure_log import WINDOW, FailureLog
from router.errors import StorageFull, StorageUnavailable
from router.events import CALL_TYPES
from router.input import with_batch_defaults
from router.routing import RouteResult, Router, Status
from router.server.accesslog import (ACCESS_LOGGER, CLIENT, PROBE, REFUSAL, SOURCE,
                                     JsonAccessLogger, MalformedRequestLog, client_address)
from router.server.auth import WriteKeys, key_from_body, key_from_header
from router.server.body import check_headers, inflate, read_body
from router.server.parsing import (Rejection, check_event, parse_batch_json, parse_json,
                                   refused_in)
from router.server.problems import Problem, json_response, unauthorized
from router.server.telemetry import IngestMetrics, add_process_metrics

log = logging.getLogger("router.server")

MAX_BATCH_EVENTS = 2500
"""Segment's and Customer.io's limit on events per batch request."""
STORAGE_RETRY_AFTER = 30
"""Seconds a client is told to wait when the storage has no room (503)."""
HEALTH_TIMEOUT = 5.0
LINGERING_TIME = 2.0
KEEPALIVE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection is kept (nginx's default; aiohttp's is an hour, which
lets clients that never send another request pile up open sockets)."""
REQUESTS_IN_FLIGHT = 16
"""Ingest requests parsed and routed at once. Each costs memory (a 500 KB batch is several MB
as Python objects) and the work is one CPU's: more at once adds memory, not speed. Bodies are
read before a request takes its turn: a client that sends its body slowly (or never) holds a
connection, not one of these, so sixteen of them cannot stop intake for everyone."""
SHARED_FIELDS_COPIES = 8
"""A batch's ``context`` and ``integrations`` may come to this many request limits once
copied into each of its events (``_check_shared_fields``)."""
ADMISSION_WAIT = 10.0
"""How long a request waits for its turn before the answer is 503 with ``Retry-After``."""
OVERLOADED_RETRY_AFTER = 5

SHORT_PATHS = {"track": "/v1/t", "identify": "/v1/i", "page": "/v1/p", "screen": "/v1/s",
               "group": "/v1/g", "alias": "/v1/a"}
"""analytics-next posts each call to ``{apiHost}/{first letter of the type}``."""
BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/import")
"""``/v1/b`` is analytics-next's; ``/v1/import``, an older name Segment still answers, is
where analytics-ruby and analytics-java post their batches."""
ENDPOINTS: dict[str, str] = {
    **{f"/v1/{call}": call for call in CALL_TYPES},
    **{path: call for call, path in SHORT_PATHS.items()},
    **{path: "batch" for path in BATCH_PATHS},
    "/health": "health", "/metrics": "metrics",
}
"""Path -> the endpoint label of the request metrics (anything else counts as ``other``)."""

CORS_PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding, "
                                    "X-Retry-Count",
    "Access-Control-Max-Age": "86400",
}
_HEADER_NAMES = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_bytes: int


ROUTER = web.AppKey("router", Router)
WRITE_KEYS = web.AppKey("write_keys", WriteKeys)
METRICS = web.AppKey("ingest_metrics", IngestMetrics)
LIMITS = web.AppKey("limits", Limits)
ADMISSION = web.AppKey("admission", asyncio.Semaphore)
REJECTIONS = web.AppKey("rejections", FailureLog)
INVALID_FOR_DESTINATION = web.AppKey("invalid_for_destination", FailureLog)
TRUSTED_PROXIES: web.AppKey[tuple[IPNetwork, ...]] = web.AppKey("trusted_proxies")


class StateLog:
    """Says when something turns unavailable and why, again once a minute while it stays so
    or when the reason changes, and when it is ok again: a load balancer probing ``/health``
    every second wrote a line a second for as long as a Redis stayed full, and intake refused
    for a full disk said nothing at all (disk audit). An unavailable line is said at most
    once a minute unless its reason changes, so a state that flaps (intake at its disk
    budget, refused and accepting by turns) is not a pair of lines a request (review)."""

    REPEAT_AFTER = 60.0

    def __init__(self, unavailable: str, ok: str) -> None:
        self.unavailable_line = unavailable
        self.ok_line = ok
        self.down = False
        self.said_reason: str | None = None
        self.said_at = self.ok_said_at = -self.REPEAT_AFTER

    def unavailable(self, reason: str, *, exc_info: bool = False) -> None:
        """``reason`` is said again at once only if it changed in more than its figures:
        the free space a full disk's reason gives changes with nearly every write."""
        now = time.monotonic()
        kind = _DIGITS.sub("#", reason)
        if kind != self.said_reason or now - self.said_at >= self.REPEAT_AFTER:
            log.warning(self.unavailable_line, reason, exc_info=exc_info)
            self.said_reason, self.said_at = kind, now
        self.down = True

    def ok(self) -> None:
        """Said once after each unavailable line, so the log never ends on one while all is
        well (soak), and a flapping state says a pair of lines a minute at most."""
        if self.down:
            self.down = False
            if self.said_at > self.ok_said_at:
                log.warning(self.ok_line)
                self.ok_said_at = time.monotonic()


_DIGITS = re.compile(r"\d+")
HEALTH_LOG = web.AppKey("health_log", StateLog)
METRICS_LOG = web.AppKey("metrics_log", StateLog)
INTAKE_LOG = web.AppKey("intake_log", StateLog)
MAX_ASKED_HEADERS_CHARS = 1024
"""A preflight's list of header names is echoed up to this length (else the fixed list)."""
REASON_SHOWN = 300
"""A destination's reason for refusing an event is logged up to this many characters: it may
quote what it refused (GA4 an event name), which a client can make 30 KB long."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(router: Router) -> web.Application:
    """The ingest API in front of ``router`` (started and closed by the caller)."""
    config = router.config
    limits = Limits(max_request_bytes=config.server.max_request_bytes)
    app = web.Application(client_max_size=limits.max_request_bytes,
                          middlewares=[_answer_problems])
    app[ROUTER] = router
    app[WRITE_KEYS] = WriteKeys(config.sources)
    app[METRICS] = IngestMetrics(destinations=[d.name for d in router.destinations])
    add_process_metrics(app[METRICS].registry, lambda: router.delivery_process)
    app[LIMITS] = limits
    app[TRUSTED_PROXIES] = tuple(config.server.trusted_proxies)
    app[ADMISSION] = asyncio.Semaphore(REQUESTS_IN_FLIGHT)
    # Client libraries read neither a batch's list of rejected events nor, mostly, a 400's
    # reason: this log is where an operator sees why events went missing.
    app[REJECTIONS] = FailureLog(log, kind=("source",))
    app[INVALID_FOR_DESTINATION] = FailureLog(log, kind=("destination",))
    app[HEALTH_LOG] = StateLog("health check: %s", "health check: ok again")
    app[METRICS_LOG] = StateLog("metrics: cannot read the storage's figures (router_storage_up "
                                "is 0): %s", "metrics: reading the storage's figures again")
    app[INTAKE_LOG] = StateLog("intake refused: %s", "intake accepts events again")
    app.cleanup_ctx.append(_flushing_rejections)
    if app[WRITE_KEYS].empty:
        log.warning("no sources are configured: the HTTP API refuses every request with 401 "
                    "(add sources with write_keys to the config)")

    for call_type in CALL_TYPES:
        _add_ingest(app, (f"/v1/{call_type}", SHORT_PATHS[call_type]), _call_handler(call_type))
    _add_ingest(app, BATCH_PATHS, handle_batch)
    logged = config.server.log_probes
    app.router.add_get("/health", _probe(handle_health, logged=logged))
    app.router.add_get("/metrics", _probe(handle_metrics, logged=logged))
    app.on_response_prepare.append(_finish_response)
    return app


def create_runner(app: web.Application, *, shutdown_timeout: float = 60.0) -> web.AppRunner:
    """The runner the app must be served with: bodies left compressed for ``body.py`` to
    count and cap, and one JSON access-log line per request.

    ``lingering_time``: after refusing a body it has not read (413, 415, 401), aiohttp keeps
    draining the connection so the client can still read the answer, by default for 10 s,
    and in this version for the whole time even once the client is done (aio-libs/aiohttp
    #1800). 2 s is plenty for a client to finish sending, and keeps refused uploads from
    holding connections, or a graceful shutdown, for long."""
    metrics = app[METRICS]
    return web.AppRunner(app, auto_decompress=False, access_log_class=JsonAccessLogger,
                         access_log=ACCESS_LOGGER, shutdown_timeout=shutdown_timeout,
                         lingering_time=LINGERING_TIME, keepalive_timeout=KEEPALIVE_TIMEOUT,
                         logger=MalformedRequestLog(metrics.requests, metrics.refusals))


def _add_ingest(app: web.Application, paths: Sequence[str], handle: BodyHandler) -> None:
    handler = _read_then_turn(handle)
    for path in paths:
        app.router.add_post(path, handler, expect_handler=_expect_continue)
        app.router.add_route(hdrs.METH_OPTIONS, path, handle_preflight)


# -- ingest -----------------------------------------------------------------------------------

BodyHandler = Callable[[web.Request, bytes], Awaitable[web.Response]]
"""An ingest handler: the request and its body, inflated, read in its turn."""


def _read_then_turn(handle: BodyHandler) -> Handler:
    """``handle`` run with the request's body, read before the request waits for one of
    ``REQUESTS_IN_FLIGHT`` turns (the write key may be in the body: a client sending its body
    slowly holds its own connection, not a turn) and inflated only in its turn (a small gzip
    body waiting would hold sixty times its size). The turns bound the memory of parsing
    and routing under a flood; a request that waits ``ADMISSION_WAIT`` in vain is told to
    come back."""
    @functools.wraps(handle)
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        slots = request.app[ADMISSION]
        try:
            await asyncio.wait_for(slots.acquire(), ADMISSION_WAIT)
        except TimeoutError:
            raise Problem(503, "overloaded", "the router is busy; retry later",
                          headers={hdrs.RETRY_AFTER: str(OVERLOADED_RETRY_AFTER)}) from None
        try:
            limit = request.app[LIMITS].max_request_bytes
            return await handle(request, inflate(request, body, limit=limit))
        finally:
            slots.release()

    return handler


def _call_handler(call_type: str) -> BodyHandler:
    async def handle_call(request: web.Request, body: bytes) -> web.Response:
        """One event; its ``type`` is the path's, whatever the body says."""
        source, document = _authenticated(request, parse_json(body))
        event = document
        event.pop("writeKey", None)
        sent = dict(event)  # the 32 KB are the client's, not the "type" that the path gives
        event["type"] = call_type
        checked = check_event(event, sent=sent)
        if isinstance(checked, Rejection):
            _rejected(request, source, event, None, checked.reason)
            if checked.too_large:
                raise Problem(413, "event_too_large", checked.reason)
            raise Problem(400, "invalid_event", checked.reason)
        (result,) = await _route(request, [event], [checked], source)
        if result.invalid:
            reason = _invalid_reason(result)
            _rejected(request, source, event, None, reason)
            raise Problem(400, "invalid_event", reason)
        _count(request, source, result)
        return json_response({"success": True})

    handle_call.__name__ = handle_call.__qualname__ = f"handle_{call_type}"
    return handle_call


async def handle_batch(request: web.Request, body: bytes) -> web.Response:
    """Many events, each judged alone: 200 with the rejected ones listed when at least one
    was accepted, 400 with the list when none was."""
    parsed, refusals = parse_batch_json(body)
    source, document = _authenticated(request, parsed)
    batch = document.get("batch")
    if not isinstance(batch, list):
        raise Problem(400, "invalid_batch", 'expected {"batch": [...]}: a list of events')
    if not batch:
        raise Problem(400, "empty_batch", "the batch has no events")
    if len(batch) > MAX_BATCH_EVENTS:
        raise Problem(400, "batch_too_large", f"the batch has {len(batch)} events; "
                      f"the limit is {MAX_BATCH_EVENTS}")
    _check_shared_fields(document, len(batch), request.app[LIMITS].max_request_bytes)
    rejected: list[dict[str, Any]] = []
    too_large = 0
    valid: list[tuple[int, dict[str, Any], int]] = []
    for index, (sent, event) in enumerate(zip(batch, with_batch_defaults(document))):
        refused = refused_in(sent) if refusals else None
        if refused is not None:  # a NaN, a key twice: this event's, not the batch's
            rejected.append({"index": index, "reason": refused.message})
            _rejected(request, source, sent, index, refused.message)
            continue
        if isinstance(event, dict):
            event.pop("writeKey", None)  # analytics.js repeats the key in every event
        checked = check_event(event, sent=sent)
        if isinstance(checked, Rejection):
            rejected.append({"index": index, "reason": checked.reason})
            too_large += checked.too_large
            _rejected(request, source, event, index, checked.reason)
        else:
            valid.append((index, event, checked))
    if valid:
        results = await _route(request, [event for _, event, _ in valid],
                               [size for _, _, size in valid], source)
        for (index, event, _), result in zip(valid, results):
            if result.invalid:
                rejected.append({"index": index, "reason": _invalid_reason(result)})
                _rejected(request, source, event, index, rejected[-1]["reason"])
            else:
                _count(request, source, result)
    rejected.sort(key=lambda item: item["index"])
    if too_large == len(batch):  # as a single call over the limit is answered
        raise Problem(413, "event_too_large", "every event in the batch is over the 32 KB "
                      "limit", extra={"rejected": rejected})
    if len(rejected) == len(batch):
        raise Problem(400, "no_valid_event", "no event in the batch is valid",
                      extra={"rejected": rejected})
    return json_response({"success": True, "rejected": rejected} if rejected
                         else {"success": True})


def _check_shared_fields(document: dict[str, Any], events: int, max_request_bytes: int
                        ) -> None:
    """Refuse a batch whose own ``context`` and ``integrations``, merged into each of its
    events, would be stored that many times over: a 200 KB batch of 2,500 tiny events and a
    31 KB context made 78 MB of spool and 300 MB of memory. Allowed up to
    ``SHARED_FIELDS_COPIES`` times the request limit in all (4 MB by default: a 1 KB
    context on 2,500 events is 2.5 MB)."""
    shared = {key: document[key] for key in ("context", "integrations") if key in document}
    if not shared:
        return
    try:
        size = len(orjson.dumps(shared))
    except TypeError:  # a lone surrogate, a huge integer: the events holding it say so
        size = len(json.dumps(shared))
    limit = SHARED_FIELDS_COPIES * max_request_bytes
    if size * events > limit:
        raise Problem(400, "batch_fields_too_large", (
            f"the batch's context and integrations ({size} bytes) would be stored again with "
            f"each of its {events} events, {size * events // 1024} KB in all, over the "
            f"{limit // 1024} KB limit: send fewer events in a batch, or put large context in "
            "the events that need it"))


async def _body(request: web.Request) -> bytes:
    """The request's body, read once a key in the header, if there is one, has been checked:
    a wrong key costs nothing. Without a header the key can only come from the body."""
    source = _source_from_header(request)
    if source is not None:
        request[SOURCE] = source  # the access log names it even if the body is refused
    return await read_body(request, limit=request.app[LIMITS].max_request_bytes)


def _authenticated(request: web.Request, document: Any) -> tuple[str, dict[str, Any]]:
    """The source the request speaks for, and its body, a JSON ``document`` that must be an
    object."""
    if not isinstance(document, dict):
        raise Problem(400, "invalid_body", "the body must be a JSON object")
    source = request.get(SOURCE)
    if source is None:
        source = request.app[WRITE_KEYS].source_for(key_from_body(document))
        request[SOURCE] = source
    return source, document


def _source_from_header(request: web.Request) -> str | None:
    """The source named by the ``Authorization`` header, None without one; 401 when no
    source is configured at all or the header is wrong."""
    keys = request.app[WRITE_KEYS]
    if keys.empty:
        raise unauthorized()
    if len(request.headers.getall(hdrs.AUTHORIZATION, ())) > 1:
        raise unauthorized()  # which one counts? a proxy in front may read the other one
    header_key = key_from_header(request.headers.get(hdrs.AUTHORIZATION))
    return keys.source_for(header_key) if header_key is not None else None


async def _route(request: web.Request, events: list[dict[str, Any]], sizes: list[int],
                 source: str) -> list[RouteResult]:
    """``route_many``: returns once every accepted event is durable in the storage."""
    started = time.perf_counter()
    said = request.app[INTAKE_LOG]
    try:
        results = await request.app[ROUTER].route_many(events, source=source, sizes=sizes)
    except StorageFull as exc:
        said.unavailable(str(exc))
        raise Problem(503, "storage_full", "the router's storage is full; retry later",
                      headers={hdrs.RETRY_AFTER: str(STORAGE_RETRY_AFTER)}) from None
    except StorageUnavailable as exc:
        said.unavailable(str(exc))
        raise Problem(503, "storage_unavailable", "the router's storage cannot be reached or "
                      "written; retry later", headers={hdrs.RETRY_AFTER: str(STORAGE_RETRY_AFTER)}
                      ) from None
    said.ok()
    request.app[METRICS].commit_seconds.observe(time.perf_counter() - started)
    return results


def _count(request: web.Request, source: str, result: RouteResult) -> None:
    """An event taken in: accepted or a duplicate, and what routing decided for it. A
    destination that finds an accepted event invalid (GA4 and an event older than 72 h) also
    gets a warning line, at most a few a second per destination: the client was answered
    200 and will not say why the event never arrived there."""
    event, metrics = result.event, request.app[METRICS]
    assert event is not None
    outcome = "duplicate" if result.duplicate else "accepted"
    metrics.events.inc(source, event.type, outcome)
    if result.duplicate:
        return
    for item in result.results:
        if item.destination is None:
            continue
        metrics.decisions.inc(item.destination, str(item.status))
        if item.status is Status.INVALID:
            request.app[INVALID_FOR_DESTINATION].write({
                "action": "event_invalid_for_destination", "destination": item.destination,
                "source": source, "type": event.type,
                "messageId": event.messageId,
                "reason": item.reason[:REASON_SHOWN]})


def _rejected(request: web.Request, source: str, event: Any, index: int | None,
              reason: str) -> None:
    """An event refused at intake: counted in ``/metrics``, and one warning line (at most a
    few a second per source) that names the event, never its content."""
    request.app[METRICS].events.inc(source, _type_label(event), "rejected")
    message_id = event.get("messageId") if isinstance(event, dict) else None
    request.app[REJECTIONS].write({
        "action": "event_rejected", "source": source, "path": request.path, "index": index,
        "type": _type_label(event),
        "messageId": message_id if isinstance(message_id, str) else None,
        "reason": reason})


async def _flushing_rejections(app: web.Application) -> AsyncIterator[None]:
    """Writes, once a flood of rejections stops, how many lines it held back."""
    logs = (app[REJECTIONS], app[INVALID_FOR_DESTINATION])

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(WINDOW)
            for failure_log in logs:
                failure_log.flush()

    task = asyncio.create_task(flush_forever(), name="flush-rejections")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for failure_log in logs:
        failure_log.flush(all_windows=True)


def _invalid_reason(result: RouteResult) -> str:
    return next((r.reason for r in result.results if r.reason), "invalid event")


def _type_label(event: Any) -> str:
    """The call type for a metrics label; anything else is ``unknown`` (bounded labels)."""
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) and kind in CALL_TYPES else "unknown"


async def _expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` (curl sends it for bodies over 1 MB): refuse what the headers
    already condemn (size, encoding, write key) before the client sends the body, else
    invite it."""
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return _refuse(request, Problem(417, "expectation_failed",
                                        "the only Expect this API knows is 100-continue"))
    try:
        check_headers(request, request.app[LIMITS].max_request_bytes)
        _source_from_header(request)
    except Problem as problem:
        return _refuse(request, problem)
    await _default_expect_handler(request)  # writes "100 Continue"
    return None


# -- operators --------------------------------------------------------------------------------

def _probe(handle: Handler, *, logged: bool) -> Handler:
    """An operators' endpoint, marked for the access log to skip its 200s unless
    ``server.log_probes`` (see ``accesslog.PROBE``)."""
    if logged:
        return handle

    async def handle_quietly(request: web.Request) -> web.StreamResponse:
        request[PROBE] = True
        return await handle(request)
    return handle_quietly


async def handle_health(request: web.Request) -> web.Response:
    """200 when the storage answers and has room (the router can accept work), else 503
    with the reason: a full disk refuses every event, so a load balancer should know."""
    said = request.app[HEALTH_LOG]
    reason = "the storage does not answer"
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            healthy = await request.app[ROUTER].storage.ping()
    except (StorageFull, StorageUnavailable) as exc:
        healthy, reason = False, str(exc)
        said.unavailable(reason)
    except TimeoutError:  # a hung storage: one line, not a traceback every probe
        healthy, reason = False, f"the storage did not answer within {HEALTH_TIMEOUT:g} s"
        said.unavailable(reason)
    except Exception:  # noqa: BLE001 - any failure is "not ready", never a 500
        said.unavailable(reason, exc_info=True)
        healthy = False
    if healthy:
        said.ok()
        return json_response({"status": "ok"})
    return json_response({"status": "unavailable", "reason": reason}, status=503)


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text: delivery metrics, intake counters, and queue gauges read now."""
    router, metrics = request.app[ROUTER], request.app[METRICS]
    try:
        await metrics.read_stats(router.storage)
        request.app[METRICS_LOG].ok()
    except (StorageFull, StorageUnavailable) as exc:  # said once a minute, as by /health
        request.app[METRICS_LOG].unavailable(str(exc))
    except Exception:  # noqa: BLE001 - show the counters even when the storage is down
        request.app[METRICS_LOG].unavailable("an unexpected error", exc_info=True)
    text = router.delivery_metrics.registry.render() + metrics.registry.render()
    return web.Response(body=text.encode(),
                        headers={hdrs.CONTENT_TYPE: "text/plain; version=0.0.4; charset=utf-8"})


# -- every response ---------------------------------------------------------------------------

async def handle_preflight(request: web.Request) -> web.Response:
    """CORS preflight: browsers may POST from any origin, with whatever headers the page's
    library asks for. analytics.js adds ``X-Retry-Count`` to each retry, and lets a site add
    headers of its own: a fixed list refused every retry from a browser. Allowing them opens
    nothing: the answer names no credentials mode, so a browser sends no cookies, and every
    request still needs its write key."""
    headers = CORS_PREFLIGHT_HEADERS
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    if asked and len(asked) <= MAX_ASKED_HEADERS_CHARS and _HEADER_NAMES.fullmatch(asked):
        headers = {**headers, "Access-Control-Allow-Headers": asked}
    return web.Response(status=204, headers=headers)


@web.middleware
async def _answer_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal becomes a JSON answer; anything unexpected a 500 that says nothing."""
    try:
        return await handler(request)
    except Problem as problem:
        return _refuse(request, problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers: dict[str, str] | None = (
            {hdrs.ALLOW: exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None)
        return _refuse(request, Problem(exc.status, _slug(exc.reason), exc.reason,
                                        headers=headers))
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path[:200])
        return _refuse(request, Problem(500, "internal_error", "internal error; see the "
                                        "router's log"))


def _refuse(request: web.Request, problem: Problem) -> web.Response:
    request[REFUSAL] = problem.code
    request.app[METRICS].refusals.inc(problem.code)
    return problem.response()


async def _finish_response(request: web.Request, response: web.StreamResponse) -> None:
    """CORS on every ingest answer (errors included, so a browser can read them), the
    request counted by endpoint and status, and behind a trusted proxy the client's address
    for the access log."""
    endpoint = ENDPOINTS.get(request.path, "other")
    trusted = request.app[TRUSTED_PROXIES]
    if trusted:
        # Every line of the header, in order: HAProxy adds a line of its own after the
        # client's rather than appending to it.
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        client = client_address(request.remote, forwarded, trusted)
        if client is not None:
            request[CLIENT] = client
    if request.path.startswith("/v1/"):
        response.headers.setdefault("Access-Control-Allow-Origin", "*")
        response.headers.setdefault("Access-Control-Expose-Headers", "Retry-After")
    request.app[METRICS].requests.inc(endpoint, str(response.status))


def _slug(reason: str) -> str:
    return "_".join(reason.lower().split()) or "error"
