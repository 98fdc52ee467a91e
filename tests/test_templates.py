"""User templates (webhook ``body``, ``mapping.properties``): they render what users expect, and
nothing a template author writes can escape the sandbox or blow up the process.

No wall-clock assertions: resource use is measured with tracemalloc (allocations, not time).
"""

from __future__ import annotations

import json
import logging
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import load_config
from router.errors import ConfigError, EventRejected
from router.events import parse_event
from router import templates as templates_module
from router.templates import MAX_OUTPUT_CHARS, Template

EVENT = {"type": "track", "event": "Order Completed", "userId": "u-1", "messageId": "m-1",
         "properties": {"order_id": "o-9", "revenue": "25.50", "currency": "eur"}}
MEMORY_LIMIT = 32 * 1024 * 1024  # far above any legitimate render (output is capped at 256 K)


@pytest.fixture(autouse=True)
def _quiet_plugin_warnings():
    logging.getLogger("router.plugins").setLevel(logging.ERROR)
    yield
    logging.getLogger("router.plugins").setLevel(logging.NOTSET)


def router_with(tmp_path: Path, destinations: str, env: dict[str, str] | None = None):
    from router.routing import Router
    path = tmp_path / "router.yaml"
    path.write_text("storage: memory://\ndestinations:\n" + textwrap.indent(
        textwrap.dedent(destinations).strip("\n"), "  ") + "\n")
    return Router(load_config(path, env=env or {}), deliver=False)


def request_for(router, raw):
    """The one request a router with one destination makes for ``raw``."""
    (outcome,) = router.plan(raw).results
    assert outcome.status == "send", outcome.reason
    (request,) = router.requests_for(outcome)
    return request


def render(source: str, **context) -> str:
    context.setdefault("event", parse_event(EVENT).to_dict())
    context.setdefault("options", {})
    return Template(source, where="settings.body").render(**context)


def render_measured(source: str) -> tuple[BaseException | str, int]:
    """Render under tracemalloc; the outcome (output or exception) and the peak allocation."""
    tracemalloc.start()
    try:
        try:
            outcome: BaseException | str = render(source)
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- rendering -----------------------------------------------------------------------------------

def test_webhook_body_template_renders_event_and_options(tmp_path):
    router = router_with(tmp_path, """
        - name: Sales
          plugin: webhook
          settings:
            url: https://hooks.example/sales
            body: |
              {"text": {{ ("Order " ~ event.properties.order_id ~ ": " ~ event.properties.revenue
                           ~ " " ~ event.properties.currency) | tojson }},
               "channel": {{ options.channel | default("#general") | tojson }}}
    """)
    request = request_for(router, {**EVENT, "integrations": {"sales": {"channel": "#orders"}}})
    assert request.method == "POST" and request.url == "https://hooks.example/sales"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {"text": "Order o-9: 25.5 EUR", "channel": "#orders"}

    assert json.loads(request_for(router, EVENT).body)["channel"] == "#general"


def test_webhook_body_that_is_not_json_is_sent_as_text(tmp_path):
    router = router_with(tmp_path, """
        - name: pager
          plugin: webhook
          settings:
            url: https://hooks.example/p
            method: PUT
            body: "{{ event.event }} by {{ event.userId }}"
    """)
    request = request_for(router, EVENT)
    assert request.method == "PUT"
    assert request.body == b"Order Completed by u-1"
    assert request.headers["Content-Type"].startswith("text/plain")


def test_without_a_body_template_the_normalized_event_is_sent(tmp_path):
    router = router_with(tmp_path, """
        - name: raw
          plugin: webhook
          settings: {url: "https://hooks.example/raw"}
    """)
    body = json.loads(request_for(router, EVENT).body)
    assert body["messageId"] == "m-1"
    assert body["properties"] == {"order_id": "o-9", "revenue": 25.5, "currency": "EUR"}
    assert body["receivedAt"].endswith("Z")


def test_template_sees_the_normalized_event():
    out = render("{{ event.properties.revenue + 1 }} {{ event.properties.currency }}")
    assert out == "26.5 EUR"


@pytest.mark.parametrize("raw, source", [
    ({"type": "track", "event": "Signed Up", "userId": "u"},
     "{{ event.properties.plan | default('free') }}"),
    ({"type": "track", "event": "Signed Up", "userId": "u", "properties": {}},
     "{{ event.properties.plan | default('free') }}"),
    ({"type": "identify", "userId": "u"}, "{{ event.traits.plan | default('free') }}"),
    ({"type": "page", "anonymousId": "a"}, "{{ event.context.locale | default('free') }}"),
])
def test_templates_can_default_a_property_of_an_event_without_properties(raw, source):
    assert render(source, event=parse_event(raw).to_dict()) == "free"


def test_one_template_serves_every_call_type_and_anonymous_events(tmp_path):
    # Every field of the spec is there, null when the event has none (as in Slack's texts):
    # the configuration guide's own example names event.event and event.userId.
    router = router_with(tmp_path, """
        - name: Any
          plugin: webhook
          settings:
            url: https://hooks.example/any
            body: |
              {"name": {{ event.event | tojson }},
               "user": {{ (event.userId or event.anonymousId) | tojson }}}
          mapping:
            properties:
              plan: "{{ event.traits.plan | default('free') | upper }}"
    """)
    sent = {}
    for raw in ({"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}},
                {"type": "page", "anonymousId": "a-1", "name": "Home"},
                {"type": "alias", "userId": "u-1", "previousId": "a-1"},
                {"type": "track", "event": "Signed Up", "anonymousId": "a-2"}):
        sent[raw["type"]] = json.loads(request_for(router, raw).body)
    assert sent == {"identify": {"name": None, "user": "u-1"},
                    "page": {"name": None, "user": "a-1"},
                    "alias": {"name": None, "user": "u-1"},
                    "track": {"name": "Signed Up", "user": "a-2"}}


def test_every_field_of_the_spec_is_there_for_an_event_without_it():
    # mutation audit: a field left out of the defaults (groupId, timestamp,
    # originalTimestamp) failed the render of every event without it, unnoticed
    from datetime import datetime, UTC
    fields = ["type", "event", "userId", "anonymousId", "name", "groupId", "previousId",
              "messageId", "timestamp", "originalTimestamp", "sentAt", "receivedAt", "version",
              "properties", "traits", "context", "integrations"]
    event = parse_event({"type": "alias", "userId": "u-1", "previousId": "a-1", "messageId": "m-1"},
                        received_at=datetime(2024, 3, 1, 12, tzinfo=UTC))
    source = "{{ [" + ", ".join(f"event.{field}" for field in fields) + "] | tojson }}"
    at = "2024-03-01T12:00:00.000Z"
    assert json.loads(render(source, event=templates_module.template_event(event))) == [
        "alias", None, "u-1", None, None, None, "a-1", "m-1", at, None, None, at, None,
        {}, {}, {}, {}]


def test_undefined_names_are_errors_not_empty_strings():
    with pytest.raises(EventRejected) as caught:
        render("{{ event.properties.missing_field }}")
    assert "settings.body" in caught.value.reason


@pytest.mark.parametrize("body", ["{{ event.properties.plan | tojson }}",
                                  "{{ [event.properties.plan] | tojson }}",
                                  "{{ {'a': {'b': event.properties.plan}} | tojson }}",
                                  "{{ event.properties.plan | upper }}"])
def test_a_missing_name_is_named_however_the_template_uses_it(body):
    # Under tojson the reason was "Object of type StrictUndefined is not JSON serializable"
    # (newcomer audit: the docs' own style, and a misspelt name).
    with pytest.raises(EventRejected) as caught:
        render(body)
    assert "has no attribute 'plan'" in caught.value.reason


def test_template_errors_cost_one_destination_only(tmp_path):
    router = router_with(tmp_path, """
        - name: strict
          plugin: webhook
          settings:
            url: https://hooks.example/a
            body: "{{ event.properties.not_there }}"
        - name: fine
          plugin: webhook
          settings: {url: "https://hooks.example/b"}
    """)
    result = router.plan(EVENT)
    assert result.status_of("strict").status == "invalid"
    assert "settings.body" in result.status_of("strict").reason
    assert result.status_of("fine").status == "send"


# -- syntax errors at load -----------------------------------------------------------------------

def test_template_syntax_error_names_the_field_and_template_line(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(textwrap.dedent("""\
        storage: memory://
        destinations:
          - name: ok
            plugin: webhook
            settings: {url: "https://hooks.example/ok"}
          - name: broken
            plugin: webhook
            settings:
              url: https://hooks.example/broken
              body: |
                {
                  "type": {{ event.type | tojson }},
                  "oops": {% if %}
                }
        """))
    from router.routing import Router
    with pytest.raises(ConfigError) as caught:
        Router(load_config(path, env={}), deliver=False)
    error = caught.value
    assert error.file == str(path)
    assert error.field == "destinations.1.settings.body"
    assert error.line == 10
    assert "template line 3" in str(error)
    assert str(error).startswith(f"{path}:10: destinations.1.settings.body")


def test_template_compile_error_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        Template("{{ event.type ", where="mapping.properties.total")
    assert caught.value.field == "mapping.properties.total"


# -- the sandbox ---------------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ event.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__class__'))|attr('__mro__') }}",
    "{{ ('{0.__class__.__mro__}'|attr('format'))(1) }}",
    "{{ ('{0.__class__}'|attr('format'))(event) }}",
    "{{ '{0.__class__}'.format(event) }}",
    "{{ '{0.__class__.__base__.__subclasses__}'.format('x') }}",
    "{{ '{0.__globals__}'.format(cycler.next) }}",
    "{{ 'a' * 10**9 }}",
    "{{ 10**9 * 'a' }}",
    "{{ ['a'] * 10**9 }}",
    "{{ 'a' * 100000 * 100000 }}",
    "{{ 2 ** 100000 }}",
    "{{ range(10**9)|list }}",
    "{{ range(10**9)|join }}",
    "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
    "{{ 'a' * 99999 }}{{ 'b' * 99999 }}{{ 'c' * 99999 }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_escape_corpus_is_refused_at_render(source):
    template = Template(source, where="settings.body")  # compiles: refused when it runs
    with pytest.raises(EventRejected) as caught:
        template.render(event=parse_event(EVENT).to_dict(), options={})
    assert caught.value.reason.startswith("settings.body")


@pytest.mark.parametrize("source", ESCAPES)
def test_escape_corpus_is_refused_without_using_much_memory(source):
    outcome, peak = render_measured(source)
    assert isinstance(outcome, EventRejected), outcome
    assert peak < MEMORY_LIMIT


def test_output_over_the_cap_is_refused():
    render("x" * 100 + "{{ 'y' * 1000 }}")  # small output is fine
    with pytest.raises(EventRejected) as caught:
        render("{% for i in range(" + str(MAX_OUTPUT_CHARS // 10 + 1)
               + ") %}0123456789{% endfor %}")
    assert "over" in caught.value.reason


def test_the_sandbox_refuses_mutation_of_the_event():
    event = parse_event(EVENT).to_dict()
    with pytest.raises(EventRejected):
        render("{{ event.properties.update({'revenue': 0}) }}", event=event)
    assert event["properties"]["revenue"] == 25.5


def test_escape_in_a_webhook_body_makes_the_event_invalid_for_that_destination(tmp_path):
    router = router_with(tmp_path, """
        - name: evil
          plugin: webhook
          settings:
            url: https://hooks.example/evil
            body: "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
        - name: good
          plugin: webhook
          settings: {url: "https://hooks.example/good"}
    """)
    result = router.plan(EVENT)
    assert result.status_of("evil").status == "invalid"
    assert "sandbox" in result.status_of("evil").reason
    assert result.status_of("good").status == "send"


# -- bugs found: resources and error types the sandbox does not cap -------------------------------

MEMORY_BOMBS = [
    "{{ 'x'.ljust(10**8)|length }}",
    "{{ 'x'|center(10**8) }}",
    "{{ 'x'|indent(10**8) }}",
    "{{ '%0*d' % (10**8, 1) }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{{ '{0:{1}}'.format('x', 10**8)|length }}",
    "{{ ('a' * 10000)|replace('', 'x' * 10000)|length }}",
    "{{ (['a' * 10000] * 10000)|join|length }}",
    # a namespace attribute doubled 40 times, by each way of joining strings
    *["{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}{% set ns.s = "
      + join + " %}{% endfor %}{{ ns.s|length }}"
      for join in ("ns.s ~ ns.s", "[ns.s, ns.s]|join", "''.join([ns.s, ns.s])",
                   "'{}{}'.format(ns.s, ns.s)", "'%s%s' % (ns.s, ns.s)")],
    # one step that multiplies: every line, every break, every nesting level
    "{{ ('x\n' * 50000)|indent(99999)|length }}",
    "{{ ('x' * 100000)|wordwrap(1, wrapstring='y' * 100000)|length }}",
    # short words, so that the square check lets it through: the wrap string's own check
    "{{ ('a ' * 2000)|wordwrap(1, wrapstring='x' * 99999)|length }}",
    "{{ (range(50000)|list)|tojson(indent=99999)|length }}",
    # repetition of what a container holds, not of the container's items
    "{{ [['x' * 99999]] * 99999 }}",
    "{{ ([{'a': 'x' * 99999}] * 2000)|join|length }}",
    # one separator an item, by the filter and by the method
    "{{ range(20000)|join('x' * 20000)|length }}",
    "{{ ('x' * 20000).join(range(20000)|map('string')|list)|length }}",
    "{{ ([['x' * 99999]] * 99999)|tojson|length }}",
    # widths under the cap each, over it together (security review): 200 MB apiece unguarded
    "{{ ('{0:99999}' * 2000).format('a')|length }}",
    "{{ (('%99999s' * 2000) % (('a',) * 2000))|length }}",
    "{{ ('%99999s' * 2000)|format(*(('a',) * 2000))|length }}",
    "{{ (('%.99999f' * 2000) % ((1.5,) * 2000))|length }}",  # precisions add up too
    "{{ ('{0:.9999f}' * 20000).format(1.5)|length }}",
    # a separator an item of a list no one counted: a generator
    "{{ ('y' * 9999).join(range(20000)|map('string'))|length }}",
    "{{ range(20000)|map('string')|join('y' * 9999)|length }}",
    # a lazy map of big strings, gathered by the next filter
    "{{ range(2000)|map('center', 99999)|list|length }}",
    "{{ range(2000)|map('center', 99999)|map('upper')|list|length }}",
    # methods whose output one argument multiplies
    "{{ ('a' * 20000).translate(''.maketrans({'a': 'b' * 10000}))|length }}",
    "{{ ('\t' * 20000).expandtabs(10000)|length }}",
    # widths made from the arguments, or hidden behind a key with parentheses (review)
    "{{ '{0:{1}{1}}'.format('x', 999)|length }}",
    "{{ '{0:9999{1}}'.format('x', 999)|length }}",
    "{{ '{0:{1}}'.format('x', '999999999')|length }}",
    "{{ ('%(a(b))999999999s' % {'a(b)': 'x'})|length }}",
    # bytes, which no size check measures
    "{{ ('x'.encode() * 500000000)|length }}",
    # output joined in one call: a macro, a set block, a filter block, caller(), a recursive
    # loop (10 GB each, the output cap seeing only what reaches the top level; audit)
    *[before + "{% for i in range(99000) %}{{ s }}{% endfor %}" + after for before, after in (
        ("{% set s = 'x' * 99999 %}{% macro m() %}", "{% endmacro %}{{ m()|length }}"),
        ("{% set s = 'x' * 99999 %}{% set t %}", "{% endset %}{{ t|length }}"),
        ("{% set s = 'x' * 99999 %}{% filter length %}", "{% endfilter %}"),
        ("{% set s = 'x' * 99999 %}{% macro m() %}{{ caller()|length }}{% endmacro %}"
         "{% call m() %}", "{% endcall %}"))],
    "{% set s = 'x' * 99999 %}{% for r in [range(99000)] recursive %}{% if loop.depth == 1 %}"
    "{{ loop(r)|length }}{% else %}{{ s }}{% endif %}{% endfor %}",
    # a keyword argument skipped the check of the positional one
    "{{ ('a' * 99999)|replace('', new='x' * 99999)|length }}",
    "{{ ('a' * 99999)|replace(old='', new='x' * 99999)|length }}",
    # one value shown by many small fields
    "{{ ('{0}' * 33333).format('x' * 99999)|length }}",
    "{{ ('{a}' * 33333).format_map({'a': 'x' * 99999})|length }}",
    "{{ (('%(a)s' * 20000) % {'a': 'x' * 99999})|length }}",
    "{{ ('%(a)s' * 20000)|format(a='x' * 99999)|length }}",
    # a list, tuple, dict or namespace written out holds its items by reference: doubled 27
    # times it is 2**27 items, printed in one call
    *["{% set ns = namespace(a='x') %}{% for i in range(27) %}{% set ns.a = " + twice
      + " %}{% endfor %}{{ ns.a }}"
      for twice in ("[ns.a, ns.a]", "(ns.a, ns.a)", "{'x': ns.a, 'y': ns.a}",
                    "namespace(x=ns.a, y=ns.a)")],
]

TIME_BOMBS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for c in 'x' * 99999 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% for i in range(100000) %}{{ loop.cycle('a', 'b') }}{{ 'x'|lower }}{% endfor %}",
]


@pytest.mark.parametrize("source", TIME_BOMBS)
def test_a_render_that_would_take_hours_is_refused_by_its_step_budget(source, monkeypatch):
    # Nothing is built, so no size cap applies; the event loop would stall for every
    # destination while it ran. The time budget is lifted here, so that it is the step
    # budget that refuses even on a machine too loaded to take 100,000 steps in a second.
    monkeypatch.setattr(templates_module, "MAX_RENDER_SECONDS", 600.0)
    with pytest.raises(EventRejected, match="over 100000 steps"):
        render(source)


@pytest.mark.parametrize("source", [
    "{{ (range(90000)|batch(1)|list)|sum(start=[])|length }}",
    "{{ ('x' * 100000 ~ 'x' * 100000 ~ 'x' * 60000)|wordwrap(1)|length }}",
])
def test_one_step_that_would_take_seconds_is_refused_before_it_runs(source):
    # Adding up lists, and textwrap cutting a long word, grow with the square: 10 s and 4 s
    # in one step, where the time budget is checked only between steps (review).
    with pytest.raises(EventRejected, match="square|too slow"):
        render(source)


def test_tests_spend_steps_too(monkeypatch):
    # select('in', big) over 33,000 needles spent no step: 24 s of the event loop (review).
    monkeypatch.setattr(templates_module, "MAX_RENDER_SECONDS", 600.0)
    with pytest.raises(EventRejected, match="over 100000 steps"):
        render("{% set needles = ('ab ' * 33000).split() %}"
               "{{ needles|select('in', 'ab')|list|length }}{{ needles|select('in', 'ab')|list"
               "|length }}{{ needles|select('in', 'ab')|list|length }}"
               "{{ needles|select('in', 'ab')|list|length }}")


@pytest.mark.parametrize("source", [
    # two lists of 2**40 items in 80 steps, compared (or hashed) in one uninterruptible call
    "{% set ns = namespace(a=1, b=1) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
    "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
    "{% set ns = namespace(a=1) %}{% for i in range(40) %}{% set ns.a = (ns.a, ns.a) %}"
    "{% endfor %}{{ ns.a in {} }}",
    # pprint writes a nested value out again at every level; tojson indents every line
    # inside a level once more
    "{{ options.deep|pprint|length }}",
    "{{ options.deep|tojson(indent=16)|length }}",
])
def test_one_step_that_would_take_minutes_is_refused(source):
    deep = list(range(99999))
    for _ in range(60):
        deep = [deep]
    # pprint is refused before it runs, tojson as it writes, not by the size of what took
    # seconds to write (mutation audit: a nesting count that never grew, and tojson left to
    # json.dumps, went unnoticed)
    refused = {"pprint": "pprint of so large", "tojson": "tojson output too large"}.get(
        next((name for name in ("pprint", "tojson") if name in source), ""), "too large|too slow")
    with pytest.raises(EventRejected, match=refused):
        render(source, options={"deep": deep})


def test_a_value_that_holds_one_list_many_times_is_sized_without_walking_each_time(
        monkeypatch):
    # Forty doublings of [a, a] are a million items in forty lists. Walked item by item,
    # sizing them after each step held the event loop 1.5 s on a slow machine, so the
    # render ran out of time before the size check refused it; each list is walked once now.
    walked = 0
    contents = templates_module._contents

    def counting(value):
        nonlocal walked
        walked += 1
        return contents(value)

    monkeypatch.setattr(templates_module, "_contents", counting)
    monkeypatch.setattr(templates_module, "MAX_RENDER_SECONDS", 600.0)
    with pytest.raises(EventRejected, match="value too large"):
        render("{% set ns = namespace(a=1) %}{% for i in range(40) %}"
               "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}")
    assert walked < 10_000


def test_filters_spend_steps_too(monkeypatch):
    # 60,000 loop iterations alone are within the budget; each with a filter, over it
    # (mutation audit: filters spending no step went unnoticed)
    monkeypatch.setattr(templates_module, "MAX_RENDER_SECONDS", 600.0)
    assert render("{% for i in range(60000) %}{% set x = i %}{% endfor %}ok") == "ok"
    with pytest.raises(EventRejected, match="over 100000 steps"):
        render("{% for i in range(60000) %}{% set x = i|abs %}{% endfor %}ok")


def test_a_template_cannot_replace_what_counts_its_loops(monkeypatch):
    monkeypatch.setattr(templates_module, "MAX_RENDER_SECONDS", 600.0)
    with pytest.raises(EventRejected, match="over 100000 steps"):
        render("{% set __router_counted_loop = dict %}{% set d = dict.fromkeys(range(99999)) %}"
               "{% for a in d %}{% for b in d %}{% endfor %}{% endfor %}")


def test_a_template_error_never_shows_a_secret_from_the_environment(tmp_path):
    hook = """
        - name: hook
          plugin: webhook
          settings:
            url: https://hooks.example/a
            body: '{"auth": {{ ${API_KEY}|tojson }}}'
        """
    with pytest.raises(ConfigError) as caught:  # read as a name the template is not given
        router_with(tmp_path, hook, env={"API_KEY": "sk_live_ABCDEFGH12345678"})
    assert "sk_live" not in str(caught.value) and "REDACTED" in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # lexed as 9, then a name: a piece is quoted
        router_with(tmp_path, hook, env={"API_KEY": "9f8e7d6c5b4a3210ffee"})
    assert "f8e7d6c5b4a3210ffee" not in str(caught.value)


@pytest.mark.parametrize("destination, field, unknown", [
    ("""
     - name: hook
       plugin: webhook
       settings: {url: "https://hooks.example/a", body: '{"user": {{ user_id | tojson }}}'}
     """, "destinations.0.settings.body", "`user_id`"),
    ("""
     - name: chat
       plugin: slack
       settings:
         url: "https://hooks.slack.com/services/T0/B0/x"
         templates: {track: "{{ evnt.event }} by {{ event.userId }}"}
     """, "destinations.0.settings.templates.track", "`evnt`"),
    ("""
     - name: hook
       plugin: webhook
       settings: {url: "https://hooks.example/a"}
       mapping: {properties: {plan: "{{ properties.plan }}"}}
     """, "destinations.0.mapping.properties.plan", "`properties`"),
], ids=["webhook-body", "slack-text", "property-mapping"])
def test_a_template_reading_a_name_it_is_not_given_is_a_config_error(tmp_path, destination,
                                                                     field, unknown):
    # It passed `router check`, then failed for every event: each one lost for that
    # destination, as invalid, with nothing to replay once the template was fixed.
    with pytest.raises(ConfigError) as caught:
        router_with(tmp_path, destination)
    said = str(caught.value)
    assert "router.yaml:" in said and field in said
    assert f"the template reads {unknown}, which it is not given" in said


@pytest.mark.parametrize("source", [
    # set on some branches only: it renders for the events that take them (review)
    "{% if event.event %}{% set name = event.event %}{% else %}{% set name = event.type %}"
    "{% endif %}{{ name }}",
    "{% if event.event %}{% set y = event.event %}{% endif %}{{ y | default('none') }}",
    "{% if foo is defined %}{{ foo }}{% endif %}{{ bar | default('-') }}",
    "{% macro row(v) %}{{ v }}{{ caller() }}{% endmacro %}{% call row(event.type) %}!"
    "{% endcall %}{% for x in [1, 2] %}{{ loop.index }}{{ x }}{% endfor %}",
])
def test_a_template_that_renders_for_some_events_is_not_refused_at_load(source):
    Template(source, where="settings.body", names=("event", "options")).render(
        event={"event": None, "type": "track"}, options={})


def test_a_template_knows_whether_it_writes_every_value_as_json():
    # A body whose values all go through tojson can have no key an event chose: the webhook
    # spares it the (costly) check for a key twice.
    assert Template('{"a": {{ event.x | tojson }}, "b": [{% for i in event.l %}'
                    '{{ i | tojson }}{% endfor %}]}', where="b").writes_values_as_json
    assert not Template('{"a": "{{ event.x }}"}', where="b").writes_values_as_json


def test_names_a_template_sets_or_jinja2_gives_are_not_unknown():
    source = ('{% set ns = namespace(n=0) %}{% for p in event.properties.products or [] %}'
              '{% set ns.n = ns.n + 1 %}{% endfor %}{% set total = ns.n %}'
              '{{ total }} {{ range(2) | list }} {{ options.plan | default("free") }}')
    assert Template(source, where="settings.body", names=("event", "options")).render(
        event={"properties": {"products": [1, 2]}}, options={}) == "2 [0, 1] free"


def test_a_render_of_few_but_costly_steps_is_refused_by_its_time_budget():
    # A thousand sorts of 100,000 items: tens of milliseconds a step, a minute or more in
    # all, within the step budget (found by fuzzing).
    with pytest.raises(EventRejected, match="over 1 s"):
        render("{% set big = range(99999)|list %}"
               "{% for i in range(1000) %}{{ big|sort|length }}{% endfor %}")


@pytest.mark.parametrize("source", [
    "{{ " + "(" * 200 + "1" + ")" * 200 + " }}",
    "{{ " + "[" * 200 + "]" * 200 + " }}",
])
def test_a_template_that_nests_too_deeply_to_compile_is_a_config_error(source):
    # jinja2's parser ran out of stack: a RecursionError and a 3,000-line traceback from
    # `router check`, instead of the file, line and field.
    with pytest.raises(ConfigError, match="nests too deeply"):
        Template(source, where="settings.body")


def test_loops_still_know_their_length_and_last_item():
    source = ("{% for p in products %}{{ loop.index }}/{{ loop.length }}"
              "{% if not loop.last %},{% endif %}{% endfor %}")
    assert render(source, products=[1, 2, 3]) == "1/3,2/3,3/3"


@pytest.mark.parametrize("source", MEMORY_BOMBS)
def test_memory_bombs_are_refused_without_allocating_them(source):
    outcome, peak = render_measured(source)
    assert isinstance(outcome, EventRejected), outcome
    assert peak < MEMORY_LIMIT, f"peak {peak // 2**20} MB"


@pytest.mark.parametrize("source, expected", [
    ("{{ 'a' ~ 1 ~ 'b' }}", "a1b"),
    ("{{ ['a', 'b']|join(', ') }}", "a, b"),
    ("{{ 'a\nb'|indent(4) }}", "a\n    b"),
    ("{{ 'one two'|wordwrap(3, wrapstring='|') }}", "one|two"),
    ("{{ {'a': [1]}|tojson(indent=2) }}", '{\n  "a": [\n    1\n  ]\n}'),
    ("{% set ns = namespace(s='x') %}{% for i in range(10) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s|length }}", "1024"),
])
def test_ordinary_joins_and_layouts_still_render(source, expected):
    assert render(source) == expected


def test_huge_powers_are_refused():
    with pytest.raises(EventRejected):
        render("{{ (10**64**64**64) % 7 }}")


def test_huge_products_are_refused():
    # Squaring a number forty times doubles its digits each time: a second of the event
    # loop and 100 MB before the time budget stopped it (security review).
    with pytest.raises(EventRejected, match="product too large"):
        render("{% set ns = namespace(n=3) %}{% for i in range(40) %}"
               "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n % 7 }}")
    assert render("{{ 19.99 * 3 }} {{ 2**62 * 2**62 }}") == f"{19.99 * 3} {2**124}"


def test_lorem_ipsum_is_not_a_template_global():
    # jinja2's lipsum(n, html, min, max) builds up to n * max words in one call, which no
    # step or time budget can interrupt: 20 s of a stalled event loop from one event.
    with pytest.raises(EventRejected, match="lipsum"):
        render("{{ lipsum(200, False, 99999, 100000) }}")
    assert render("{{ range(3)|list }} {{ dict(a=1) }} {{ namespace(a=1).a }} "
                  "{{ cycler('x', 'y').next() }} {{ joiner(',')() }}") == \
        "[0, 1, 2] {'a': 1} 1 x "


@pytest.mark.parametrize("source, expected", [
    ("{{ '{0:>6}|{1:.2f}'.format('ab', 2.5) }}", "    ab|2.50"),
    ("{{ '%-4s|%05.1f' % ('ab', 2.5) }}", "ab  |002.5"),
    ("{{ '%(a)s' % {'a': 1} }}", "1"),
    ("{{ ', '.join(['a', 'b']|map('upper')) }}", "A, B"),
    ("{{ ['a', 'b']|map('upper')|join('-') }}", "A-B"),
    ("{{ 'a\tb'.expandtabs is undefined }}", "True"),
    ("{{ 'up %d%% of 1000000' % 5 }}", "up 5% of 1000000"),
    ("{{ '%(a)s-%(b)05d' % {'a': 1, 'b': 2} }}", "1-00002"),
    ("{{ '{:>{w}}|{:>{w}}|{:>{w}}'.format('a', 'b', 'c', w=3) }}", "  a|  b|  c"),
    ("{{ '{:,.2f}|{{}}|{:.1%}'.format(1234.5, 0.5) }}", "1,234.50|{}|50.0%"),
    ("{{ range(100000)|map('string')|first }}", "0"),  # one item taken, not all
])
def test_formats_joins_of_generators_and_refused_methods_behave(source, expected):
    assert render(source) == expected


@pytest.mark.parametrize("source", ["{{ '{0}'.format() }}", "{{ '{name}'.format() }}",
                                    "{{ '{x}'.format_map({}) }}"])
def test_any_render_failure_is_event_rejected(source):
    with pytest.raises(EventRejected):
        render(source)


# -- fuzzing (S9): templates built from the pieces escapes and bombs are made of ------------------

_ATOMS = ["event", "event.properties", "event.properties.revenue", "event.userId", "options",
          "'x'", "'{0}'", "'%s'", "''", "0", "1", "9", "99999", "[]", "['a', 'b']",
          "{'a': 1}", "range(3)", "cycler", "namespace", "joiner", "none", "true", "1.5"]
_FILTERS = ["list", "join", "length", "upper", "string", "tojson", "first", "last", "sort",
            "reverse", "unique", "sum", "map('string')", "select", "batch(2)", "center(9999)",
            "indent(99)", "wordwrap(3)", "replace('', 'xx')", "format('x')", "attr('format')",
            "attr('__class__')", "pprint", "dictsort", "items", "int", "float", "abs", "trim"]
_NAMES = ["__class__", "__mro__", "__globals__", "__init__", "__subclasses__", "upper",
          "format", "format_map", "items", "update", "append", "pop", "encode", "next",
          "join", "ljust", "zfill"]


def _expression(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "**", "%", "~", "//", "==", "in"]),
                  inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.sampled_from(_FILTERS)).map(lambda t: f"({t[0]}|{t[1]})"),
        st.tuples(inner, st.sampled_from(_NAMES)).map(lambda t: f"{t[0]}.{t[1]}"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(inner, inner).map(lambda t: f"[{t[0]}, {t[1]}]"),
        inner.map(lambda e: f"range({e})"),
    )


_expressions = st.recursive(st.sampled_from(_ATOMS), _expression, max_leaves=8)
_templates = st.one_of(
    _expressions.map(lambda e: "{{ " + e + " }}"),
    st.tuples(_expressions, _expressions).map(
        lambda t: "{% for x in " + t[0] + " %}{{ " + t[1] + " }}{% endfor %}"),
    st.tuples(_expressions, _expressions, _expressions).map(
        lambda t: "{% set ns = namespace(a=" + t[0] + ") %}{% for i in " + t[1]
        + " %}{% set ns.a = " + t[2].replace("x", "ns.a") + " %}{% endfor %}{{ ns.a }}"),
    st.tuples(_expressions, _expressions).map(
        lambda t: "{% macro m(x) %}{{ " + t[0] + " }}{% endmacro %}{{ m(" + t[1] + ") }}"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_templates)
def test_a_fuzzed_template_compiles_or_not_renders_or_not_and_never_raises_else(source):
    # The jinja2 and OSS-Fuzz recipe: whatever the template, the only outcomes are a config
    # error at load, or output within the cap, or the event refused for this destination;
    # never another exception (a crash of delivery), never more than the cap, never the
    # memory an escape or a bomb would take.
    try:
        template = Template(source, where="settings.body")
    except ConfigError:
        return
    outcome, peak = render_measured_with(template)
    assert isinstance(outcome, (str, EventRejected)), (source, outcome)
    if isinstance(outcome, str):
        assert len(outcome) <= MAX_OUTPUT_CHARS
    assert peak < MEMORY_LIMIT, (source, f"peak {peak // 2**20} MB")


def render_measured_with(template: Template) -> tuple[BaseException | str, int]:
    tracemalloc.start()
    try:
        try:
            outcome: BaseException | str = template.render(
                event=parse_event(EVENT).to_dict(), options={})
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
