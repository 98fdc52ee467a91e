"""A realistic mix of events for the benchmarks, as the bytes a client would send."""

from __future__ import annotations

import random
import uuid

import orjson

PAGES = ["/", "/pricing", "/blog/launch", "/docs/start", "/checkout"]
PRODUCTS = [{"product_id": f"p-{n}", "sku": f"SKU-{n}", "name": f"Product {n}",
             "price": round(5 + n * 1.25, 2), "quantity": 1 + n % 3, "category": "Games"}
            for n in range(8)]


def event_mix(count: int, *, seed: int = 7, users: int = 5000) -> list[bytes]:
    """``count`` serialized events: 55% track (a fifth of them commerce), 25% page,
    10% identify, 5% screen, 3% group, 2% alias; a third anonymous. Each messageId is a
    random UUID, as analytics libraries make them: the dedup index sees keys in no order,
    which costs SQLite far more than ids that count up."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        user = f"user-{rng.randrange(users)}"
        anonymous = f"anon-{rng.randrange(users * 3)}"
        ids = {"anonymousId": anonymous} if rng.random() < 0.33 else {"userId": user,
                                                                        "anonymousId": anonymous}
        context = {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
                   "library": {"name": "analytics.js", "version": "2.11.1"},
                   "page": {"url": "https://shop.example" + rng.choice(PAGES),
                            "path": rng.choice(PAGES), "title": "Shop"}}
        roll = rng.random()
        message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        base = {"messageId": message_id, "sentAt": "2026-11-20T14:03:12.000Z",
                "timestamp": "2026-11-20T14:03:11.500Z", "context": context, **ids}
        if roll < 0.55:
            if rng.random() < 0.2:
                items = rng.sample(PRODUCTS, 2)
                event = {"type": "track", "event": "Order Completed", "properties": {
                    "order_id": f"o-{index}", "revenue": f"{sum(p['price'] for p in items):.2f}",
                    "currency": "eur", "products": items}}
            else:
                event = {"type": "track", "event": rng.choice(["Signed Up", "Video Played",
                                                               "Product Viewed", "Search"]),
                         "properties": {"plan": "pro", "position": rng.randrange(100),
                                        "value": rng.random() * 10}}
        elif roll < 0.80:
            event = {"type": "page", "name": "Shop", "properties": {"url": context["page"]["url"]}}
        elif roll < 0.90:
            event = {"type": "identify", "userId": user, "traits": {
                "email": f"{user}@example.com", "plan": "pro", "name": "Ada Lovelace"}}
        elif roll < 0.95:
            event = {"type": "screen", "name": "Home", "properties": {"variant": "a"}}
        elif roll < 0.98:
            event = {"type": "group", "userId": user, "groupId": f"g-{index % 50}",
                     "traits": {"name": "Acme Inc", "employees": 40}}
        else:
            event = {"type": "alias", "userId": user, "previousId": anonymous}
        out.append(orjson.dumps({**base, **event}))
    return out
