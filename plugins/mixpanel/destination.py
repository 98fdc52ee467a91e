"""Mixpanel: events through ``/import`` (strict mode, deduplicated by ``$insert_id``), user
profiles through ``/engage`` and group profiles through ``/groups``.

Each endpoint is its own payload group, and a per-event ``project_token_override`` makes
another group, so a batch never mixes endpoints or projects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router import (BaseUrl, basic_auth, DeliveryDefaults, Destination, Event, EventRejected,
                    HttpRequest,
                    HttpResponse, Outcome, Payload, SkipEvent)
from router.semantics import ORDER_COMPLETED, semantic_action

from . import responses, translate
from .translate import IdentityMerge

# Mixpanel's data residency hosts ("Import Events": servers api, api-eu, api-in).
REGION_HOSTS = {"US": "https://api.mixpanel.com", "EU": "https://api-eu.mixpanel.com",
                "IN": "https://api-in.mixpanel.com"}

IMPORT, ENGAGE, GROUPS = "import", "engage", "groups"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
ENGAGE_TOKEN_BYTES = len(b'"$token":"",') + 128
"""What build_request adds to each /engage and /groups update: the project token (at most
128 letters, digits, dashes or underscores, none escaped in JSON: both the setting and the
per-event override are checked)."""


class MixpanelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project_token: SecretStr = Field(
        description="Project token (Project Settings > Access Keys). /engage and /groups take "
                    "it in the body; /import uses it to authenticate when no service account "
                    "or API secret is set.")
    service_account_username: str | None = Field(
        None, description="Service account user name (Organization Settings > Service "
                          "Accounts); needs `service_account_secret` and `project_id`.")
    service_account_secret: SecretStr | None = Field(
        None, description="Service account secret; recommended credential for /import.")
    api_secret: SecretStr | None = Field(
        None, description="Legacy project API secret for /import, used instead of a service "
                          "account.")
    project_id: str | None = Field(
        None, description="Numeric project id; required with a service account.")
    region: Literal["US", "EU", "IN"] = Field(
        "US", description="Data residency of the project: US, EU or IN.")
    base_url: BaseUrl | None = Field(
        None, description="Send to this http(s) base URL instead of the region's host "
                          "(tests, proxies).")
    identity_merge: IdentityMerge = Field(
        "simplified", description="The project's ID Merge API (Project Settings > Identity "
                                  "Merge): `simplified` or `original`.")
    group_key: str | None = Field(
        None, description="Group key (set up under Project Settings > Group Keys) that group "
                          "calls write to; without it group calls are skipped.")
    named_page_events: bool = Field(
        True, description="Name page/screen events \"Viewed {name} Page\" when the page has a "
                          "name; otherwise every page is \"Loaded a Page\".")
    product_purchased_events: bool = Field(
        False, description="Also send one \"Product Purchased\" event per product of an "
                           "Order Completed.")

    @field_validator("project_token")
    @classmethod
    def _token_shape(cls, token: SecretStr) -> SecretStr:
        if not _TOKEN.fullmatch(token.get_secret_value()):
            raise ValueError("expected a Mixpanel project token: up to 128 letters, digits, "
                             "- or _ (32 hex digits, under Project Settings > Access Keys)")
        return token

    @field_validator("region", mode="before")
    @classmethod
    def _region_upper(cls, region: Any) -> Any:
        if isinstance(region, str) and region.strip().upper() in REGION_HOSTS:
            return region.strip().upper()
        if isinstance(region, str):
            raise ValueError("unknown region; expected one of US, EU, IN")
        return region

    @model_validator(mode="after")
    def _one_credential(self) -> MixpanelSettings:
        has_user = self.service_account_username is not None
        has_secret = self.service_account_secret is not None
        if has_user != has_secret:
            raise ValueError("service_account_username and service_account_secret go together")
        if has_user and not self.project_id:
            raise ValueError("project_id is required with a service account")
        if has_user and self.api_secret is not None:
            raise ValueError("set either a service account or api_secret, not both")
        return self


class Mixpanel(Destination[MixpanelSettings]):
    plugin_name = "mixpanel"
    Settings = MixpanelSettings
    # /import, /engage and /groups: at most 2000 records per request; /import at most 10 MB
    # uncompressed (Mixpanel "Import Events", "User Profile Limits", "Group Profile Limits").
    # Throughput is ~2 GB/min per project, so no request rate is set; 429s are honoured.
    delivery = DeliveryDefaults(batch_size=2000, batch_bytes=10 * 1000 * 1000, timeout=30,
                                concurrency=8, payload_overhead=ENGAGE_TOKEN_BYTES)

    @property
    def _base_url(self) -> str:
        return self.settings.base_url or REGION_HOSTS[self.settings.region]

    def translate(self, event: Event, options: Mapping[str, Any]) -> Sequence[Payload]:
        merge = self.settings.identity_merge
        suffix = _project_suffix(options)
        action = semantic_action(event)
        if action == "delete":
            return [Payload(translate.profile_delete(event, merge), ENGAGE + suffix)]
        if action is not None:
            raise SkipEvent(f"Mixpanel has no {action} operation for a user; "
                            "messaging preferences live outside its ingestion API")

        imported: list[dict[str, Any]] = []
        engaged: list[dict[str, Any]] = []
        grouped: list[dict[str, Any]] = []
        kind = event.type  # read once: an event's fields are pydantic attributes, not cheap
        if kind == "track":
            name = event.event
            assert name is not None  # required for track by parse_event
            imported.append(translate.import_event(translate.track_name(name), event,
                                                   event.properties, merge))
            if name == ORDER_COMPLETED and self.settings.product_purchased_events:
                imported += translate.product_purchased(event, merge)
        elif kind in ("page", "screen"):
            page_name = translate.page_event_name(event, named=self.settings.named_page_events)
            imported.append(translate.import_event(page_name, event,
                                                   translate.page_properties(event), merge))
        elif kind == "identify":
            engaged.append(translate.profile_update(
                event, merge, "$set", translate.profile_properties(event.traits)))
            if event.userId and event.anonymousId:
                imported.append(translate.identify_event(event, merge))
        elif kind == "group":
            if not self.settings.group_key:
                raise SkipEvent("group calls need the `group_key` setting (a group key set up "
                                "in the Mixpanel project)")
            grouped.append(translate.group_update(event, self.settings.group_key))
            engaged.append(translate.profile_update(
                event, merge, "$union", {self.settings.group_key: [event.groupId]}))
        elif kind == "alias":
            if merge == "simplified":
                raise SkipEvent("$create_alias does nothing on Simplified ID Merge projects; an "
                                "identify with both userId and anonymousId merges instead")
            imported.append(translate.alias_event(event))
        return ([Payload(body, IMPORT + suffix) for body in imported]
                + [Payload(body, ENGAGE + suffix) for body in engaged]
                + [Payload(body, GROUPS + suffix) for body in grouped])

    def build_request(self, payloads: Sequence[Payload]) -> HttpRequest:
        endpoint, _, token_override = payloads[0].group.partition(":")
        bodies = [payload.body for payload in payloads]
        if endpoint == IMPORT:
            url, authorization = self._import_target(token_override)
            return HttpRequest.json("POST", url, bodies, {"Authorization": authorization})
        # /engage and /groups authenticate by the token inside each update; verbose=1 makes
        # them say why an update failed instead of answering a bare 0.
        token = token_override or self.settings.project_token.get_secret_value()
        return HttpRequest.json("POST", f"{self._base_url}/{endpoint}?verbose=1",
                                [{"$token": token, **body} for body in bodies])

    def _import_target(self, token_override: str) -> tuple[str, str]:
        """URL and Authorization of /import: a service account (with project_id), else the
        API secret, else the project token as user name ("Import Events": Authentication).
        Another project's token (a per-event override) authenticates as itself."""
        url = f"{self._base_url}/import?strict=1"
        settings = self.settings
        if token_override:
            return url, basic_auth(token_override, "")
        if settings.service_account_username and settings.service_account_secret:
            return (f"{url}&project_id={settings.project_id}",
                    basic_auth(settings.service_account_username,
                           settings.service_account_secret.get_secret_value()))
        if settings.api_secret is not None:
            return url, basic_auth(settings.api_secret.get_secret_value(), "")
        return url, basic_auth(settings.project_token.get_secret_value(), "")

    def read_response(self, payloads: Sequence[Payload], response: HttpResponse
                      ) -> Sequence[Outcome] | None:
        endpoint = payloads[0].group.partition(":")[0]
        if endpoint == IMPORT:
            return responses.import_outcomes(payloads, response)
        return responses.profile_outcomes(payloads, response)

    def endpoints(self) -> Sequence[str]:
        return (self.settings.base_url,) if self.settings.base_url else ()


def _project_suffix(options: Mapping[str, Any]) -> str:
    """The group suffix of a per-event ``project_token_override``: its payloads go to that
    project, so they must not share a request with the configured project's."""
    token = options.get("project_token_override")
    if token is None:
        return ""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise EventRejected("integrations option project_token_override: expected a Mixpanel "
                            "project token (up to 128 letters, digits, - or _)")
    return f":{token}"

