"""The ``mixpanel`` destination: events to ``/import``, profiles to ``/engage`` and ``/groups``."""

from router import RegisterDestination, hookimpl

from .destination import Mixpanel


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Mixpanel)
