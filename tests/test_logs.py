"""ROUTER_LOG_LEVEL and ROUTER_LOG_FORMAT: which lines are written, and in what form."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import pytest

from router import logs
from router.cli import main


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
    assert isinstance(handler.formatter, logs.JsonFormatter)
    logs.configure({})  # configured already: left as it is
    assert root.handlers == [handler] and root.level == logging.INFO


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


def test_lines_nothing_reads_are_dropped_counted_and_said_never_waited_for(monkeypatch):
    # A stream nobody reads (a paused terminal, a stalled log shipper) blocked each write,
    # and with it the event loop of router serve (stall audit).
    monkeypatch.setattr(logs, "LOG_QUEUE_LINES", 5)
    unread, written = os.pipe()
    stream = os.fdopen(written, "w")
    logger = logging.getLogger("test.unread")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler(stream))
    try:
        with logs.written_by_threads(logger):
            for n in range(100):  # 1 MB into a pipe of 64 KB: each call returns at once
                logger.warning("%d %s", n, "x" * 10_000)
            dropped = unsent = logs.dropped_lines()
            assert dropped >= 100 - 5 - 8  # what waits, and what fits in the pipe
            read: list[bytes] = []
            reader = threading.Thread(target=lambda: read.append(_read_to_the_end(unread)))
            reader.start()
            for _ in range(300):  # once the reader has made room, a line gets through
                logger.warning("moving again")
                if logs.dropped_lines() == dropped:
                    break
                dropped = logs.dropped_lines()
                time.sleep(0.1)
        stream.close()
        reader.join(timeout=30)
    finally:
        logger.handlers.clear()
        os.close(unread)
    lines = read[0].decode().splitlines()
    # said once a line gets through again
    assert lines[-2:] == ["moving again",
                          f"{dropped} log line(s) dropped: nothing read this log for a while"]
    assert len([line for line in lines if line.endswith("x" * 10_000)]) == 100 - unsent


def _read_to_the_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
