"""User templates, always in jinja2's immutable sandbox, compiled once at load.

Following the jinja2 sandbox docs and its advisories: a fixed synthetic template name (never a
user-chosen one: CVE-2024-56201), no custom filters that call what they are handed
(CVE-2024-56326), plain dicts as context (never live objects), and caps on output size and on
``*``/``**`` so a small template cannot render gigabytes.
"""

from __future__ import annotations

import operator
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from router.errors import ConfigError, EventRejected

MAX_OUTPUT_CHARS = 256 * 1024
MAX_REPEAT = 100_000
TEMPLATE_NAME = "template"


class _CappedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large in template")
            return operator.pow(left, right)
        for sized, count in ((left, right), (right, left)):
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int) \
                    and len(sized) * count > MAX_REPEAT:
                raise SecurityError("repetition too large in template")
        return operator.mul(left, right)


_environment = _CappedSandbox(undefined=StrictUndefined, autoescape=False)


class Template:
    """A compiled user template. ``render`` raises ``EventRejected`` on any failure, so a bad
    template costs the one event, for the one destination, never the process."""

    def __init__(self, source: str, *, where: str) -> None:
        self.where = where
        try:
            self._template = _environment.from_string(source)
            self._template.name = TEMPLATE_NAME
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            at = f" (template line {line})" if line else ""
            raise ConfigError(f"template does not compile{at}: {exc.message or exc}",
                              field=where) from None

    def render(self, **context: Any) -> str:
        try:
            parts: list[str] = []
            size = 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise EventRejected(f"{self.where}: template output over "
                                        f"{MAX_OUTPUT_CHARS} characters")
                parts.append(chunk)
            return "".join(parts)
        except EventRejected:
            raise
        except SecurityError as exc:
            raise EventRejected(f"{self.where}: refused by the template sandbox: {exc}") from None
        except (TemplateError, ArithmeticError, TypeError, ValueError, RecursionError) as exc:
            raise EventRejected(f"{self.where}: template failed: {exc}") from None
