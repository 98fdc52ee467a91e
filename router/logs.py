"""How the router's log lines look and which are written, from the environment.

``ROUTER_LOG_LEVEL``
    ``DEBUG``, ``INFO``, ``WARNING`` (the default) or ``ERROR``: the least severe line that
    is written to stderr.
``ROUTER_LOG_FORMAT``
    ``text`` (the default): ``LEVEL logger: message``. ``json``: one JSON object a line,
    with ``time``, ``level`` and ``logger``; a message that is itself a JSON object (the
    failure lines of delivery and intake) has its fields merged in, any other is
    ``message``, and a traceback is ``traceback``. ``router serve``'s own lines on stdout
    (where it listens, that it stops) then are JSON objects too, like the access log.

Read from the environment rather than the config so that the delivery process, which
inherits it, logs the same way, and so that a broken config is reported in the chosen form.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from router.events import format_time

LEVEL_VARIABLE = "ROUTER_LOG_LEVEL"
FORMAT_VARIABLE = "ROUTER_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

_json_lines = False
"""Whether ``configure`` chose JSON: ``announce`` follows it."""


def configure(environ: Mapping[str, str] = os.environ) -> None:
    """Set the root logger's level and format from ``environ``; ``ValueError`` saying which
    variable holds what, when one holds neither of its choices. Like ``logging.basicConfig``,
    it leaves a root logger that has handlers already (a test runner's) as it is."""
    global _json_lines
    level = _choice(environ, LEVEL_VARIABLE, LEVELS, "WARNING", str.upper)
    form = _choice(environ, FORMAT_VARIABLE, FORMATS, "text", str.lower)
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    _json_lines = form == "json"


def announce(text: str) -> None:
    """A line on stdout for the person or the log pipeline watching ``router serve``."""
    if _json_lines:
        text = orjson.dumps({"time": format_time(datetime.now(UTC)), "level": "INFO",
                             "logger": "router", "message": text}).decode()
    try:
        print(text, flush=True)
    except OSError:  # stdout's reader is gone: nothing to say it to, and nothing to stop for
        pass


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {"time": format_time(datetime.fromtimestamp(record.created, UTC)),
                                "level": record.levelname, "logger": record.name}
        fields = _json_object(message)
        if fields is None:
            line["message"] = message
        else:
            line.update((key, value) for key, value in fields.items() if key not in line)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json_line(line)


def json_line(value: Any) -> str:
    """``value`` as one line of JSON, whatever strings it holds: a lone surrogate (from a
    client's JSON escape, or OS data decoded with ``surrogateescape``) is escaped
    (``\\ud800``) rather than failing the line, and with it whatever was logging it."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return orjson.dumps(_encodable(value), default=str).decode()


def _encodable(value: Any) -> Any:
    """``value`` with every string's lone surrogates escaped (``\\udcff``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(key): _encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str,
            normal: Callable[[str], str]) -> str:
    value = environ.get(name, "").strip()
    if not value:
        return default
    if normal(value) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (case does not "
                         f"matter), not {value[:40]!r}")
    return normal(value)
