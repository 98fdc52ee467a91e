"""The conformance suite: what every destination must do, whatever its vendor.

A plugin's own tests show the exact requests its vendor needs; this suite checks the rules
the core relies on to deliver any destination's events safely, which no single example
test can cover:

``settings``
    The plugin declares a ``plugin_name``, a pydantic ``Settings`` model whose fields all have
    descriptions (they are the settings' documentation, shown by ``router plugins``) and
    which, with every model nested in it, says what to do with keys it does not have
    (``extra="forbid"``: pydantic's default drops a misspelt setting without a word), and
    ``delivery`` limits.
``sample_events``
    Each of the kit's sample events (every call type, e-commerce, semantic events, anonymous
    activity, an identify that merges two ids) and edge events (no context, a null revenue,
    products without prices, ...) gives payloads, or ``SkipEvent`` / ``EventRejected`` with
    a reason, and passes the per-event rules below.
``any_valid_event``
    The same, property-based: hundreds of valid events of every call type drawn by
    hypothesis (``strategies.raw_events()``), with per-event options under the destination's
    name now and then.
``batching``
    A full batch (``delivery.batch_size`` payloads of one group) builds one request whose body
    stays within ``delivery.batch_bytes``.
``read_response``
    Ordinary answers (200, 400, 429, 500, 503, with JSON, empty or HTML bodies) are judged
    without raising, one outcome per payload.

The per-event rules: only ``SkipEvent`` or ``EventRejected`` escape ``translate`` (anything
else the router reports as a plugin failure) and only ``DestinationError``s escape
``build_request``; ``translate`` leaves the event untouched (every destination gets the same
object); payloads are ``Payload``s whose bodies ``orjson`` can serialize (they go to the
spool); it is deterministic (the same payloads from a second call, from a new instance, and
from the event parsed again, so a vendor dedup id built from it is stable across retries,
replays and restarts; so are the requests); no secret from the settings is in a payload body
or group (the spool and the dead letters keep them; credentials belong in ``build_request``).

``check_destination`` runs it all and raises ``AssertionError`` naming the rule and the event
that broke it.
"""

from __future__ import annotations

import base64
import copy
import itertools
import keyword
import re
import sysconfig
import traceback
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings_cls
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from router.destination import (DeliveryDefaults, Destination, HttpRequest, Payload,
                                outcomes_problem, payloads_problem,
                                refuse_unread_amounts, request_problem)
from router.errors import DestinationError, EventRejected, SkipEvent
from router.events import Event
from router.testing.events import describe_event, edge_events, event_json, sample_events
from router.testing.harness import DestinationHarness, answer, batches, decoded_body, spooled
from router.testing.strategies import json_values, raw_events, texts

ENVELOPE_SLACK = 64
"""Bytes a request's envelope may grow between half a batch and a full one: a plugin that
sorts payloads into a few arrays (Braze: attributes, events, purchases) opens each once."""
MIN_SECRET_LENGTH = 8
"""Secrets are searched for as text; a short one ("abc", "true") would match by chance."""

FIXED_MESSAGE_ID = "conformance-message-id-0001"

READ_RESPONSE_ANSWERS: tuple[tuple[int, bytes, dict[str, str]], ...] = (
    (200, b"{}", {}), (200, b"", {}), (202, b'{"status": "ok"}', {}),
    (400, b'{"error": "bad request"}', {}), (401, b"", {}),
    (413, b"<html><body>Request Entity Too Large</body></html>", {}),
    (429, b'{"error": "rate limited"}', {}),
    (429, b"", {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}),  # the HTTP-date form
    (500, b"<html><body>oops</body></html>", {}), (503, b"", {"Retry-After": "120"}),
)
"""Answers any API may give, whatever it documents: the judgement must survive them all."""

DedupId = Callable[[Any], Any]
"""From one payload body to the vendor's dedup id in it (``lambda body: body["insert_id"]``)."""


_STANDARD_LIBRARY = sysconfig.get_paths()["stdlib"]


def _raised(exc: BaseException) -> str:
    """``KeyError: 'ip' (at acme/translate.py:33 in translate)``: the place in the plugin that
    raised, since pytest hides the suite's frames and with them the plugin's below."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith(_STANDARD_LIBRARY)]  # json.loads's, say
    if not frames:
        return f"{type(exc).__name__}: {exc}"
    last = frames[-1]
    where = "/".join(Path(last.filename).parts[-2:])
    return f"{type(exc).__name__}: {exc} (at {where}:{last.lineno} in {last.name})"


class ConformanceFailure(AssertionError):
    """A destination broke a rule of the conformance suite. ``rule`` names it."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"[{rule}] {message}")


@dataclass
class ConformanceSuite:
    """The suite for one destination class with one set of settings.

    ``settings`` are the destination's settings as in the config; use distinctive secret
    values (8 characters or more) so that a leak can be found. ``examples`` is how many
    events hypothesis draws. ``dedup_id``, when given, reads the vendor's dedup id from a
    payload body: it must be present, stable, and differ between events with different
    ``messageId``s. ``events`` are raw events tried besides the kit's samples (your vendor's
    edge cases).
    """

    destination_cls: type[Destination[Any]]
    settings: Mapping[str, Any] = field(repr=False)  # secrets: never in a report
    examples: int = 200
    dedup_id: DedupId | None = None
    events: Sequence[Mapping[str, Any]] = ()
    hypothesis_settings: hypothesis_settings_cls | None = None
    _harness: DestinationHarness[Any] | None = field(default=None, init=False, repr=False)

    RULES: ClassVar[tuple[str, ...]] = ("settings", "sample_events", "any_valid_event",
                                        "batching", "read_response")

    # -- running ----------------------------------------------------------------------------

    def run(self, rules: Iterable[str] | None = None) -> None:
        """Check the given rules (all by default), in order; the first broken one raises.
        Whatever the rules, the secrets given must be distinctive: every rule that looks
        for a leak relies on it."""
        rules = list(rules or self.RULES)
        for rule in rules:
            if rule not in self.RULES:
                raise ValueError(f"unknown rule {rule!r}; expected one of {self.RULES}")
        self._check_declarations()  # the harness below needs them
        for secret in self.harness.secrets():
            if len(secret) < MIN_SECRET_LENGTH:
                raise self.fail("settings", f"give the suite distinctive secret values of "
                                            f"{MIN_SECRET_LENGTH}+ characters (such as "
                                            f"'acme-key-0001'): a {len(secret)}-character "
                                            "secret could match ordinary text")
        for rule in rules:
            getattr(self, f"check_{rule}")()

    @property
    def harness(self) -> DestinationHarness[Any]:
        if self._harness is None:
            self._harness = DestinationHarness(self.destination_cls, self.settings)
        return self._harness

    @property
    def label(self) -> str:
        plugin = getattr(self.destination_cls, "plugin_name", "?")
        return f"{self.destination_cls.__name__} (plugin {plugin!r})"

    def fail(self, rule: str, message: str, event: Any = None) -> ConformanceFailure:
        """The failure to raise: the destination, the rule, the event and what went wrong."""
        if event is None:
            return ConformanceFailure(rule, f"{self.label}: {message}")
        return ConformanceFailure(rule, f"{self.label} on {describe_event(event)}: {message}\n"
                                        f"  event: {event_json(event)}")

    # -- the rules --------------------------------------------------------------------------

    def check_settings(self) -> None:
        """The declarations the core and ``router plugins`` read."""
        self._check_declarations()
        undocumented = _undocumented_fields(self.destination_cls.Settings)
        if undocumented:
            raise self.fail("settings", "every settings field needs a description (it is the "
                                        "settings' documentation): missing on "
                                        + ", ".join(undocumented))
        plain = _plain_credentials(self.destination_cls.Settings)
        if plain:
            raise self.fail("settings", "a field named like a credential is typed str: "
                                        + ", ".join(plain) + ". Type it SecretStr, so the "
                                        "router masks it in logs, dry runs and dead letters "
                                        "and this suite checks it never reaches a payload; "
                                        "if it is no secret, give it json_schema_extra="
                                        "{\"secret\": False}")
        lax = _ignoring_unknown_keys(self.destination_cls.Settings)
        if lax:
            raise self.fail("settings", "settings models that ignore keys they do not have "
                                        "(pydantic's default): " + ", ".join(lax) + ". A "
                                        "misspelt setting in a config would pass router check "
                                        "and be lost; give each model_config = ConfigDict("
                                        "extra=\"forbid\"), or extra=\"allow\" where other "
                                        "keys are meant")

    def _check_declarations(self) -> None:
        cls = self.destination_cls
        name = getattr(cls, "plugin_name", None)
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise self.fail("settings", f"plugin_name must be an identifier, got {name!r}")
        settings_model = getattr(cls, "Settings", None)
        if not (isinstance(settings_model, type) and issubclass(settings_model, BaseModel)):
            raise self.fail("settings", "Settings must be a pydantic model class")
        if not isinstance(getattr(cls, "delivery", None), DeliveryDefaults):
            raise self.fail("settings", "delivery must be a DeliveryDefaults")

    def check_sample_events(self) -> None:
        """The kit's sample and edge events and the suite's extra ones, one by one."""
        fresh = self.harness.fresh()
        sent = [payload for raw in [*sample_events(), *edge_events(), *map(dict, self.events)]
                for payload in self._check_event("sample_events", raw, fresh)]
        if not sent:
            raise self.fail("sample_events", "no sample event gave a payload (translate skipped "
                                             "or returned [] for every one), so batching, "
                                             "requests and answers could not be checked")
        if self.dedup_id is not None:
            self._check_dedup_ids_differ()

    def check_any_valid_event(self) -> None:
        """Property-based: any valid event of any call type, drawn by hypothesis."""
        fresh = self.harness.fresh()
        name = self.harness.name
        option_objects = st.dictionaries(texts(max_size=24), json_values(max_leaves=4),
                                         max_size=3)

        def any_valid_event(raw: dict[str, Any], data: st.DataObject) -> None:
            if data.draw(st.integers(0, 4), label="name the destination") == 0:
                options = data.draw(option_objects, label="options")
                raw = {**raw, "integrations": {**(raw.get("integrations") or {}), name: options}}
            self._check_event("any_valid_event", raw, fresh)

        # Hypothesis keys its example database by the test function; this one function
        # checks every destination, so add the class to the key (as hypothesis's own pytest
        # plugin does for parametrized tests): a failure found for one destination is
        # replayed first on its next run, not on another destination.
        cls = self.destination_cls
        any_valid_event._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
            f"{cls.__module__}.{cls.__qualname__}".encode())
        test = given(raw=raw_events(), data=st.data())(any_valid_event)
        self._hypothesis_settings()(test)()

    def check_batching(self) -> None:
        """A request adds a fixed envelope to the bodies of its payloads, whatever their
        number. The core fills a batch up to ``batch_bytes`` of payload bodies (and a
        separator each), and the plugin declares ``batch_bytes`` as the vendor's limit less
        its envelope, so bytes added per payload in ``build_request`` beyond those declared
        in ``payload_overhead`` would take a full batch over the vendor's limit: a 413 for
        every batch. The envelope is measured on a full batch of each group's sample
        payloads and on half of it."""
        delivery = self.harness.delivery
        for group, payloads in self._sample_payloads_by_group().items():
            full = list(itertools.islice(itertools.cycle(payloads), delivery.batch_size))
            batch = batches([self.harness.spooled(payload) for payload in full], delivery)[0]
            if len(batch) < 2:
                continue
            half = batch[:len(batch) // 2]
            (small, _), (large, request) = self._envelope(half, full), self._envelope(batch, full)
            if self.dedup_id is not None:
                self._check_all_sent(request, full[:len(batch)], group)
            added = len(batch) - len(half)
            if large - small > ENVELOPE_SLACK + added * delivery.payload_overhead:
                raise self.fail("batching", f"build_request adds about "
                                            f"{(large - small) / added:.0f} bytes per payload "
                                            f"of group {group!r} to their bodies ({small} "
                                            f"bytes of envelope for {len(half)} payloads, "
                                            f"{large} for {len(batch)}), over the "
                                            f"{delivery.payload_overhead} declared in "
                                            "delivery.payload_overhead: a batch the core fills "
                                            "to delivery.batch_bytes would build a request "
                                            "over the vendor's limit. Declare them there, or "
                                            "put them in the payload's body")

    def _envelope(self, batch: list[Payload], originals: list[Payload]
                  ) -> tuple[int, HttpRequest]:
        """The bytes a batch's request body carries beyond its payloads' bodies and their
        separators, as the core counts them; and the request."""
        request = self._build("batching", batch, event=None, typed_errors_allowed=False)
        assert request is not None
        bodies = sum(len(orjson.dumps(payload.body)) + 1 for payload in originals[:len(batch)])
        return len(decoded_body(request)) - bodies + 1, request

    def _check_all_sent(self, request: HttpRequest, payloads: list[Payload], group: str
                        ) -> None:
        """Every payload of a batch is in its request: the router counts each one delivered
        when the vendor accepts the request, so one left out is lost without a word."""
        assert self.dedup_id is not None
        forms = _readable_forms(decoded_body(request))
        for index, payload in enumerate(payloads):
            dedup_id = self.dedup_id(spooled(payload).body)
            if not all(any(part in form for form in forms) for part in _json_leaves(dedup_id)):
                raise self.fail("batching", f"build_request left payload {index} of a batch of "
                                            f"{len(payloads)} (group {group!r}) out of its "
                                            f"request: its dedup id {dedup_id!r} is not in the "
                                            "body, yet the router counts every payload of an "
                                            "accepted request delivered")

    def check_read_response(self) -> None:
        """Ordinary answers are judged without raising, one outcome per payload."""
        destination = self.harness.destination
        for group, payloads in self._sample_payloads_by_group().items():
            batch = batches([self.harness.spooled(payload) for payload in payloads],
                            self.harness.delivery)[0]
            for status, body, headers in READ_RESPONSE_ANSWERS:
                response = answer(status, {"Content-Type": "application/json", **headers},
                                  body)
                where = f"HTTP {status} with body {body[:40]!r} and headers {headers} for " \
                        f"{len(batch)} payloads of group {group!r}"
                try:
                    judged = destination.read_response(batch, response)
                except Exception as exc:
                    raise self.fail("read_response", f"read_response raised "
                                                     f"{_raised(exc)} on {where}; "
                                                     "return outcomes instead") from exc
                if judged is None:
                    continue
                problem = outcomes_problem(list(judged), len(batch))
                if problem:
                    raise self.fail("read_response", f"read_response returned {problem} on "
                                                     f"{where}")

    # -- per event --------------------------------------------------------------------------

    def _check_event(self, rule: str, raw: dict[str, Any], fresh: DestinationHarness[Any]
                     ) -> list[Payload]:
        """Every per-event rule on one raw event; its payloads ([] when skipped)."""
        if not raw.get("messageId"):
            raw = {**raw, "messageId": FIXED_MESSAGE_ID}  # parse_event would draw a uuid4
        harness = self.harness
        event = harness.event(raw)
        options = harness.options_for(event)
        payloads = self._translate(rule, harness, event, options)
        if payloads is None:
            return []
        self._check_payloads(rule, event, payloads)

        for again, how in ((self._translate(rule, harness, event, options), "a second call"),
                           (self._translate(rule, fresh, event, options), "a new instance"),
                           (self._translate(rule, harness, harness.event(raw), options),
                            "the same raw event parsed again")):
            if again != payloads:
                raise self.fail(rule, f"translate is not deterministic: {how} gave other "
                                      f"payloads{_first_difference(payloads, again or [])}; "
                                      "vendor dedup ids and retries rely on it", event)
        if self.dedup_id is not None:
            self._check_dedup_id(rule, event, payloads)

        spool = [harness.spooled(payload) for payload in payloads]
        for batch in [[payload] for payload in spool] + batches(spool, harness.delivery):
            request = self._build(rule, batch, event)
            if self._build(rule, batch, event) != request:
                raise self.fail(rule, "build_request is not deterministic: two calls on the "
                                      "same payloads built different requests", event)
        return payloads

    def _translate(self, rule: str, harness: DestinationHarness[Any], event: Event,
                   options: Mapping[str, Any]) -> list[Payload] | None:
        # The model's own fields, not to_dict (built once per event, without an empty map
        # the call type does not have): a change to either would go unseen there.
        before = copy.deepcopy(event.model_dump())
        try:
            refuse_unread_amounts(harness.destination, event)  # as the router does
            payloads = harness.destination.translate(event, options)
        except (SkipEvent, EventRejected) as exc:
            if not isinstance(exc.reason, str) or not exc.reason.strip():
                raise self.fail(rule, f"{type(exc).__name__} needs a reason people can read",
                                event) from exc
            return None
        except Exception as exc:
            raise self.fail(rule, f"translate raised {_raised(exc)}; only "
                                  "SkipEvent or EventRejected may escape translate (the router "
                                  "reports anything else as a plugin failure)", event) from exc
        if event.model_dump() != before:
            raise self.fail(rule, "translate modified the event; the router hands the same "
                                  "Event to every destination, so copy before changing it",
                            event)
        problem = payloads_problem(payloads)  # as returned: the router refuses a generator
        if problem:
            raise self.fail(rule, f"translate returned {problem}", event)
        return list(payloads)

    def _check_payloads(self, rule: str, event: Event, payloads: list[Payload]) -> None:
        event_text = orjson.dumps(event.to_dict(), default=str).decode()
        secrets = [s for s in self.harness.secrets() if s not in event_text]
        for index, payload in enumerate(payloads):
            try:
                text = orjson.dumps(payload.body).decode()
            except TypeError as exc:
                raise self.fail(rule, f"payload {index} body is not serializable by orjson "
                                      f"({exc}); bodies go to the spool as JSON", event) from exc
            for secret in secrets:
                for place, content in (("body", text), ("group", payload.group)):
                    if secret in content or _json_escaped(secret) in content or \
                            any(secret in decoded for decoded in _base64_decoded(content)):
                        raise self.fail(rule, f"a secret from the settings is in payload "
                                              f"{index}'s {place}; payloads are stored in the "
                                              "spool and dead letters, so credentials belong "
                                              "in build_request", event)

    def _build(self, rule: str, batch: list[Payload], event: Event | None, *,
               typed_errors_allowed: bool = True) -> HttpRequest | None:
        """The request for a batch, checked; None when build_request raised a typed error
        (the core turns it into a retry or a dead letter), where that is allowed."""
        try:
            request = self.harness.destination.build_request(batch)
        except DestinationError as exc:
            if typed_errors_allowed:
                return None
            raise self.fail(rule, f"build_request refused {len(batch)} payload(s) of group "
                                  f"{batch[0].group!r}: {type(exc).__name__}: {exc.reason}",
                            event) from exc
        except Exception as exc:
            raise self.fail(rule, f"build_request raised {_raised(exc)} on "
                                  f"{len(batch)} payload(s) of group {batch[0].group!r}; only "
                                  "DestinationError may escape it", event) from exc
        problem = _request_problem(request)
        if problem:
            raise self.fail(rule, f"build_request returned {problem}", event)
        return request

    # -- dedup ids --------------------------------------------------------------------------

    def _check_dedup_id(self, rule: str, event: Event, payloads: list[Payload]) -> None:
        assert self.dedup_id is not None
        for index, payload in enumerate(payloads):
            try:
                value = self.dedup_id(spooled(payload).body)
            except Exception as exc:
                raise self.fail(rule, f"the dedup id of payload {index} cannot be read "
                                      f"({type(exc).__name__}: {exc})", event) from exc
            if value is None or value == "":
                raise self.fail(rule, f"payload {index} has no vendor dedup id", event)

    def _check_dedup_ids_differ(self) -> None:
        """Two events that differ only in ``messageId`` must not share a dedup id, or the
        vendor would drop the second as a repeat of the first."""
        assert self.dedup_id is not None
        harness = self.harness
        for raw in sample_events():
            first = {**raw, "messageId": "conformance-first-0001"}
            second = {**raw, "messageId": "conformance-second-0002"}
            try:
                ones, twos = harness.payloads(first), harness.payloads(second)
            except (SkipEvent, EventRejected):
                continue
            ids_one = {orjson.dumps(self.dedup_id(spooled(p).body)) for p in ones}
            ids_two = {orjson.dumps(self.dedup_id(spooled(p).body)) for p in twos}
            if ids_one & ids_two:
                raise self.fail("sample_events", "two events differing only in messageId share "
                                                 "a vendor dedup id; derive it from messageId",
                                harness.event(first))

    # -- helpers ----------------------------------------------------------------------------

    def _sample_payloads_by_group(self) -> dict[str, list[Payload]]:
        by_group: dict[str, list[Payload]] = {}
        for raw in [*sample_events(), *map(dict, self.events)]:
            try:
                payloads = self.harness.payloads(raw)
            except (SkipEvent, EventRejected):
                continue
            for payload in payloads:
                by_group.setdefault(payload.group, []).append(payload)
        return by_group

    def _hypothesis_settings(self) -> hypothesis_settings_cls:
        if self.hypothesis_settings is not None:
            return self.hypothesis_settings
        # The rest (example database, derandomize, verbosity) comes from the caller's
        # hypothesis profile. One failure is reported, not a group of them, so callers see
        # the ConformanceFailure (an AssertionError) itself.
        return hypothesis_settings_cls(
            max_examples=self.examples, deadline=None, report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much])


def check_destination(destination_cls: type[Destination[Any]], settings: Mapping[str, Any], *,
                      examples: int = 200, dedup_id: DedupId | None = None,
                      events: Sequence[Mapping[str, Any]] = (),
                      rules: Iterable[str] | None = None) -> None:
    """Run the conformance suite (every rule, or ``rules``) on one destination; raises
    ``AssertionError`` (a ``ConformanceFailure``) naming the rule and the event broken."""
    ConformanceSuite(destination_cls, settings, examples=examples, dedup_id=dedup_id,
                     events=events).run(rules)


# -- pure helpers ---------------------------------------------------------------------------

def _all_fields(model: type[BaseModel], prefix: str = "", seen: set[type] | None = None
                ) -> Iterator[tuple[str, FieldInfo]]:
    """Every field of ``model`` by its dotted name, nested models included (each once)."""
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        yield prefix + name, info
        for nested in _models_in(info.annotation):
            yield from _all_fields(nested, f"{prefix}{name}.", seen)


def _ignoring_unknown_keys(model: type[BaseModel]) -> list[str]:
    """``model`` and the models nested in it, by name, that leave pydantic's ``extra`` unset,
    so that a key they do not have is dropped without a word."""
    models = [model] + [nested for _, info in _all_fields(model)
                        for nested in _models_in(info.annotation)]
    return list(dict.fromkeys(m.__name__ for m in models if "extra" not in m.model_config))


def _undocumented_fields(model: type[BaseModel]) -> list[str]:
    """Dotted names of fields without a description."""
    return [name for name, info in _all_fields(model)
            if not (info.description and info.description.strip())]


_CREDENTIAL_WORDS = frozenset({"secret", "secrets", "password", "passwords", "passwd", "token",
                               "tokens", "apikey", "credential", "credentials", "auth",
                               "authorization", "bearer"})
_CREDENTIAL_KEYS = frozenset({"api", "access", "private", "write", "secret", "signing",
                              "license"})  # ``api_key`` and the like, not ``group_key``


def _plain_credentials(model: type[BaseModel]) -> list[str]:
    """Dotted names of fields that look like credentials (``api_key``, ``access_token``,
    ``password``...) but accept a plain ``str``: a plain string is neither masked by the
    router nor checked by the suite. ``json_schema_extra={"secret": False}`` says a field so
    named is no secret."""
    return [name for name, info in _all_fields(model)
            if _named_like_a_credential(name.rpartition(".")[2])
            and _admits_str(info.annotation)
            and not (isinstance(info.json_schema_extra, dict)
                     and info.json_schema_extra.get("secret") is False)]


def _named_like_a_credential(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().split("_")  # accessToken too
    return bool(_CREDENTIAL_WORDS.intersection(words)) or any(
        word == "key" and index > 0 and words[index - 1] in _CREDENTIAL_KEYS
        for index, word in enumerate(words))


def _admits_str(annotation: Any) -> bool:
    """Whether a value of ``annotation`` may be a plain ``str``: itself, an option of a
    union, an item of a list or set, a value of a dict (not its keys: ``dict[str,
    SecretStr]`` holds secrets)."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (dict, Mapping):
        args = args[1:]
    return any(_admits_str(arg) for arg in args)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _request_problem(request: Any) -> str | None:
    """What is wrong with what build_request returned, or None: what the router checks
    before sending it, and the suite's stricter rules beside."""
    problem = request_problem(request)
    if problem:
        return problem
    if not request.method.isupper():
        return f"a method {request.method!r}; expected an upper-case HTTP method"
    if not request.url.startswith(("http://", "https://")):
        return f"a URL {request.url!r:.120}; expected an http:// or https:// URL"
    if request.body is not None and not isinstance(request.body, bytes):
        return f"a {type(request.body).__name__} body; expected bytes or None"
    return None


def _json_escaped(text: str) -> str:
    return orjson.dumps(text).decode()[1:-1]


_BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")


def _readable_forms(body: bytes) -> list[bytes]:
    """A request body as sent and as a vendor reads it: form-decoded, and each base64 run
    decoded (Mixpanel's classic ``data=<base64 JSON>``), so a dedup id is found inside."""
    text = urllib.parse.unquote_plus(body.decode("utf-8", errors="replace"))
    return [body, text.encode(), *(decoded.encode() for decoded in _base64_decoded(text))]


def _base64_decoded(text: str) -> Iterator[str]:
    """What each base64-looking run of ``text`` decodes to: a secret is as exposed inside
    ``Basic <base64 of key:>`` as in plain text."""
    for match in _BASE64_TOKEN.finditer(text):
        token = match.group().rstrip("=")
        padded = token + "=" * (-len(token) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                yield decode(padded).decode("utf-8", errors="ignore")
            except ValueError:
                continue


def _first_difference(first: Sequence[Payload], second: Sequence[Payload]) -> str:
    if len(first) != len(second):
        return f" ({len(first)} payloads, then {len(second)})"
    for index, (one, two) in enumerate(zip(first, second)):
        if one != two:
            return f" (payload {index}: {_short(one)} then {_short(two)})"
    return ""


def _short(payload: Payload) -> str:
    text = orjson.dumps(payload.body, default=str).decode() \
        if isinstance(payload, Payload) else repr(payload)
    return text if len(text) <= 300 else text[:300] + "…"


def conformance_test(destination_cls: type[Destination[Any]], settings: Mapping[str, Any], *,
                     examples: int = 200, dedup_id: DedupId | None = None,
                     events: Sequence[Mapping[str, Any]] = (),
                     rules: Iterable[str] | None = None) -> Callable[[str], None]:
    """The suite as a pytest test function, parametrized by rule (``test_conformance[settings]``,
    ``[sample_events]``, ``[any_valid_event]``, ...), so a report names the rule that broke.

    Assign it to a module-level name starting with ``test``::

        test_conformance = conformance_test(Acme, settings={"api_key": "acme-key-0001"})

    The arguments are those of ``check_destination``.
    """
    import pytest  # here, so the rest of the suite runs without pytest

    suite = ConformanceSuite(destination_cls, settings, examples=examples, dedup_id=dedup_id,
                             events=events)
    chosen = tuple(rules) if rules is not None else ConformanceSuite.RULES

    @pytest.mark.parametrize("rule", chosen)
    def test_conformance(rule: str) -> None:
        try:
            suite.run([rule])
        except ConformanceFailure as failure:
            # The failure says what broke and on which event; the suite's own frames would
            # only bury it in a long traceback.
            raise failure.with_traceback(None) from None

    test_conformance.__doc__ = f"{destination_cls.__name__} follows the destination contract."
    return test_conformance


def _json_leaves(value: Any) -> list[bytes]:
    """The strings and numbers inside a dedup id, as JSON writes them in a body (a string
    without its quotes): an id may be a pair, such as Meta's event name and event id."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _json_leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _json_leaves(item)]
    text = orjson.dumps(value)
    return [text[1:-1] if text.startswith(b'"') else text]
