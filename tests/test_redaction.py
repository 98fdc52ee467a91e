"""What is shown of requests (dry runs, dead letters, logs) never carries a credential."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from pydantic import BaseModel, SecretStr

from router.redaction import REDACTED, Masker, redacted_url, secret_values

ROOT = Path(__file__).resolve().parents[1]


class Nested(BaseModel):
    key: SecretStr


class Settings(BaseModel):
    token: SecretStr
    nested: list[Nested]
    headers: dict[str, SecretStr]
    plain: str = "not-a-secret-value"


def test_every_secret_str_is_found_and_a_bearer_token_counts_alone():
    settings = Settings(token="tok-0001-abcdef", nested=[Nested(key="nested-key-0001")],
                        headers={"Authorization": "Bearer header-token-0001"})
    found = set(secret_values(settings))
    assert {"tok-0001-abcdef", "nested-key-0001", "Bearer header-token-0001",
            "header-token-0001"} <= found
    assert "not-a-secret-value" not in found


def test_urls_lose_credential_query_values_and_passwords():
    masker = Masker(["ga4-secret-0001"])
    assert masker.mask_url("https://x.example/collect?id=G-1&api_secret=ga4-secret-0001") == \
        f"https://x.example/collect?id=G-1&api_secret={REDACTED}"
    assert masker.mask_url("https://hooks.example/in?token=abc&page=2") == \
        f"https://hooks.example/in?token={REDACTED}&page=2"
    assert redacted_url("redis://:pw-0001@cache:6379/0") == f"redis://:{REDACTED}@cache:6379/0"


def test_dry_run_masks_a_token_in_a_webhook_url(tmp_path):
    config = tmp_path / "router.json"
    config.write_bytes(orjson.dumps({"storage": "memory://", "destinations": [{
        "name": "hook", "plugin": "webhook",
        "settings": {"url": "https://hooks.example/in?token=${HOOK_TOKEN}"}}]}))
    completed = subprocess.run(
        [sys.executable, "-m", "router", "send", "-c", str(config), "--dry-run", "--json",
         str(ROOT / "tests" / "fixtures" / "events" / "identify_merge.json")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOOK_TOKEN": "url-token-0001", "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 0, completed.stderr
    assert "url-token-0001" not in completed.stdout + completed.stderr
    (line,) = [orjson.loads(text) for text in completed.stdout.splitlines()]
    assert line["requests"][0]["url"] == f"https://hooks.example/in?token={REDACTED}"
