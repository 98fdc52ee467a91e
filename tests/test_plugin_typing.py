"""What a plugin author's own type checker says of the plugin API: the example plugin, as
copied to start a package, passes ``mypy --strict`` (README: the router ships ``py.typed``
so that plugins are checked against its annotations).

Run without pydantic's mypy plugin, as a plugin author's bare ``mypy --strict`` (and
pyright) checks: both see pydantic models only through ``dataclass_transform``, which reads
a field's default from ``Field(default=...)`` alone, never from ``Field``'s first
positional argument."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


ACME = ROOT / "examples" / "router-acme"

AUTHORS_TEST = """
from pydantic import SecretStr

from router_acme import Acme, AcmeSettings

settings = AcmeSettings(api_key=SecretStr("acme-key-0001"))
destination = Acme(settings)
"""
"""What a plugin's own tests do with its settings model, which the example's is the model of."""

FIXTURE_TYPES = """
from router.testing import FakeDestinationServer, HarnessFactory

from router_acme import Acme


def harnessed(destination_harness: HarnessFactory) -> Acme:
    return destination_harness(Acme, {"api_key": "acme-key-0001"}).destination


def served(fake_destination: FakeDestinationServer) -> str:
    return fake_destination.url
"""
"""The kit's fixtures as a plugin's tests annotate them: the harness the factory builds
knows its destination's class (strict mode refuses to return an ``Any`` as an ``Acme``)."""


def mypy_strict(*paths: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    # --follow-imports silent: the router is type-checked as it is installed (its own
    # checks are `make lint`'s), and only the plugin's errors are reported.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.devnull, "--strict",
         "--follow-imports", "silent", "--cache-dir", str(cache), "--no-error-summary",
         *map(str, paths)],
        cwd=ROOT, env={**os.environ, "MYPYPATH": f"{ROOT}{os.pathsep}{ACME}"},
        capture_output=True, text=True, timeout=300)


def test_the_example_plugin_passes_mypy_strict(tmp_path: Path):
    # DeliveryDefaults(batch_size=100, ...) was refused, "Missing named argument 'timeout'"
    # and twelve more, while its fields gave their defaults positionally to Field(); so was
    # AcmeSettings(api_key=...), "Missing named argument 'base_url'", copied from it.
    (tmp_path / "authors_test.py").write_text(AUTHORS_TEST)
    checked = mypy_strict(ACME / "router_acme.py", tmp_path / "authors_test.py",
                          cache=tmp_path / "cache")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_example_plugins_tests_and_the_kits_fixtures_pass_mypy_strict(tmp_path: Path):
    # The register hook and the destination_harness fixture had no public type: an author
    # spelt out Callable[[type[Destination[Any]]], None], or imported private modules, or
    # left the fixture unannotated, which strict mode refuses (plugin author audit).
    (tmp_path / "fixture_types.py").write_text(FIXTURE_TYPES)
    checked = mypy_strict(ACME / "tests" / "test_acme.py", tmp_path / "fixture_types.py",
                          cache=tmp_path / "cache")
    assert checked.returncode == 0, checked.stdout + checked.stderr
