"""The ``webhook`` destination: each event as an HTTP request to a URL of yours."""

from router import RegisterDestination, hookimpl

from .destination import Webhook


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Webhook)
