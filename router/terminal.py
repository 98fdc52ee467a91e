"""What the command line prints: text from events and APIs made safe for an operator's
terminal, and JSON lines in UTF-8 whatever the terminal's encoding.

A ``messageId`` or an event name comes from whoever holds a write key, often public in a
web page, and an API's answer from whoever runs it. Printed as they came, their escape
sequences could clear the screen, retitle the window or hide text, and a newline could
forge a line of ``router dlq list`` (CLI audit). JSON output escapes them already.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

import orjson

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 controls (newlines, tabs and ESC among them), DEL, and the marks and overrides
that reorder text on screen (U+200E/F, U+202A-E, U+2066-9)."""


def printable(text: str) -> str:
    """``text`` with every control character written as its escape (``\\x1b``,
    ``\\u202e``), so that it prints as the one line it is said to be."""
    if text.isprintable():  # the common case: nothing to replace
        return text
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def write_json_line(data: Any, out: TextIO | None = None) -> None:
    """``data`` as one line of JSON on ``out`` (stdout), in UTF-8 whatever the locale: JSON
    is UTF-8, and written through a Latin-1 terminal's encoding, an "é" became a byte no JSON
    reader takes (deployment audit). A stream with no bytes beneath it gets the text."""
    out = sys.stdout if out is None else out
    line = orjson.dumps(data) + b"\n"
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        out.write(line.decode())
        return
    out.flush()  # what was written as text goes first
    buffer.write(line)
