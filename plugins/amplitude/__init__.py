"""The ``amplitude`` destination: events to the HTTP V2 (or Batch) API, deletions to the User
Privacy API."""

from router import RegisterDestination, hookimpl

from .destination import Amplitude


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Amplitude)
