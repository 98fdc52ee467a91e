"""ROUTER_LOG_LEVEL and ROUTER_LOG_FORMAT: which lines are written, and in what form."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from router import logs
from router.cli import main

ROOT = Path(__file__).resolve().parents[1]


def record(message: str, level: int = logging.WARNING, exc_info: object = None
           ) -> logging.LogRecord:
    return logging.LogRecord("router.delivery", level, __file__, 1, message, None,
                             exc_info)  # type: ignore[arg-type]


def test_a_json_line_merges_a_message_that_is_a_json_object() -> None:
    failure = '{"destination":"hook","action":"retry","status":503,"level":"spoofed"}'
    line = json.loads(logs.JsonFormatter().format(record(failure)))
    assert line["level"] == "WARNING" and line["logger"] == "router.delivery"
    assert (line["destination"], line["action"], line["status"]) == ("hook", "retry", 503)
    assert line["time"].endswith("Z") and "message" not in line


def test_a_json_line_keeps_a_plain_message_and_its_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = json.loads(logs.JsonFormatter().format(record("it broke", logging.ERROR,
                                                             sys.exc_info())))
    assert line["message"] == "it broke"
    assert "RuntimeError: boom" in line["traceback"]


@pytest.mark.parametrize("variable, value", [("ROUTER_LOG_LEVEL", "LOUD"),
                                             ("ROUTER_LOG_FORMAT", "xml")])
def test_a_wrong_value_is_refused_with_the_variable_named(monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    assert main(["plugins"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {variable} must be one of ")
    assert repr(value) in error


def test_the_level_and_format_apply_to_the_root_logger(monkeypatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logs, "_json_lines", False)
    logs.configure({"ROUTER_LOG_LEVEL": "info", "ROUTER_LOG_FORMAT": "JSON"})
    assert root.level == logging.INFO
    (handler,) = root.handlers
    assert isinstance(handler, logs.BackgroundHandler)  # written off the event loop
    assert isinstance(handler.formatter, logs.JsonFormatter)
    logs.configure({})  # configured already: left as it is
    assert root.handlers == [handler] and root.level == logging.INFO
    handler.close()


def test_lines_beyond_what_a_stalled_stream_holds_are_dropped_and_counted(monkeypatch):
    # The writer thread holds lines while its stream is stalled (a pipe nobody reads); the
    # event loop never waits, and a line says how many were dropped once it reads again.
    monkeypatch.setattr(logs, "LINES_WAITING_AT_MOST", 3)
    unread, written = os.pipe()
    stream = os.fdopen(written, "w")
    handler = logs.BackgroundHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    big = "x" * 70_000  # more than the pipe holds: the writer blocks on the first
    for n in range(10):
        handler.handle(record(f"line {n} {big}", logging.WARNING))
    read: list[bytes] = []
    with os.fdopen(unread, "rb") as reader:  # the reader comes back
        reading = threading.Thread(target=lambda: read.append(reader.read()))
        reading.start()
        handler.close()  # what waits is written now
        stream.close()
        reading.join(10)
    text = read[0].decode()
    kept = [line.split()[1] for line in text.splitlines() if line.startswith("line ")]
    (note,) = [line for line in text.splitlines() if not line.startswith("line ")]
    assert note.endswith("log line(s) were dropped: they came faster than they could be "
                         "written (is the reader of the log stalled?)")
    assert kept[:3] == ["0", "1", "2"] and len(kept) in (3, 4)  # the first may be written
    assert len(kept) + int(note.split()[0]) == 10                # as the others come


def test_the_exit_does_not_wait_for_a_stream_that_never_reads_again():
    # Blocked in a write, the writer held the lock logging.shutdown then waited for: a stop
    # printed "router: stopped" and never ended (review).
    script = (
        "import logging, sys\n"
        "from router import logs\n"
        "logs.LINES_WAITING_AT_MOST, logs.CLOSE_WAIT = 100, 0.5\n"
        "logging.getLogger().addHandler(logs.BackgroundHandler(sys.stdout))\n"
        "for n in range(50):\n"
        "    logging.getLogger().warning('x' * 10_000)\n"
        "print('done', file=sys.stderr)\n")
    unread, written = os.pipe()
    try:
        completed = subprocess.run([sys.executable, "-c", script], stdout=written,
                                   stderr=subprocess.PIPE, timeout=60,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(written)
        os.close(unread)
    assert completed.returncode == 0 and completed.stderr == b"done\n", completed.stderr


def test_a_message_with_a_lone_surrogate_is_still_one_json_line() -> None:
    # orjson refuses such a string: the line was lost, and a "--- Logging error ---"
    # traceback went to stderr instead.
    try:
        raise ValueError("ошибка \udcff")
    except ValueError:
        text = logs.JsonFormatter().format(record("file \udcff.db", logging.ERROR,
                                                  sys.exc_info()))
    line = json.loads(text)
    assert line["message"] == "file \\udcff.db"
    assert "ValueError: ошибка \\udcff" in line["traceback"]
