"""The ``slack`` destination: a message in a Slack channel per event, by incoming webhook."""

from router import RegisterDestination, hookimpl

from .destination import Slack


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Slack)
