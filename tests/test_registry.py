"""Plugin discovery through real entry points: packages installed in a directory on
``sys.path`` (a ``.dist-info`` with ``entry_points.txt``), found by importlib.metadata as pip
installs them. A package with a mistake must break only the configs that use it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.registry import create_registry

PROBE = """
    from router import Destination, HttpRequest, Payload
    from router.hookspecs import hookimpl
    from pydantic import BaseModel


    class Probe(Destination):
        plugin_name = {plugin_name!r}

        class Settings(BaseModel):
            pass

        def translate(self, event, options):
            return [Payload({{"id": event.messageId}})]

        def build_request(self, payloads):
            return HttpRequest.json("POST", "https://example.com/", [p.body for p in payloads])
"""


def install(site: Path, name: str, hook: str) -> None:
    """A package ``name`` whose entry point in ``router.destinations`` is named ``name``."""
    source = textwrap.dedent(PROBE.format(plugin_name=name)) + textwrap.dedent(hook)
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[router.destinations]\n{name} = {name}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def broken_reason(registry, plugin: str) -> str:
    with pytest.raises(ConfigError) as raised:
        registry.get(plugin)
    return str(raised.value)


def test_a_well_made_package_is_discovered(site: Path):
    install(site, "zgood", """
        @hookimpl
        def router_register_destinations(register):
            register(Probe)
    """)
    found = create_registry().get("zgood")
    assert (found.package, found.version) == ("zgood", "0.1")


def test_a_misspelt_hook_breaks_only_its_own_package(site: Path):
    # pluggy refuses a hook it has no spec for; that used to stop every registry, and so
    # every config and command, whichever plugins they named.
    install(site, "zmisspelt", """
        @hookimpl
        def router_register_destination(register):
            register(Probe)
    """)
    registry = create_registry()
    assert registry.get("webhook").package == "event-router"
    reason = broken_reason(registry, "zmisspelt")
    assert "plugin 'zmisspelt' failed to load" in reason
    assert "unknown hook 'router_register_destination'" in reason
    assert "\n" not in reason


def test_a_hook_without_hookimpl_is_named(site: Path):
    install(site, "znohook", """
        def router_register_destinations(register):
            register(Probe)
    """)
    reason = broken_reason(create_registry(), "znohook")
    assert "implements no router_register_destinations hook" in reason
    assert "@hookimpl" in reason


def test_a_hook_that_returns_its_classes_is_named(site: Path):
    install(site, "zreturns", """
        @hookimpl
        def router_register_destinations(register):
            return [Probe]
    """)
    reason = broken_reason(create_registry(), "zreturns")
    assert "returned list instead of calling register(cls)" in reason


def test_a_registration_failure_is_found_by_the_entry_point_name(site: Path):
    install(site, "zbadname", """
        Probe.plugin_name = "z-bad-name"

        @hookimpl
        def router_register_destinations(register):
            register(Probe)
    """)
    reason = broken_reason(create_registry(), "zbadname")
    assert "plugin 'zbadname' failed to load" in reason
    assert "needs a plugin_name that is an identifier" in reason
