"""The ``braze`` destination: users, events and purchases to the Braze REST API."""

from router import RegisterDestination, hookimpl

from .destination import Braze


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Braze)
