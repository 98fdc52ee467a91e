"""The delivery metrics every worker updates; ``/metrics`` renders them."""

from __future__ import annotations

from router.metrics import Counter, Histogram, Registry


class DeliveryMetrics:
    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        add = self.registry.add
        self.delivered: Counter = add(Counter(  # type: ignore[assignment]
            "router_delivered_total", "Jobs delivered, by destination.", ["destination"]))
        self.retried: Counter = add(Counter(  # type: ignore[assignment]
            "router_retried_total", "Failed attempts that will be retried.", ["destination"]))
        self.dead_lettered: Counter = add(Counter(  # type: ignore[assignment]
            "router_dead_lettered_total", "Jobs moved to the dead-letter store.",
            ["destination"]))
        self.requests: Counter = add(Counter(  # type: ignore[assignment]
            "router_requests_total", "HTTP requests sent, by destination and status "
            "(error: no response).", ["destination", "status"]))
        self.request_seconds: Histogram = add(Histogram(  # type: ignore[assignment]
            "router_request_seconds", "Time for one request to a destination.",
            ["destination"]))
        self.latency: Histogram = add(Histogram(  # type: ignore[assignment]
            "router_delivery_latency_seconds", "From acceptance to delivery.",
            ["destination"]))
