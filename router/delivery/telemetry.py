"""The delivery metrics every worker updates; ``/metrics`` renders them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from router.metrics import DELIVERY_LATENCY_BUCKETS, Counter, Histogram, Metric, Registry


Snapshot = dict[str, dict[tuple[str, ...], Any]]
"""Series by metric name: a counter's value, or a histogram's bucket counts, sum and count."""


class DeliveryMetrics:
    def __init__(self, destinations: Iterable[str] = (), registry: Registry | None = None
                 ) -> None:
        self.registry = registry or Registry()
        add = self.registry.add
        self.delivered = add(Counter(
            "router_delivered_total", "Jobs delivered, by destination.", ["destination"]))
        self.retried = add(Counter(
            "router_retried_total", "Failed attempts that will be retried.", ["destination"]))
        self.dead_lettered = add(Counter(
            "router_dead_lettered_total", "Jobs moved to the dead-letter store.",
            ["destination"]))
        self.requests = add(Counter(
            "router_requests_total", "HTTP requests sent, by destination and status "
            "(error: no response).", ["destination", "status"]))
        self.resent = add(Counter(
            "router_requests_resent_total", "Requests sent once more on a new connection, "
            "their pooled one closed under them before any answer (not attempts).",
            ["destination"]))
        self.request_seconds = add(Histogram(
            "router_request_seconds", "Time for one request to a destination.",
            ["destination"]))
        self.latency = add(Histogram(
            "router_delivery_latency_seconds", "From acceptance to delivery.",
            ["destination"], buckets=DELIVERY_LATENCY_BUCKETS))
        # Each destination's outcome counters exist from the start, at 0: a ratio such as
        # dead-lettered / (delivered + dead-lettered) is empty in Prometheus, not 0 or 1,
        # while one of its series has never been counted.
        for name in destinations:
            for counter in (self.delivered, self.retried, self.dead_lettered):
                counter.values[(name,)] = 0

    def snapshot(self) -> Snapshot:
        """Every series by metric name: what a delivery process sends to the process that
        serves ``/metrics``. A copy down to each histogram's counts: the thread that sends it
        reads it while the event loop goes on counting."""
        return {metric.name: {labels: list(value) if isinstance(value, list) else value
                              for labels, value in _series(metric).items()}
                for metric in self.registry.metrics}

    def restore(self, snapshot: Snapshot, *, carried: Snapshot | None = None) -> None:
        """Take the values of a ``snapshot`` (the delivery process's, which owns them), added
        to ``carried``: what this router's delivery processes that have exited counted, so
        that a replacement, which starts from zero, does not reset the counts."""
        combined = added(carried, snapshot) if carried else snapshot
        for metric in self.registry.metrics:
            if metric.name in combined:
                series = _series(metric)
                series.clear()
                series.update(combined[metric.name])


def added(first: Snapshot, second: Snapshot) -> Snapshot:
    """The two snapshots' counts summed, series by series."""
    total: Snapshot = {name: dict(series) for name, series in first.items()}
    for name, series in second.items():
        into = total.setdefault(name, {})
        for labels, value in series.items():
            before = into.get(labels)
            if before is None:
                into[labels] = list(value) if isinstance(value, list) else value
            elif isinstance(value, list):
                into[labels] = [a + b for a, b in zip(before, value, strict=True)]
            else:
                into[labels] = before + value
    return total


def _series(metric: Metric) -> dict[tuple[str, ...], Any]:
    if isinstance(metric, Counter):
        return metric.values
    if isinstance(metric, Histogram):
        return metric.series
    raise TypeError(f"{metric.name} cannot be copied between processes")
