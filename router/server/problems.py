"""The one shape every refusal of the HTTP API takes.

Handlers and helpers raise ``Problem`` wherever they notice something wrong; ``app.py`` turns
it into a JSON answer. Keeping the status, a stable machine-readable ``code`` and the
human-readable message together means the answer, the metrics label and the tests all agree
on what went wrong. Messages never echo input values (a body may carry a secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


class Problem(Exception):
    """A request we refuse: ``status`` and ``message`` go to the client, ``code`` to the
    client (as ``code``, which Segment's client libraries read) and to the metrics."""

    def __init__(self, status: int, code: str, message: str, *,
                 headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> web.Response:
        return json_response({**problem_body(self.code, self.message), **self.extra},
                             status=self.status, headers=self.headers)


def problem_body(code: str, message: str) -> dict[str, Any]:
    """``{"success": false, "error": ..., "code": ..., "message": ...}``: every refusal's.

    ``error`` is our documented field; ``code`` and ``message`` are what
    segment-analytics-python and analytics-node parse out of an error answer, so their logs
    say why instead of "unknown error"."""
    return {"success": False, "error": message, "code": code, "message": message}


def json_response(body: Any, *, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer serialized with orjson (the stdlib encoder is slower and pickier)."""
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def unauthorized() -> Problem:
    """The single 401: identical whether the key is absent, malformed or unknown, so the
    answer tells an attacker nothing about which keys exist. (A fresh instance each time: a
    shared exception object would keep the last request's frames alive in its traceback.)"""
    return Problem(401, "unauthorized", "missing or invalid write key")
