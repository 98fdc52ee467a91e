"""User templates, always in jinja2's immutable sandbox, compiled once at load.

Following the jinja2 sandbox docs and its advisories: a fixed synthetic template name (never a
user-chosen one: CVE-2024-56201), no custom filters that call what they are handed
(CVE-2024-56326), plain dicts as context (never live objects), and caps on output size and on
what each operation may build, so a small template cannot render gigabytes: every string or
list an operator, ``~``, a filter or a method builds is refused past ``MAX_OUTPUT_CHARS``
(a value can then at most double before it is refused, which bounds a loop that doubles a
``namespace`` attribute), and the operations that multiply in one step (``*``, ``**``,
format widths, ``join``'s separator, ``replace``, ``indent``, ``wordwrap``, ``tojson``'s
indent) are checked before they run; a format field's width is checked as it finally is,
after the arguments that make it. A lazy sequence (what ``map`` or ``select`` return) is
counted against the same cap as a filter or method takes its items, so nothing can build
gigabytes out of sight of the checks. The string methods whose output an argument multiplies
with no way to check it first (``translate``, ``expandtabs``), ``encode`` (bytes escape the
checks, which measure text) and jinja2's ``lipsum``, which builds millions of words in one
uninterruptible call, are not available. Time is capped too: every loop iteration, call,
filter and test spends one of a render's ``MAX_STEPS``, and a render may take
``MAX_RENDER_SECONDS`` at most (a filter such as ``sort`` on a 100,000-item list takes tens
of milliseconds in one step; the few whose one step grows with the square of their input
are refused before they run).
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import re
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError
from jinja2.utils import Namespace
from markupsafe import EscapeFormatter, Markup

from router.errors import ConfigError, EventRejected
from router.events import Event

MAX_OUTPUT_CHARS = 256 * 1024
MAX_VALUE_SIZE = 100_000
"""The largest string or list one operation in a template may build (a repetition, a
padding width, an indent): jinja2's sandbox caps ``range`` but not these."""
MAX_POWER_BITS = 4096
MAX_JSON_INDENT = 16
MAX_WRAP_WORK = 2 * 10**9
"""Characters ``wordwrap`` may copy, about: the square of the text's length over the width."""
MAX_PPRINT_WORK = 1_000_000
"""Items ``pprint`` may write out, counted once for each level they are nested in: it writes a
nested value out again at every level (40 levels of 100,000 items took 2 s in one step)."""
MAX_STEPS = 100_000
"""Loop iterations, calls and filters one render may take."""
MAX_RENDER_SECONDS = 1.0
"""How long one render may hold the event loop (and with it intake and every destination)."""
TEMPLATE_NAME = "template"
_NUMBER = re.compile(r"\d+")
_PERCENT_WIDTH = re.compile(r"[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?")
_REFUSED_STRING_METHODS = frozenset({"translate", "maketrans", "expandtabs", "encode"})
"""Methods whose output one argument multiplies (each character's replacement, each tab's
width) with no cheap way to tell the size first, and ``encode``: bytes escape every size
check, which measure text."""


SPEC_FIELD_DEFAULTS: dict[str, Any] = {
    "type": None, "event": None, "userId": None, "anonymousId": None, "name": None,
    "groupId": None, "previousId": None, "messageId": None, "timestamp": None,
    "originalTimestamp": None, "sentAt": None, "receivedAt": None, "version": None,
    "properties": {}, "traits": {}, "context": {}, "integrations": {},
}
"""What a template sees for a field of the spec the event does not have."""


def template_event(event: Event) -> dict[str, Any]:
    """The event as every template sees it (webhook bodies, Slack texts, property mappings):
    its JSON form with each field of the spec present, null (or an empty object) when the
    event has none. One template then serves every call type: ``event.event`` is null on an
    identify, and ``event.userId or event.anonymousId`` works for anonymous events, where
    the strict undefined would fail the render for that event. A misspelt name
    (``event.evnt``) still fails."""
    return {**SPEC_FIELD_DEFAULTS, **event.to_dict()}  # read-only in the sandbox


def _contents(value: Any) -> Iterable[Any] | None:
    """What a list, tuple, dict (keys and values) or ``namespace`` holds, whose repr shows it
    all; None for anything else."""
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, dict):
        return itertools.chain(value.keys(), value.values())
    if isinstance(value, (list, tuple)):
        return value
    return None


def _size(value: Any, budget: int = MAX_OUTPUT_CHARS + 1,
          known: dict[int, int] | None = None) -> int:
    """The characters of a string, or the items of a list, tuple or dict with what they hold,
    at any depth (``[['x' * 99999]] * 99999`` is ten gigabytes, not 99,999 items). Counting
    stops once ``budget`` is reached: only whether a value is too large matters.

    A container met again is counted again (its repr writes it out again) but walked once:
    ``known`` keeps the size of each one counted to the end, by ``id``, which holds while
    ``value`` keeps them all alive. Forty ``{% set ns.a = [ns.a, ns.a] %}`` make a million
    items in forty lists; walked item by item, the check alone held the event loop for more
    than a second on a slow machine."""
    if isinstance(value, str):
        return len(value)
    items = _contents(value)
    if items is None:
        return 1
    if known is None:
        known = {}
    elif (size := known.get(id(value))) is not None:
        return size
    total = 1
    for item in items:
        total += _size(item, budget - total, known)
        if total >= budget:
            return total  # not counted to the end, so not kept: the walk stops here anyway
    known[id(value)] = total
    return total


class _StepBudget:
    """What one render may spend: loop iterations and calls (macros, filters, methods).
    Output and value caps bound memory, not time: two nested ``range(100000)`` loops build
    nothing, yet would hold the event loop, and every destination with it, for hours."""

    __slots__ = ("deadline", "left")

    def __init__(self) -> None:
        self.left = MAX_STEPS
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise SecurityError(f"over {MAX_STEPS} steps (loop iterations, calls and "
                                "filters): is a loop nested too deep?")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"over {MAX_RENDER_SECONDS:g} s: the template does too much "
                                "work for one event")


_budget: ContextVar[_StepBudget | None] = ContextVar("template_step_budget", default=None)


def _spend_step() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend()


def _counted(iterable: Any) -> Iterator[Any]:
    """A loop's items, each one a step of the render's budget."""
    for item in iterable:
        _spend_step()
        yield item


def _refuse_large_result(value: Any) -> Any:
    """``value``, unless it is a string or list longer than a template may build."""
    if _size(value) > MAX_OUTPUT_CHARS:
        raise SecurityError("value too large for a template")
    return value


def _refuse_large_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_VALUE_SIZE:
            raise SecurityError(f"argument {value} is too large for a template")


def _refuse_large_replace(text: Any, old: Any = None, new: Any = None, *_: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = text.count(old) if old else len(text) + 1
        if len(text) + hits * len(new) > MAX_VALUE_SIZE * 10:
            raise SecurityError("replacement too large for a template")


def _refuse_large_join(separator: Any, items: Any) -> None:
    """``separator.join(items)`` holds the separator once an item: checked before it runs
    (``range(20000)|join('x' * 20000)`` built 400 MB before the size cap could refuse it)."""
    if isinstance(separator, str) and hasattr(items, "__len__") and \
            len(items) * len(separator) > MAX_OUTPUT_CHARS:
        raise SecurityError("join too large for a template")


def _refuse_wide_percent_format(text: str, values: Any = None) -> None:
    """``text % values`` pads each field to its width and precision: refused before it runs
    when together they come to more than a template may build (2,000 fields of width 99,999
    are 200 MB, each of them allowed alone). Read as Python reads it: ``%%`` is a percent
    sign, and a mapping key may hold parentheses of its own (``%(a(b))9s``)."""
    total, at = len(text), 0
    shown: dict[str, int] = {}  # a mapping's value, as long as it is shown: once a key
    while (at := text.find("%", at) + 1) > 0:
        if text.startswith("%", at):
            at += 1
            continue
        if text.startswith("(", at):
            depth, key_at = 1, at + 1
            while depth and (at := at + 1) < len(text):
                depth += {"(": 1, ")": -1}.get(text[at], 0)
            key = text[key_at:at]
            at += 1
            # ``'%(a)s' * 20000 % {'a': 'x' * 99999}`` shows one value 20,000 times
            if isinstance(values, dict) and key in values:
                if key not in shown:
                    shown[key] = len(repr(values[key]))
                total += shown[key]
        match = _PERCENT_WIDTH.match(text, at)
        assert match is not None  # every part of the pattern may be empty
        width, precision = match.groups()
        if "*" in (width, precision):
            raise SecurityError("a format width taken from the values (*) is not allowed in "
                                "a template")
        total += int(width or 0) + int(precision or 0)
        at = match.end()
    if total > MAX_OUTPUT_CHARS:
        raise SecurityError("format widths too large for a template")


class _CappedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, each field's width and precision checked as they
    finally are (``{0:{1}{1}}`` makes its width from the arguments): at most
    ``MAX_VALUE_SIZE`` a field and ``MAX_OUTPUT_CHARS`` in all, before the field is built."""

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        numbers = [int(number) for number in _NUMBER.findall(format_spec)]
        if max(numbers, default=0) > MAX_VALUE_SIZE or \
                self._total + sum(numbers) > MAX_OUTPUT_CHARS:
            raise SecurityError("format widths too large for a template")
        field = super().format_field(value, format_spec)
        # what the field came to: ``('{0}' * 30000).format('x' * 99999)`` shows one value
        # 30,000 times, each field small, together 3 GB by the time the result is checked
        self._total += len(field)
        if self._total > MAX_OUTPUT_CHARS:
            raise SecurityError("format result too large for a template")
        return field


class _CappedEscapeFormatter(_CappedFormatter, EscapeFormatter):
    pass


def _budgeted(value: Any) -> Any:
    """``value``, or, for a lazy sequence (a generator, ``map``'s result), the same items
    counted as they are taken, refused once together they pass the cap: ``list`` of a
    generator of 100,000-character strings would build gigabytes before any check saw the
    result, while ``first`` takes one item and is done."""
    if not isinstance(value, Iterator):
        return value

    def counted(items: Iterator[Any]) -> Iterator[Any]:
        size = 0
        for item in items:
            size += _size(item)
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError("sequence too large for a template")
            yield item

    return counted(value)


def _gathered(value: Any) -> Any:
    """A lazy sequence's items in a list (taken under the cap): what ``join`` needs to count
    them, since it adds its separator once an item."""
    return list(_budgeted(value)) if isinstance(value, Iterator) else value


def _check_filter_arguments(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                               ) -> None:
    """What a filter is given, checked before it runs. The filters whose output one argument
    multiplies: ``format`` (a wide field), ``replace`` (each hit gets the new text),
    ``indent`` (each line gets the width), ``wordwrap`` (each break gets the wrap string)
    and ``tojson`` (each nesting level gets the indent); and the ones whose time grows with
    the square of their input (``sum`` of lists, ``wordwrap`` of a long word)."""
    if name == "do_format" and args and isinstance(args[0], str):
        _refuse_wide_percent_format(args[0], kwargs)
    elif name == "do_pprint" and args and _nesting_work(args[0]) > MAX_PPRINT_WORK:
        raise SecurityError("pprint of so large and deeply nested a value is too slow for a "
                            "template")
    elif name == "do_replace" and len(args) >= 2:  # (eval_ctx, text, old, new)
        _refuse_large_replace(str(args[1]), kwargs.get("old", args[2] if len(args) > 2 else None),
                              kwargs.get("new", args[3] if len(args) > 3 else None))
    elif name == "do_indent" and args and isinstance(args[0], str):
        width = kwargs.get("width", args[1] if len(args) > 1 else 4)
        per_line = len(width) if isinstance(width, str) else width
        if isinstance(per_line, int) and (args[0].count("\n") + 1) * per_line > MAX_OUTPUT_CHARS:
            raise SecurityError("indent too large for a template")
    elif name == "do_wordwrap" and len(args) >= 2 and isinstance(args[1], str):
        width = kwargs.get("width", args[2] if len(args) > 2 else 79)
        wrap = kwargs.get("wrapstring", args[4] if len(args) > 4 else None) or "\n"
        if isinstance(width, int) and isinstance(wrap, str) and \
                (len(args[1]) // max(width, 1) + 1) * len(wrap) > MAX_OUTPUT_CHARS:
            raise SecurityError("wordwrap too large for a template")
        # textwrap cuts a long word a piece at a time, copying the rest each time
        if isinstance(width, int) and len(args[1]) ** 2 // max(width, 1) > MAX_WRAP_WORK:
            raise SecurityError("wordwrap of so long a text at so small a width is too slow "
                                "for a template")
    elif name == "do_sum":
        start = kwargs.get("start", args[3] if len(args) > 3 else 0)
        if not isinstance(start, (int, float)):
            raise SecurityError("sum's start must be a number in a template (adding up "
                                "lists or strings takes time that grows with the square)")
    elif name == "do_join" and len(args) >= 2:  # (eval_ctx, items, separator="")
        _refuse_large_join(kwargs.get("d", args[2] if len(args) > 2 else ""), args[1])
    elif name == "do_tojson":
        indent = kwargs.get("indent", args[2] if len(args) > 2 else None)
        if isinstance(indent, int) and indent > MAX_JSON_INDENT:
            raise SecurityError(f"tojson indent over {MAX_JSON_INDENT} in a template")


def _capped_join(chunks: Iterable[str], what: str = "block output") -> str:
    """``chunks`` joined, refused as soon as they pass the cap. jinja2 joins in one call what
    a macro, a ``{% set %}`` or ``{% filter %}`` block, a ``caller()`` or a recursive loop
    renders (its ``concat``), which the output cap, counting the top level as it is
    generated, never saw (``{% for i in range(99000) %}{{ s }}{% endfor %}`` in a macro was
    10 GB); and ``tojson`` with an indent writes its pieces this way too."""
    joined, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise SecurityError(f"{what} too large for a template")
        joined.append(chunk)
    return "".join(joined)


def _nesting_work(value: Any, budget: int = MAX_PPRINT_WORK + 1) -> int:
    """Each item inside ``value`` counted once for each level it is nested in (what
    ``pprint`` writes out), stopping at ``budget``. Iterative: depth cannot exhaust the stack."""
    total, stack = 0, [(value, 1)]
    while stack and total < budget:
        item, depth = stack.pop()
        total += depth
        children = _contents(item)
        if children is not None:
            stack.extend((child, depth + 1) for child in children)
    return total


def _capped_json_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` for ``tojson``; with an indent, written a piece at a time and refused
    past the cap: each nesting level adds the indent to every line inside it, so 300 levels
    of a 100,000-item list at indent 16 is 500 MB, in one step."""
    if kwargs.get("indent") is None:
        return json.dumps(value, **kwargs)
    return _capped_join(json.JSONEncoder(**kwargs).iterencode(value), "tojson output")


class _CappedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a capped join: jinja2 lets the sandbox intercept binary
    operators but not ``~``, which compiles to a plain join."""

    def _capped(self, visit: Callable[[Any, Frame], None], node: nodes.Node,
                 frame: Frame) -> None:
        self.write("environment.refuse_large_result(")
        visit(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self._capped(super().visit_Concat, node, frame)

    # A list, tuple or dict written out in the template holds its items by reference:
    # ``{% set ns.a = [ns.a, ns.a] %}`` 40 times is a list of 2**40 items in 40 steps, which
    # ``str``, ``==``, ``tojson`` or ``pprint`` then walk in one uninterruptible call.
    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._capped(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._capped(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment's targets
            return super().visit_Tuple(node, frame)
        self._capped(super().visit_Tuple, node, frame)


class _CappedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on what one operation may allocate and on the
    steps one render may take."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CappedCodeGenerator
    refuse_large_result = staticmethod(_refuse_large_result)
    concat = staticmethod(_capped_join)
    counted_loop = staticmethod(_counted)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """The template's syntax tree, each ``for`` loop iterating through ``_counted`` so
        that its iterations spend the render's step budget."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            # an attribute of the environment, not a name a template could ``{% set %}``
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("counted_loop"), [loop.iter], [],
                                   None, None)
        return tree

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    abs(left) > 1 and right * abs(left).bit_length() > MAX_POWER_BITS:
                raise SecurityError("power too large for a template")
            if isinstance(right, float) and abs(right) > 1024:
                raise SecurityError("power too large for a template")
            return operator.pow(left, right)
        if operator_name == "*":
            for sized, count in ((left, right), (right, left)):
                if isinstance(sized, (str, list, tuple)) and isinstance(count, int) \
                        and _size(sized) * count > MAX_VALUE_SIZE:
                    raise SecurityError("repetition too large for a template")
            if isinstance(left, int) and isinstance(right, int) and \
                    abs(left).bit_length() + abs(right).bit_length() > MAX_POWER_BITS:
                raise SecurityError("product too large for a template")
            return operator.mul(left, right)
        if operator_name == "%":
            if isinstance(left, str):
                _refuse_wide_percent_format(left, right)
            return _refuse_large_result(operator.mod(left, right))
        return _refuse_large_result(operator.add(left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """jinja2's own wrapping of ``str.format`` and ``format_map``, with a formatter that
        checks each field's final width (``_CappedFormatter``)."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map") or \
                not isinstance(value.__self__, str):
            return None
        text: str = value.__self__
        formatter = (_CappedEscapeFormatter(self, escape=text.escape)
                     if isinstance(text, Markup) else _CappedFormatter(self))
        takes_a_mapping = value.__name__ == "format_map"

        def formatted(*args: Any, **kwargs: Any) -> str:
            if takes_a_mapping:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return type(text)(formatter.vformat(text, (), args[0]))
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(formatted, value)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _REFUSED_STRING_METHODS:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _spend_step()
        _refuse_large_arguments(args, kwargs)
        if __obj is not _counted:  # a loop takes its items one at a time, each a step
            args = tuple(map(_budgeted, args))
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        text = getattr(method, "__self__", None)
        if isinstance(text, str):
            name = getattr(method, "__name__", "")
            if name == "replace":
                _refuse_large_replace(text, *args)
            elif name == "join" and args:
                args = (_gathered(args[0]), *args[1:])
                _refuse_large_join(text, args[0])
        return _refuse_large_result(super().call(__context, __obj, *args, **kwargs))


def _stepped(test: Any) -> Callable[..., Any]:
    """A built-in test (``in``, ``divisibleby``, ...) that spends a step: ``select('in',
    big)`` over 33,000 items took 24 s, none of it counted."""
    @functools.wraps(test)
    def stepped(*args: Any, **kwargs: Any) -> Any:
        _spend_step()
        return test(*args, **kwargs)

    return stepped


def _guarded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter that refuses huge arguments (``center(10**9)``), what would
    multiply in one step, and a result over the cap."""
    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _spend_step()
        _refuse_large_arguments(args, kwargs)
        gather = _gathered if function.__name__ == "do_join" else _budgeted
        args = tuple(map(gather, args))
        _check_filter_arguments(function.__name__, args, kwargs)
        return _refuse_large_result(function(*args, **kwargs))

    return guarded


def _name_the_undefined(value: Any) -> Any:
    """What ``tojson`` does with a value JSON has no form for: an undefined name, wherever
    it is in the value (``[event.properties.plan]``), is reported by its name, where json
    said "Object of type StrictUndefined is not JSON serializable"."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_environment = _CappedSandbox(undefined=StrictUndefined, autoescape=False)
_environment.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": _name_the_undefined}
_environment.policies["json.dumps_function"] = _capped_json_dumps
_environment.filters = {name: _guarded_filter(f) for name, f in _environment.filters.items()}
_environment.tests = {name: _stepped(test) for name, test in _environment.tests.items()}
del _environment.globals["lipsum"]


def _check_names(tree: nodes.Template, names: Collection[str], where: str) -> None:
    """Raise ``ConfigError`` when the template reads a name that is neither in ``names`` nor
    one of jinja2's own (``range``, ``namespace``...) nor set anywhere in the template, nor
    asked after (``is defined``, ``| default``). jinja2's own list of undeclared names
    counts one set on some branches only, which renders for the events that take them."""
    set_somewhere = {name.name for name in tree.find_all(nodes.Name)
                     if name.ctx in ("store", "param")}
    asked_after = {node.node.name for node in tree.find_all((nodes.Test, nodes.Filter))
                   if node.name in ("defined", "undefined", "default", "d")
                   and isinstance(node.node, nodes.Name)}
    unknown = meta.find_undeclared_variables(tree) - set(names) - set(_environment.globals) \
        - set_somewhere - asked_after
    if unknown:
        given = " and ".join(f"`{name}`" for name in sorted(names))
        raise ConfigError(f"the template reads {', '.join(f'`{n}`' for n in sorted(unknown))}, "
                          f"which it is not given: it has {given} (`event.userId`, not "
                          "`userId`)", field=where)


def _writes_values_as_json(tree: nodes.Template) -> bool:
    """Whether every ``{{ ... }}`` of the template ends in ``| tojson``."""
    return all(isinstance(node, nodes.TemplateData)
               or (isinstance(node, nodes.Filter) and node.name == "tojson")
               for output in tree.find_all(nodes.Output)
               for node in output.nodes)


class Template:
    """A compiled user template. ``render`` raises ``EventRejected`` on any failure, so a bad
    template costs the one event, for the one destination, never the process."""

    def __init__(self, source: str, *, where: str, names: Collection[str] | None = None
                 ) -> None:
        """``names``: what ``render`` will be given. A template that reads any other name
        (``user_id`` for ``event.userId``) is then a config error: the strict undefined
        made it fail for every event, each one lost for the destination while ``router
        check`` said all was well (templates audit)."""
        self.where = where
        try:
            self._template = _environment.from_string(source)
            self._template.name = TEMPLATE_NAME
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            at = f" (template line {line})" if line else ""
            raise ConfigError(f"template does not compile{at}: {exc.message or exc}",
                              field=where) from None
        except (RecursionError, MemoryError, SyntaxError):  # jinja2's parser, or Python's
            raise ConfigError("template does not compile: it nests too deeply",
                              field=where) from None
        tree = _environment.parse(source)  # it compiled: it parses
        if names is not None:
            _check_names(tree, names, where)
        self.writes_values_as_json = _writes_values_as_json(tree)
        """Whether every value the template writes goes through ``tojson``: then no value
        can add a key to a JSON body, or break it."""

    def render(self, **context: Any) -> str:
        budget = _budget.set(_StepBudget())
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
        except Exception as exc:  # noqa: BLE001 - any failure of a user template is its own
            raise EventRejected(f"{self.where}: template failed: {type(exc).__name__}: {exc}"
                                ) from None
        finally:
            _budget.reset(budget)
