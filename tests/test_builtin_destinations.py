"""Every built-in destination end to end: the sample events routed, translated, batched and
delivered over real HTTP to a fake of the vendor's API, with nothing dead-lettered."""

from __future__ import annotations

from datetime import timedelta

import pytest

from router.storage.base import DeadLetterFilter
from router.testing import FakeDestinationServer, sample_events
from router.testing.events import RECEIVED_AT
from tests.delivery_helpers import FAST_RETRIES, router_for

# Settings per plugin, pointed at the fake server (URL filled in by the test).
SETTINGS = {
    "amplitude": {"api_key": "amp-key-0001", "secret_key": "amp-secret-0001"},
    "mixpanel": {"project_token": "mp-token-0001", "api_secret": "mp-secret-0001"},
    "ga4": {"measurement_id": "G-TEST12345", "api_secret": "ga4-secret-0001"},
    "meta_capi": {"pixel_id": "1234567890", "access_token": "meta-token-0001"},
    "customerio": {"site_id": "site-0001", "api_key": "cio-key-0001"},
    "posthog": {"api_key": "phc_test0001"},
    "braze": {"api_key": "braze-key-0001"},
    "segment": {"write_key": "seg-key-0001"},
}
URL_SETTING = {"braze": "rest_endpoint", "posthog": "host"}


@pytest.mark.parametrize("plugin", sorted(SETTINGS))
async def test_sample_events_reach_the_vendor_api(tmp_path, plugin):
    async with FakeDestinationServer() as server:
        settings = {**SETTINGS[plugin], URL_SETTING.get(plugin, "base_url"): server.url}
        router = router_for(tmp_path, [{"name": plugin, "plugin": plugin, "settings": settings,
                                        "delivery": {**FAST_RETRIES, "batch_wait": "50ms"}}])
        async with router:
            # Received when the samples were sent, as the kit parses them: vendors with an
            # age window (Meta: 7 days) would refuse them on a later date.
            results = await router.route_many(sample_events(), received_at=RECEIVED_AT)
            sent = sum(1 for result in results for r in result.results if r.status == "send")
            assert await router.drain(timeout=20)
            letters = await router.storage.dead_letters(DeadLetterFilter())
        assert sent > 0
        assert letters == [], [letter.reason for letter in letters]
        assert server.requests, f"{plugin} sent nothing"
        secrets = [value for key, value in SETTINGS[plugin].items() if "key" in key or
                   "secret" in key or "token" in key]
        for request in server.requests:
            assert request.status == 200
            # credentials travel in the request (header, query or body) as the vendor wants,
            # and the request is well-formed JSON
            assert request.json is not None or request.body
        assert any(any(s in (str(r.headers) + r.path + str(r.query) + r.text) for s in secrets)
                   or "Authorization" in r.headers for r in server.requests)


@pytest.mark.parametrize(("plugin", "age_hours", "window"), [("ga4", 60, "72 h"),
                                                             ("meta_capi", 150, "7 days")])
def test_a_configured_max_age_narrows_the_vendors_age_window(tmp_path, plugin, age_hours,
                                                              window):
    """GA4 and Meta keep ``max_age`` free for retries inside their backdating windows: an
    event that the default 4 h leaves room for is refused once the config says 24 h."""
    happened = (RECEIVED_AT - timedelta(hours=age_hours)).isoformat()
    event = {"type": "track", "event": "Signed Up", "userId": "u1", "timestamp": happened,
             "context": {"ip": "1.2.3.4", "userAgent": "Mozilla/5.0",
                        "page": {"url": "https://shop.example/"}},
             "integrations": {plugin: {"client_id": "c.1"}}}

    def status(max_age: str) -> tuple[str, str | None]:
        destination = {"name": plugin, "plugin": plugin, "settings": SETTINGS[plugin],
                       "delivery": {"max_age": max_age}}
        router = router_for(tmp_path, [destination])
        (result,) = router.plan(event, received_at=RECEIVED_AT).results
        return result.status, result.reason

    assert status("4h") == ("send", "")
    refused, reason = status("24h")
    assert refused == "invalid" and window in (reason or "") and "24 h" in (reason or "")
