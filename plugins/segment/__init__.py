"""The ``segment`` destination: events forwarded to a Segment-compatible tracking API."""

from router import RegisterDestination, hookimpl

from .destination import Segment


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Segment)
