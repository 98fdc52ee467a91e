"""The test kit for destination-plugin authors (and the core's own tests).

- ``FakeDestinationServer``, ``Answer``: a real HTTP server on 127.0.0.1 that records requests
  and answers from a script.
- ``DestinationHarness``: one destination driven by hand; events in, exact requests out,
  answers judged as the router would.
- ``check_destination``: the conformance suite every destination must pass.
- ``dead_letters(router)``: what a ``Router`` dead-lettered, as ``DeadLetterRecord``s, for a
  test that delivers through the router to a fake server.
- ``make_event``, ``sample_events``, ``edge_events``: realistic and unusual raw events;
  ``router.testing.strategies``: hypothesis strategies for any valid event.
- ``conformance_test``: the suite as a pytest test, one line in a test module;
  ``router.testing.pytest_plugin``: the ``fake_destination`` and ``destination_harness`` fixtures
  (``HarnessFactory`` is the latter's type).

Needs the testing extras (``pip install event-router[testing]``): hypothesis, pytest,
pytest-asyncio. The conformance suite, which needs hypothesis, is imported when first asked
for, so that ``python -m router.testing.sink`` (the sink ``config/router.yaml`` shows the
fan-out with) runs on a plain install.
"""

from typing import TYPE_CHECKING, Any

from router.testing.dead_lettered import DeadLetterRecord, dead_letters
from router.testing.events import (RECEIVED_AT, describe_event, edge_events, make_event,
                                   sample_events)
from router.testing.fake_server import Answer, FakeDestinationServer, RecordedRequest
from router.testing.harness import (DestinationHarness, HarnessFactory, batches,
                                    classify_status, requests_from, shown, spooled)

__all__ = [
    "RECEIVED_AT", "Answer", "ConformanceFailure", "ConformanceSuite", "DeadLetterRecord",
    "DestinationHarness", "FakeDestinationServer", "HarnessFactory", "RecordedRequest",
    "batches", "check_destination", "classify_status", "conformance_test", "dead_letters",
    "describe_event", "edge_events", "make_event", "sample_events", "requests_from", "shown",
    "spooled",
]

_CONFORMANCE = frozenset({"ConformanceFailure", "ConformanceSuite", "check_destination",
                          "conformance_test"})

if TYPE_CHECKING:
    from router.testing.conformance import (ConformanceFailure, ConformanceSuite,
                                            check_destination, conformance_test)


def __getattr__(name: str) -> Any:
    if name in _CONFORMANCE:
        from router.testing import conformance
        return getattr(conformance, name)
    raise AttributeError(f"module 'router.testing' has no attribute {name!r}")
