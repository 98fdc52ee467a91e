"""The plugin contract: the hooks a destination package implements.

There is one hook on purpose. pluggy is used once, at start, to collect destination types;
per event the core calls the destination's own methods (``router.destination.Destination``),
which keeps the hot path free of the hook-call layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import pluggy

from router.destination import Destination

PROJECT = "router"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

RegisterDestination: TypeAlias = Callable[[type[Destination[Any]]], None]
"""The type of ``router_register_destinations``'s ``register``, exported as
``router.RegisterDestination`` so that a plugin annotates its hook (``mypy --strict`` asks
for it) without spelling out the callable or importing this module."""


@hookspec
def router_register_destinations(register: RegisterDestination) -> None:
    """Called once when the plugins are loaded, to add destination types.

    :param register: call it with each ``Destination`` subclass the plugin provides; one
        plugin may register several. The core checks each class as it arrives (a
        ``plugin_name``, a pydantic ``Settings`` model, no name clash) and names the plugin
        package and its version in any error.

    Returns nothing: every implementation is called.
    """
