"""The log line of each failed delivery, written at most a few times a second per kind.

A destination that refuses everything (a revoked API key, say) fails every event routed to
it, and a line for each would be a flood of near-identical lines at intake rate, on the disk
or the bill of the log pipeline. So, as Vector does for its internal logs, the lines of one
destination, action and status are written at most ``LINES_PER_WINDOW`` times in ``WINDOW``
seconds. The others are counted, and the next line written says how many were held back
(``similar_lines_held_back``). When a flood stops, no next line comes, so ``flush`` writes
the last line held back with that count once its window has ended: the log never hides how
many failures there were. The counters in ``/metrics`` still count every failure, and every
dead letter keeps its own request, response and reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.logs import json_line

WINDOW = 10.0
LINES_PER_WINDOW = 10
MAX_LINE_BYTES = 3584
"""A line is cut to this size (its ``reason`` shortened) so that, with the fields the JSON log
format adds, it stays under the 4 KB that a pipe writes whole: the delivery process and the
router write to one stderr, and a 20 KB line of one (a client's 20 KB messageId) was cut in
two by a line of the other, and was no JSON for the log pipeline (observability audit)."""
MESSAGE_ID_SHOWN = 200
"""A client's messageId is logged up to this many characters (they are usually 36)."""


@dataclass(slots=True)
class _Window:
    started_at: float
    written: int = 0
    held_back: int = 0
    last_held_back: dict[str, Any] | None = None


class FailureLog:
    """``kind`` names the fields of a line that make its kind, each kind with its own share
    of lines: a failed delivery's destination, action and status by default; the HTTP API
    groups rejected events by source."""

    def __init__(self, logger: logging.Logger, *, window: float = WINDOW,
                 lines_per_window: int = LINES_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 kind: tuple[str, ...] = ("destination", "action", "status")) -> None:
        self.logger = logger
        self.window = window
        self.lines_per_window = lines_per_window
        self.clock = clock
        self.kind = kind
        self._windows: dict[tuple[Any, ...], _Window] = {}

    def write(self, line: dict[str, Any]) -> bool:
        """Log ``line`` (a JSON object with the ``kind`` fields) as a warning, unless its kind
        has had its share of this window; returns whether it was written."""
        key = tuple(line[field] for field in self.kind)
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.started_at >= self.window:
            held_back = window.held_back if window else 0
            window = self._windows[key] = _Window(now, held_back=held_back)
        if window.written >= self.lines_per_window:
            window.held_back += 1
            window.last_held_back = line
            return False
        window.written += 1
        self._write(line, window)
        return True

    def flush(self, *, all_windows: bool = False) -> None:
        """Write what windows that have ended (or, with ``all_windows``, every window: at
        shutdown) held back and no later line has reported: their last line held back,
        with the count. Cheap enough to call on every round of a worker."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            if not all_windows and now - window.started_at < self.window:
                continue
            if window.held_back and window.last_held_back is not None:
                window.held_back -= 1  # the line written is one of them
                self._write(window.last_held_back, window)
            del self._windows[key]

    def _write(self, line: dict[str, Any], window: _Window) -> None:
        if window.held_back:
            line = {**line, "similar_lines_held_back": window.held_back}
            window.held_back = 0
            window.last_held_back = None
        self.logger.warning(_within_one_write(line))


def _within_one_write(line: dict[str, Any]) -> str:
    """``line`` as JSON of at most ``MAX_LINE_BYTES``: message ids cut to
    ``MESSAGE_ID_SHOWN``, then the reason halved until it fits (the dead letter keeps it)."""
    for key in ("messageId", "message_id"):
        value = line.get(key)
        if isinstance(value, str) and len(value) > MESSAGE_ID_SHOWN:
            line = {**line, key: value[:MESSAGE_ID_SHOWN]}
    text = json_line(line)
    while len(text.encode()) > MAX_LINE_BYTES and isinstance(line.get("reason"), str) \
            and len(line["reason"]) > 1:
        line = {**line, "reason": line["reason"][:len(line["reason"]) // 2] + "…"}
        text = json_line(line)
    return text
