"""``python -m bench.sink --port P``: the fake destination of the delivery and ingest
benchmarks, run as a process of its own.

It answers ``200 {}`` to every request on 127.0.0.1 and counts what it receives, by path: a
JSON body with an ``events`` or ``batch`` list counts as that many events, anything else as
one. For each event it also keeps the time it arrived, by messageId (``messageId``, else
``id``), so a benchmark can work out latency from ``route()`` to delivery; that costs one
``orjson.loads`` of the body, which the counting needs anyway.

With ``--count-only`` it parses nothing: a request counts as many events as its body has
``"messageId":"...`` values (at least one), found by a regular expression, which also gives
the arrival times. The benchmarks run their sinks that way, so that on a 2-core machine the
fake destinations take less of the CPU the router is measured on; a real downstream runs
elsewhere.

``GET /_stats`` answers ``{"events": {path: n}, "requests": {path: n}, "cpu_seconds": ...}``;
``GET /_times?path=/p`` the arrival times (epoch seconds) of that path's events by messageId.
It exits by itself after ``--max-lifetime`` seconds, whatever happens to its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Iterable

import orjson
from aiohttp import web

LOOPBACK = "127.0.0.1"
MAX_TIMES = 3_000_000
"""Arrival times kept at most, all paths together (then only counts go on)."""
OK_BODY = b"{}"
MESSAGE_ID = re.compile(rb'"messageId":"([^"\\]*)"')


class Sink:
    def __init__(self, *, count_only: bool = False) -> None:
        self.count_only = count_only
        self.events: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.times: dict[str, dict[str, float]] = {}
        self.kept = 0
        self.started = time.time()

    async def handle(self, request: web.BaseRequest) -> web.Response:
        path = request.path
        if request.method == "GET" and path == "/_stats":
            return self.json({"events": self.events, "requests": self.requests,
                              "cpu_seconds": time.process_time(),
                              "uptime": time.time() - self.started})
        if request.method == "GET" and path == "/_times":
            return self.json(self.times.get(request.query.get("path", ""), {}))
        body = await request.content.read()  # no size cap, unlike request.read()
        now = time.time()
        self.requests[path] = self.requests.get(path, 0) + 1
        if self.count_only:
            found = MESSAGE_ID.findall(body)
            self.events[path] = self.events.get(path, 0) + max(1, len(found))
            self._keep_times(path, (message_id.decode() for message_id in found), now,
                             len(found))
            return web.Response(body=OK_BODY, content_type="application/json")
        items: list | None = None
        document = None
        if body[:1] in (b"{", b"["):
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                document = None
        if isinstance(document, dict):
            for key in ("events", "batch"):
                value = document.get(key)
                if isinstance(value, list):
                    items = value
                    break
            else:
                items = [document]
        self.events[path] = self.events.get(path, 0) + (len(items) if items is not None else 1)
        if items:
            self._keep_times(path, (item.get("messageId") or item.get("id")
                                    for item in items if isinstance(item, dict)), now, len(items))
        return web.Response(body=OK_BODY, content_type="application/json")

    def _keep_times(self, path: str, message_ids: Iterable[object], now: float, count: int
                    ) -> None:
        if not count or self.kept >= MAX_TIMES:
            return
        times = self.times.setdefault(path, {})
        for message_id in message_ids:
            if isinstance(message_id, str):
                times[message_id] = now
        self.kept += count

    @staticmethod
    def json(data: object) -> web.Response:
        return web.Response(body=orjson.dumps(data), content_type="application/json")


async def serve(port: int, max_lifetime: float, count_only: bool = False) -> None:
    sink = Sink(count_only=count_only)
    server = web.Server(sink.handle, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, LOOPBACK, port, backlog=1024)
    print(f"sink: listening on http://{LOOPBACK}:{port}/ (pid {os.getpid()}, exits after "
          f"{max_lifetime:g} s)", file=sys.stderr, flush=True)
    try:
        await asyncio.sleep(max_lifetime)
    finally:
        listener.close()
        await server.shutdown(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-lifetime", type=float, default=600.0,
                        help="seconds after which the sink exits by itself (default 600)")
    parser.add_argument("--count-only", action="store_true",
                        help="count events by their messageId keys; parse nothing, keep no times")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.max_lifetime, args.count_only))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
