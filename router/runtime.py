"""Interpreter settings for the processes the router owns (``router serve`` and its delivery
process), and for programs that embed the router and want the same throughput.

Every event allocates a few hundred objects that live for one batch. With CPython's default
thresholds (700, 10, 10) the cyclic garbage collector runs every few events, and each batch
in flight when it runs is promoted to an older generation, whose collections then walk every
long-lived object: the modules, pydantic's schemas, the plugins. Measured on the routing path
(bench/delivery.py), that was a fifth of the CPU. Freezing what exists once the router has
started takes those objects out of every collection, and a larger first threshold lets
short-lived objects die by reference counting before the collector ever sees them. The
router's own objects are acyclic, so collecting cycles less often holds little memory back.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (CPython's default: 700)."""


def tune_garbage_collector() -> None:
    """Call once the router has started: collect, freeze what is left (it lives as long as
    the process), and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, max(middle, 20), max(old, 20))
