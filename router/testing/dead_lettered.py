"""What a ``Router`` dead-lettered, for a plugin's tests.

``Router.drain()`` says only that nothing is left queued: an event delivered and one the
vendor refused look the same. A test that means "Acme refused this event and it was
dead-lettered with this reason" reads the letters here, as ``router dlq list --json``
shows them to an operator, without reaching into the storage::

    async with Router(parse_config(config)) as router:
        await router.route(make_event("track", messageId="m-1"))
        assert await router.drain(timeout=10)
        (letter,) = await dead_letters(router, "Acme")
        assert (letter.message_id, letter.status) == ("m-1", 400)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.redaction import Masker
from router.storage.base import DeadLetterFilter

if TYPE_CHECKING:
    from router.routing import Router


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One dead letter: a payload a destination will not be sent again (until replayed),
    with why. Secrets are masked as in ``router dlq list --json``."""

    destination: str
    """The configured destination's name."""
    message_id: str
    """The ``messageId`` of the event the payload came from."""
    reason: str
    """Why: the ``PermanentError``'s reason from ``read_response``, the status the core
    judged (``HTTP 400: ...``), or what ran out (attempts, ``max_age``)."""
    status: int | None
    """The status of the last answer; None when there was none (a connection refused, a
    timeout, a request the plugin could not build)."""
    request: Mapping[str, Any] | None
    """The last request sent: ``method``, ``url`` and ``headers``; None when none was."""
    response: str | None
    """The start of the last answer's body."""
    attempts: int
    """How many times it was sent."""
    payload: Any
    """The payload's body as it was spooled (``Payload.body`` after its JSON round trip)."""


async def dead_letters(router: Router, destination: str | None = None
                       ) -> list[DeadLetterRecord]:
    """Every dead letter of ``router``'s storage, oldest first; only ``destination``'s when
    named (matched without regard to case, as the config's names are). Call it after
    ``router.drain()``: a payload still being retried is no letter yet."""
    letters = await router.storage.dead_letters(DeadLetterFilter(destination=destination),
                                                limit=sys.maxsize)
    # The letters hold the payload as spooled: a webhook body template may put a setting's
    # secret into it, which every letter shown to people has masked.
    masker = Masker.joined(configured.masker for configured in router.destinations)
    return [DeadLetterRecord(letter.destination, letter.message_id, letter.reason,
                             letter.status, letter.request, letter.response, letter.attempts,
                             masker.mask_json(letter.body))
            for letter in letters]
