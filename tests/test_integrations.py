"""The integrations map: which destinations an event asks for (contract, "The integrations map")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.integrations import IntegrationsMap, decide

ON, OFF = True, False

# (integrations, destination name, default_on, enabled, options when enabled)
TABLE = [
    # absent / null / empty: everything on
    (None, "Slack", True, ON, {}),
    ({}, "Slack", True, ON, {}),
    # All
    ({"All": True}, "Slack", True, ON, {}),
    ({"All": False}, "Slack", True, OFF, None),
    ({"All": False, "Slack": True}, "Slack", True, ON, {}),
    ({"All": False, "Mixpanel": True}, "Slack", True, OFF, None),
    ({"All": True, "Slack": False}, "Slack", True, OFF, None),
    ({"All": True, "Mixpanel": False}, "Slack", True, ON, {}),
    ({"Slack": False}, "Slack", True, OFF, None),
    ({"Mixpanel": False}, "Slack", True, ON, {}),
    # names match case-insensitively, both ways
    ({"slack": False}, "Slack", True, OFF, None),
    ({"SLACK": False}, "slack", True, OFF, None),
    ({"All": False, "sLaCk": True}, "Slack", True, ON, {}),
    ({"All": False, "google analytics 4": True}, "Google Analytics 4", True, ON, {}),
    ({"All": False, "Google Analytics": True}, "Google Analytics 4", True, OFF, None),
    # an object means enabled, handed over as per-event options
    ({"Mixpanel": {"project_token_override": "abc"}}, "Mixpanel", True, ON,
     {"project_token_override": "abc"}),
    ({"All": False, "mixpanel": {"a": 1}}, "Mixpanel", True, ON, {"a": 1}),
    ({"All": False, "Mixpanel": {}}, "Mixpanel", True, ON, {}),
    # truthy values other than true enable; falsy values do not (with "All": false)
    ({"All": False, "Slack": 1}, "Slack", True, ON, {}),
    ({"All": False, "Slack": "yes"}, "Slack", True, ON, {}),
    ({"All": False, "Slack": 0}, "Slack", True, OFF, None),
    ({"All": False, "Slack": ""}, "Slack", True, OFF, None),
    ({"All": False, "Slack": None}, "Slack", True, OFF, None),
    ({"All": False, "Slack": []}, "Slack", True, OFF, None),
    # with "All": true only false turns a destination off: null is how some client
    # libraries write "not set"
    ({"Slack": None}, "Slack", True, ON, {}),
    ({"All": True, "Slack": None}, "Slack", True, ON, {}),
    ({"Slack": 0}, "Slack", True, ON, {}),
    ({"Slack": ""}, "Slack", True, ON, {}),
    # "All" is a key like the others: its case does not matter either
    ({"all": False}, "Slack", True, OFF, None),
    ({"ALL": False, "slack": True}, "Slack", True, ON, {}),
    # default_on: false needs a truthy key, even with "All": true
    (None, "Audit", False, OFF, None),
    ({}, "Audit", False, OFF, None),
    ({"All": True}, "Audit", False, OFF, None),
    ({"All": True, "Slack": True}, "Audit", False, OFF, None),
    ({"Audit": True}, "Audit", False, ON, {}),
    ({"All": True, "audit": True}, "Audit", False, ON, {}),
    ({"All": False, "AUDIT": True}, "Audit", False, ON, {}),
    ({"Audit": {"priority": "high"}}, "Audit", False, ON, {"priority": "high"}),
    ({"All": True, "Audit": False}, "Audit", False, OFF, None),
    ({"Audit": 0}, "Audit", False, OFF, None),
    ({"Audit": None}, "Audit", False, OFF, None),
]


@pytest.mark.parametrize("integrations, name, default_on, enabled, options", TABLE)
def test_integrations_rules(integrations, name, default_on, enabled, options):
    decision = decide(integrations, name, default_on=default_on)
    assert decision.enabled is enabled
    if enabled:
        assert dict(decision.options) == options
    else:
        assert decision.reason, "a skipped destination needs a reason people can read"
        assert name in decision.reason


@pytest.mark.parametrize("integrations, name, default_on, enabled, options",
                         [*TABLE, ({"All": True}, "Audit", True, ON, {}),
                          ({"all": None}, "Audit", True, ON, {})])
def test_the_decision_routing_takes_without_asking_is_the_one_decide_gives(
        integrations, name, default_on, enabled, options):
    # Routing takes if_on_by_default for a destination on by default, when the map has one,
    # instead of asking decide: it must be what decide would have said, for every map.
    shortcut = IntegrationsMap(integrations).if_on_by_default
    if default_on and shortcut is not None:
        assert shortcut == decide(integrations, name, default_on=True)
    assert (shortcut is not None) == (not integrations or (
        all(key.lower() == "all" for key in integrations) and
        all(value is not False for value in integrations.values())))


def test_one_map_decides_for_many_destinations():
    integrations = IntegrationsMap({"All": False, "slack": True, "Mixpanel": {"x": 1}})
    assert integrations.decide("Slack").enabled
    assert dict(integrations.decide("MIXPANEL").options) == {"x": 1}
    assert not integrations.decide("Amplitude").enabled
    assert not integrations.decide("Braze", default_on=False).enabled


def test_reason_for_all_false_mentions_the_map():
    assert "All" in decide({"All": False}, "Slack").reason


def test_reason_for_default_off_says_so():
    assert "default" in decide(None, "Audit", default_on=False).reason


def test_null_is_not_set_in_the_reason_too():
    # `"Audit": null` left Audit off, rightly, but said the map turned it off
    assert decide({"Audit": None}, "Audit", default_on=False).reason == \
        decide({}, "Audit", default_on=False).reason
    assert decide({"All": False, "Slack": None}, "Slack").reason == \
        decide({"All": False}, "Slack").reason


# -- properties -----------------------------------------------------------------------------------

NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.éüÅ"
names = st.text(NAME_ALPHABET, min_size=1, max_size=16).filter(lambda n: n.lower() != "all")
truthy = st.sampled_from([True, 1, "yes", [1]]) | st.dictionaries(
    st.text(max_size=5), st.integers(), min_size=1, max_size=3)
falsy = st.sampled_from([False, 0, "", None, []])
any_value = truthy | falsy | st.just({})


@st.composite
def random_case(draw, name: str) -> str:
    return "".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in name)


@st.composite
def others(draw, name: str):
    """Keys naming other destinations (never ``name``), with any values."""
    return draw(st.dictionaries(names.filter(lambda k: k.lower() != name.lower()), any_value,
                                max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.data(), names, st.sampled_from([None, True, False]), st.booleans())
def test_a_destination_named_with_false_is_never_enabled(data, name, all_value, default_on):
    integrations = data.draw(others(name))
    integrations[data.draw(random_case(name))] = False
    if all_value is not None:
        integrations["All"] = all_value
    assert not decide(integrations, name, default_on=default_on).enabled


@settings(max_examples=200, deadline=None)
@given(st.data(), names, st.sampled_from([None, True]), any_value)
def test_with_all_true_only_false_turns_a_destination_off(data, name, all_value, value):
    integrations = {**data.draw(others(name)), data.draw(random_case(name)): value}
    if all_value is not None:
        integrations["All"] = all_value
    assert decide(integrations, name).enabled is (value is not False)


@settings(max_examples=200, deadline=None)
@given(st.data(), names, st.booleans())
def test_with_all_false_only_truthy_named_destinations_are_enabled(data, name, default_on):
    integrations = {"All": False, **data.draw(others(name))}
    named = data.draw(st.none() | any_value)
    if named is not None or data.draw(st.booleans()):
        integrations[data.draw(random_case(name))] = named
    key_value = next((v for k, v in integrations.items() if k.lower() == name.lower()), False)
    expected = isinstance(key_value, dict) or bool(key_value)
    assert decide(integrations, name, default_on=default_on).enabled is expected


@settings(max_examples=200, deadline=None)
@given(st.data(), names, any_value, st.sampled_from([None, True, False]), st.booleans())
def test_case_of_the_key_never_matters(data, name, value, all_value, default_on):
    def build(key):
        integrations = {key: value}
        if all_value is not None:
            integrations["All"] = all_value
        return integrations

    exact = decide(build(name), name, default_on=default_on)
    varied = decide(build(data.draw(random_case(name))), data.draw(random_case(name)),
                    default_on=default_on)
    assert (varied.enabled, dict(varied.options)) == (exact.enabled, dict(exact.options))


@settings(max_examples=200, deadline=None)
@given(st.data(), names, st.sampled_from([None, True, False]), st.booleans(),
       st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_an_object_value_enables_and_is_handed_over_as_options(data, name, all_value, default_on,
                                                                options):
    integrations = {**data.draw(others(name)), data.draw(random_case(name)): options}
    if all_value is not None:
        integrations["All"] = all_value
    decision = decide(integrations, name, default_on=default_on)
    assert decision.enabled
    assert dict(decision.options) == options


@settings(max_examples=200, deadline=None)
@given(st.data(), names, st.sampled_from([None, True, False]), st.booleans())
def test_an_unnamed_destination_follows_all_and_its_default(data, name, all_value, default_on):
    integrations = data.draw(others(name))
    if all_value is not None:
        integrations["All"] = all_value
    expected = default_on and all_value is not False
    assert decide(integrations, name, default_on=default_on).enabled is expected
