"""The ``ga4`` destination: events to Google Analytics 4 through the Measurement Protocol."""

from router import hookimpl

from .destination import GoogleAnalytics4


@hookimpl
def router_register_destinations(register):
    register(GoogleAnalytics4)
