"""The ``posthog`` destination: events, identities and groups through PostHog's capture API."""

from router import RegisterDestination, hookimpl

from .destination import PostHog


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(PostHog)
