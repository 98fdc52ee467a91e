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

import copy
import errno
import logging
import os
import queue
import sys
import threading
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
LINES_WAITING_AT_MOST = 10_000
"""Log lines a writer thread holds while its stream cannot keep up (a few MB at most);
beyond them, lines are dropped and counted."""
CLOSE_WAIT = 5.0
"""Seconds the writers are given, at exit, to write the lines they still hold."""


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
    root.addHandler(BackgroundHandler(handler))
    root.setLevel(level)
    _json_lines = form == "json"


class BackgroundHandler(logging.Handler):
    """Hands each line to a thread of its own, which writes it with ``target``.

    Written on the event loop, a line waits for its stream: when the reader of stdout or
    stderr stalls (a log shipper stuck, a pipe nobody reads), the pipe fills and the whole
    router stopped with it, intake and ``/health`` included, until the reader came back
    (deployment audit). Here the loop only queues the line. Beyond
    ``LINES_WAITING_AT_MOST`` waiting lines are dropped, and a line says how many once the
    stream takes lines again."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(target.level)
        self.target = target
        self.lines: queue.Queue[logging.LogRecord | None] = queue.Queue(LINES_WAITING_AT_MOST)
        self.dropped = 0
        self.writer = threading.Thread(target=self._write, name="router-log-writer",
                                       daemon=True)
        self.writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None  # its arguments may change later
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while (record := self.lines.get()) is not None:
            if record.levelno >= self.target.level:  # as a logger checks its handlers'
                self.target.handle(record)
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                self.target.handle(logging.makeLogRecord({
                    "name": "router", "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{dropped} log line(s) were dropped: they came faster than they "
                           "could be written (is the reader of the log stalled?)"}))

    def close(self) -> None:
        """Write what is still waiting, for up to ``CLOSE_WAIT`` seconds: a stream that
        does not take it holds the exit no longer."""
        try:
            self.lines.put(None, timeout=CLOSE_WAIT)
        except queue.Full:
            pass
        self.writer.join(CLOSE_WAIT)
        super().close()


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines to stdout. Once stdout cannot be written (its reader is gone, as when a
    log shipper dies), it says so once on stderr and stops trying. Python's logging wrote a
    traceback to stderr for every request instead."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError) or error.errno not in (errno.EPIPE, errno.EBADF):
            super().handleError(record)  # this line's trouble (an encoding), not stdout's
            return
        self.setLevel(logging.CRITICAL + 1)
        logging.getLogger("router").warning(
            "stdout can no longer be written to (%s: %s); requests are no longer logged",
            type(error).__name__, error)


_stdout: BackgroundHandler | None = None


def to_stdout(logger: logging.Logger) -> None:
    """Make ``logger`` write its lines, whatever their level, on stdout alone, through the
    one writer of stdout (the access log and ``announce`` share it, so their lines never
    interleave)."""
    global _stdout
    if _stdout is None:
        _stdout = BackgroundHandler(StdoutHandler())
    if _stdout not in logger.handlers:
        logger.addHandler(_stdout)
    logger.setLevel(logging.INFO)
    logger.propagate = False


ANNOUNCER = logging.getLogger("router.announce")


def announce(text: str) -> None:
    """A line on stdout for the person or the log pipeline watching ``router serve``."""
    if _json_lines:
        text = orjson.dumps({"time": format_time(datetime.now(UTC)), "level": "INFO",
                             "logger": "router", "message": text}).decode()
    if not ANNOUNCER.handlers:
        to_stdout(ANNOUNCER)
    ANNOUNCER.info("%s", text)


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
