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

import contextlib
import errno
import logging
import os
import queue
import sys
import threading
from datetime import UTC, datetime
from collections.abc import Callable, Mapping
from typing import Any, TextIO

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
    handler = BackgroundHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    _json_lines = form == "json"


class BackgroundHandler(logging.Handler):
    """Writes each line to ``stream``'s file descriptor from a thread of its own.

    Written on the event loop, a line waits for its stream: when the reader of stdout or
    stderr stalls (a log shipper stuck, a pipe nobody reads), the pipe fills and the whole
    router stopped with it, intake and ``/health`` included, until the reader came back
    (deployment audit). Here the loop only formats and queues the line. Beyond
    ``LINES_WAITING_AT_MOST`` waiting lines are dropped, and a line says how many once the
    stream takes lines again.

    The thread writes with ``os.write``, holding no lock of logging's or of ``sys.stdout``'s:
    blocked in a write, it held the lock that ``logging.shutdown`` (and the interpreter's
    last flush of stdout) then waited for, and a stop never ended (review). ``gone`` is what
    to say on stderr, once, when the stream's reader is gone (EPIPE): the writer stops
    there."""

    def __init__(self, stream: TextIO | None, *, gone: str | None = None) -> None:
        super().__init__()
        self.fd: int | None = None
        self.encoding = "utf-8"
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if stream is not None:  # None: started with the descriptor closed
                self.fd, self.encoding = stream.fileno(), stream.encoding or "utf-8"
        self.gone = gone
        self.lines: queue.Queue[str | None] = queue.Queue(LINES_WAITING_AT_MOST)
        self.dropped = 0
        self.writer = threading.Thread(target=self._write, name="router-log-writer",
                                       daemon=True)
        self.writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - as logging does: this line's trouble only
            self.handleError(record)
            return
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while (line := self.lines.get()) is not None:
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                line += self.format(logging.makeLogRecord({
                    "name": "router", "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{dropped} log line(s) were dropped: they came faster than they "
                           "could be written (is the reader of the log stalled?)"})) + "\n"
            try:
                self._write_all(line.encode(self.encoding, "backslashreplace"))
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    continue  # this line is lost; the next may go
                if self.gone:
                    logging.getLogger("router").warning("%s (%s: %s)", self.gone,
                                                        type(exc).__name__, exc)
                return  # its reader is gone: nothing more can be said there

    def _write_all(self, data: bytes) -> None:
        if self.fd is None:
            return
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        """Write what is still waiting, for up to ``CLOSE_WAIT`` seconds: a stream that
        does not take it holds the exit no longer."""
        with contextlib.suppress(queue.Full):
            self.lines.put(None, timeout=CLOSE_WAIT)
        self.writer.join(CLOSE_WAIT)
        super().close()


_stdout: BackgroundHandler | None = None


def to_stdout(logger: logging.Logger) -> None:
    """Make ``logger`` write its lines, whatever their level, on stdout alone, through the
    one writer of stdout (the access log and ``announce`` share it, so their lines never
    interleave)."""
    global _stdout
    if _stdout is None:
        _stdout = BackgroundHandler(sys.stdout, gone="stdout can no longer be written to; "
                                                     "requests are no longer logged")
        _stdout.setFormatter(logging.Formatter("%(message)s"))
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
