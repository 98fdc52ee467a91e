"""The ``ga4`` destination: events to Google Analytics 4 through the Measurement Protocol."""

from router import RegisterDestination, hookimpl

from .destination import GoogleAnalytics4


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(GoogleAnalytics4)
