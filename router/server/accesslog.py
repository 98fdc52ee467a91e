"""One JSON line per request, for operators and log pipelines.

Only what is safe to keep: method, path (without the query string, where a careless client
might put a key), status, response size, duration, the remote address, the source the write
key belongs to, and for a refusal its reason code. Never the ``Authorization`` header, never
the body: both can carry secrets and personal data.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

ACCESS_LOGGER = logging.getLogger("router.access")

SOURCE = web.RequestKey("source", str)
"""Set by the ingest handler once the write key is known: the source's configured name."""
REFUSAL = web.RequestKey("refusal", str)
"""Set when the request is refused as a whole: the ``Problem`` code (e.g. ``unauthorized``)."""

MAX_LOGGED_PATH = 200


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        line = {
            "method": request.method,
            "path": _printable(request.path[:MAX_LOGGED_PATH]),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
            "remote": request.remote,
            "source": request.get(SOURCE),
        }
        refusal = request.get(REFUSAL)
        if refusal is not None:
            line["refusal"] = refusal
        self.logger.info("%s", orjson.dumps(line).decode())

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _printable(text: str) -> str:
    """``text`` with lone surrogates (a percent-encoded path can decode to them) escaped, so
    the line can always be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
