"""Acme Analytics: an example destination, written as a third-party package would be.

Acme takes batches of up to 100 events at ``POST {base_url}/v1/events`` with a bearer token,
and drops repeated ``id``s, so the event's messageId goes there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from router import (BaseUrl, DeliveryDefaults, Destination, Event, HttpRequest, HttpResponse,
                    Outcome, Payload, PermanentError, RegisterDestination, SkipEvent, hookimpl)


class AcmeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(description="Acme API key (Settings > API in Acme).")
    base_url: BaseUrl = Field(default="https://api.acme.example",
                              description="Acme API host (a test server or proxy may stand in).")


class Acme(Destination[AcmeSettings]):
    plugin_name = "acme"
    Settings = AcmeSettings
    # Acme documents 100 events and 512 KB per request, 50 requests a second.
    delivery = DeliveryDefaults(batch_size=100, batch_bytes=512 * 1024, rate_limit=50)

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        if event.type == "track":
            body = {"id": event.messageId, "name": event.event, "user": event.user_key,
                    "ts": int(event.timestamp.timestamp() * 1000),
                    "props": event.properties}
            if event.properties.get("revenue") is not None:
                body["revenue"] = {"amount": event.properties["revenue"],
                                   "currency": event.properties["currency"]}
            return [Payload(body)]
        if event.type == "identify":
            return [Payload({"id": event.messageId, "name": "$profile", "user": event.user_key,
                             "ts": int(event.timestamp.timestamp() * 1000),
                             "props": event.traits})]
        raise SkipEvent(f"Acme has no {event.type} calls")

    def endpoints(self) -> Sequence[str]:
        # A base URL from the settings: checked against the egress policy at config load,
        # so `router check` refuses a private address the transport would refuse later.
        return [self.settings.base_url]

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        token = self.settings.api_key.get_secret_value()
        return HttpRequest.json("POST", f"{self.settings.base_url}/v1/events",
                                {"events": [payload.body for payload in payloads]},
                                headers={"Authorization": f"Bearer {token}"})

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        # Acme answers 207 with the indexes of the events it refused.
        if response.status != 207:
            return None
        errors = (response.json() or {}).get("errors", [])
        refused = {item["index"]: item["error"] for item in errors}
        return [PermanentError(f"Acme refused it: {refused[index]}") if index in refused else None
                for index in range(len(payloads))]


@hookimpl
def router_register_destinations(register: RegisterDestination) -> None:
    register(Acme)
