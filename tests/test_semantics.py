"""Names with a meaning in the spec: which track events ask for a user-level operation."""

from __future__ import annotations

import pytest

from router.events import parse_event
from router.semantics import semantic_action


@pytest.mark.parametrize("name, action", [
    ("Delete Person", "delete"), ("User Deleted", "delete"),
    ("Suppress Person", "suppress"), ("User Suppressed", "suppress"),
    ("Unsuppress Person", "unsuppress"), ("User Unsuppressed", "unsuppress"),
    ("Order Completed", None), ("user deleted", None)])
def test_a_track_event_asks_for_the_operation_its_name_says(name, action):
    assert semantic_action(parse_event({"type": "track", "event": name, "userId": "u1"})) == action


@pytest.mark.parametrize("raw", [
    {"type": "identify", "userId": "u1", "event": "User Deleted"},
    {"type": "page", "userId": "u1", "event": "Delete Person"},
    {"type": "group", "userId": "u1", "groupId": "g1", "event": "User Suppressed"}])
def test_only_a_track_event_asks_for_one(raw):
    # An identify that happens to carry an "event" field deleted the person in each
    # destination that acts on it (mutation audit: the call type check went unnoticed)
    assert semantic_action(parse_event(raw)) is None
