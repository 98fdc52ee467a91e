"""The kit as a pytest plugin. Opt in from a plugin package's tests (or its root conftest)::

    pytest_plugins = ["router.testing.pytest_plugin"]

and get:

- ``fake_destination``: a started ``FakeDestinationServer``, stopped after the test;
- ``destination_harness``: a factory, ``destination_harness(Acme, {"api_key": ...})``, whose
  type is ``router.testing.HarnessFactory``;
- ``conformance_test(...)`` (also importable from ``router.testing``): the conformance suite
  as one line of a test module, one test per rule, so a report names the rule that broke::

      test_conformance = conformance_test(Acme, settings={"api_key": "acme-key-0001"})

The async fixture needs pytest-asyncio (part of ``event-router[testing]``).

PYTEST_DONT_REWRITE: nothing here asserts, and a test module that imports
``conformance_test`` from here imports it before pytest would rewrite it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from router.testing.conformance import conformance_test
from router.testing.fake_server import FakeDestinationServer
from router.testing.harness import DestinationHarness, HarnessFactory

__all__ = ["conformance_test", "destination_harness", "fake_destination"]


@pytest_asyncio.fixture
async def fake_destination() -> AsyncIterator[FakeDestinationServer]:
    """A fake destination API on 127.0.0.1, recording requests; point settings at ``.url``."""
    async with FakeDestinationServer() as server:
        yield server


@pytest.fixture
def destination_harness() -> HarnessFactory:
    """``destination_harness(destination_cls, settings, **options)`` builds a
    ``DestinationHarness``: settings validated, events in, exact requests out. Annotate it
    as ``router.testing.HarnessFactory``."""
    return DestinationHarness
