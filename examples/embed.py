"""Embedding the router in an ingestion service: the README's example, runnable.

    python examples/embed.py [config/router.yaml]
"""

import asyncio
import sys

from router import Router


async def main(config: str) -> None:
    async with Router.from_file(config) as router:
        result = await router.route({
            "type": "track", "event": "Signed Up", "userId": "user-42",
            "properties": {"plan": "pro", "value": "9.99", "currency": "USD"},
            "context": {"page": {"url": "https://example.com/signup"},
                        "userAgent": "Mozilla/5.0"},
        })
        for outcome in result.results:
            print(outcome.destination, outcome.status, outcome.reason)
        # route() returns once the event is durable; delivery goes on in the background.
        # A script about to exit waits for it (a service just carries on).
        print("delivered:", await router.drain(timeout=10))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "config/router.yaml"))
