"""Counters, gauges and histograms, rendered in the Prometheus text format.

Small on purpose (no client library needed for a handful of series): each metric keeps its
values by label tuple; ``render`` writes the exposition format that ``GET /metrics`` serves.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
DELIVERY_LATENCY_BUCKETS = (*LATENCY_BUCKETS[:-2], 120, 300, 600, 900, 1800, 3600, 7200, 14400)
"""Acceptance to delivery, which an outage stretches to ``max_age`` (4 h by default): with
nothing between 60 s and 300 s nor above 1,800 s, ``histogram_quantile`` put the p99 of a
150 s outage at 296 s and of a longer one at 1,743 s, while the oldest job was 572 s old
(observability audit)."""


Sample = tuple[str, tuple[str, ...], tuple[str, ...], float]
"""A series' name suffix, label names, label values and number."""


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)

    def samples(self) -> Iterable[Sample]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for suffix, names, values, number in self.samples():
            label_text = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))
            lines.append(f"{self.name}{suffix}{{{label_text}}} {_number(number)}"
                         if label_text else f"{self.name}{suffix} {_number(number)}")
        return "\n".join(lines) + "\n"


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        self.values[label_values] = self.values.get(label_values, 0) + amount

    def get(self, *label_values: str) -> float:
        return self.values.get(label_values, 0)

    def samples(self) -> Iterator[Sample]:
        for values, number in sorted(self.values.items()):
            yield "", self.labels, values, number


class Gauge(Metric):
    """A value read when scraped, from a callback returning ``{label values: number}``.
    With ``kind="counter"``, a total kept elsewhere (a process's CPU seconds) read the same
    way."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str],
                 read: Callable[[], dict[tuple[str, ...], float]], *, kind: str = "gauge"
                 ) -> None:
        super().__init__(name, help_text, labels)
        self.read = read
        self.kind = kind

    def samples(self) -> Iterator[Sample]:
        for values, number in sorted(self.read().items()):
            yield "", self.labels, values, number


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts, then sum, count

    def observe(self, value: float, *label_values: str, count: int = 1) -> None:
        """Record ``value`` (``count`` times: a batch's jobs accepted together share one
        age)."""
        series = self.series.get(label_values)
        if series is None:
            series = self.series[label_values] = [0.0] * (len(self.buckets) + 2)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            series[index] += count
        series[-2] += value * count
        series[-1] += count

    def samples(self) -> Iterator[Sample]:
        names = (*self.labels, "le")
        for values, series in sorted(self.series.items()):
            cumulative = 0.0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                yield "_bucket", names, (*values, _number(bound)), cumulative
            yield "_bucket", names, (*values, "+Inf"), series[-1]
            yield "_sum", self.labels, values, series[-2]
            yield "_count", self.labels, values, series[-1]


M = TypeVar("M", bound=Metric)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(metric.render() for metric in self.metrics)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
