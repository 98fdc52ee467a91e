"""The log line of each failed delivery, written at most a few times a second per kind.

A destination that refuses everything (a revoked API key, say) fails every event routed to
it, and a line for each would be a flood of near-identical lines at intake rate, on the disk
or the bill of the log pipeline. So, as Vector does for its internal logs, the lines of one
destination, action and status are written at most ``LINES_PER_WINDOW`` times in ``WINDOW``
seconds. The others are counted, and the next line written says how many were held back
(``similar_lines_held_back``). The counters in ``/metrics`` still count every failure, and
every dead letter keeps its own request, response and reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

WINDOW = 10.0
LINES_PER_WINDOW = 10


@dataclass(slots=True)
class _Window:
    started_at: float
    written: int = 0
    held_back: int = 0


class FailureLog:
    def __init__(self, logger: logging.Logger, *, window: float = WINDOW,
                 lines_per_window: int = LINES_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window = window
        self.lines_per_window = lines_per_window
        self.clock = clock
        self._windows: dict[tuple[Any, ...], _Window] = {}

    def write(self, line: dict[str, Any]) -> bool:
        """Log ``line`` (a JSON object with ``destination``, ``action`` and ``status``) as a
        warning, unless its kind has had its share of this window; returns whether it was
        written."""
        key = (line["destination"], line["action"], line["status"])
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.started_at >= self.window:
            held_back = window.held_back if window else 0
            window = self._windows[key] = _Window(now, held_back=held_back)
        if window.written >= self.lines_per_window:
            window.held_back += 1
            return False
        window.written += 1
        if window.held_back:
            line = {**line, "similar_lines_held_back": window.held_back}
            window.held_back = 0
        self.logger.warning(orjson.dumps(line).decode())
        return True
