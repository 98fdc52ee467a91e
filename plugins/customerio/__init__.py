"""The ``customerio`` destination: Customer.io Journeys through the Track API v2."""

from router import RegisterDestination, hookimpl

from .destination import CustomerIO


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(CustomerIO)
