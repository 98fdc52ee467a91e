"""The ``meta_capi`` destination: conversions to Meta's Conversions API (Facebook Pixel)."""

from router import RegisterDestination, hookimpl

from .destination import MetaConversions


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(MetaConversions)
