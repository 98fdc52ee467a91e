"""Plugin discovery through real entry points: packages installed in a directory on
``sys.path`` (a ``.dist-info`` with ``entry_points.txt``), found by importlib.metadata as pip
installs them. A package with a mistake must break only the configs that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.errors import ConfigError
from router.registry import create_registry
from tests.plugin_helpers import REGISTERS_PROBE, install_plugin


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def broken_reason(registry, plugin: str) -> str:
    with pytest.raises(ConfigError) as raised:
        registry.get(plugin)
    return str(raised.value)


def test_a_well_made_package_is_discovered(site: Path):
    install_plugin(site, "zgood", REGISTERS_PROBE)
    found = create_registry().get("zgood")
    assert (found.package, found.version) == ("zgood", "0.1")


def test_a_misspelt_hook_breaks_only_its_own_package(site: Path):
    # pluggy refuses a hook it has no spec for; that used to stop every registry, and so
    # every config and command, whichever plugins they named.
    install_plugin(site, "zmisspelt", """
        @hookimpl
        def router_register_destination(register):
            register(Probe)
    """)
    registry = create_registry()
    assert registry.get("webhook").package == "event-router"
    reason = broken_reason(registry, "zmisspelt")
    assert "plugin 'zmisspelt' failed to load" in reason
    assert "unknown hook 'router_register_destination'" in reason
    assert "did you mean router_register_destinations?" in reason  # newcomer audit
    assert "\n" not in reason


def test_a_hook_without_hookimpl_is_named(site: Path):
    install_plugin(site, "znohook", """
        def router_register_destinations(register):
            register(Probe)
    """)
    reason = broken_reason(create_registry(), "znohook")
    assert "implements no router_register_destinations hook" in reason
    assert "@hookimpl" in reason


def test_a_hook_that_returns_its_classes_is_named(site: Path):
    install_plugin(site, "zreturns", """
        @hookimpl
        def router_register_destinations(register):
            return [Probe]
    """)
    reason = broken_reason(create_registry(), "zreturns")
    assert "returned list instead of calling register(cls)" in reason


def test_a_registration_failure_is_found_by_the_entry_point_name(site: Path):
    install_plugin(site, "zbadname", """
        Probe.plugin_name = "z-bad-name"

        @hookimpl
        def router_register_destinations(register):
            register(Probe)
    """)
    reason = broken_reason(create_registry(), "zbadname")
    assert "plugin 'zbadname' failed to load" in reason
    assert "needs a plugin_name that is an identifier" in reason


def test_a_config_naming_the_entry_point_is_told_the_plugin_name(site: Path):
    # plugins.md asks for the entry point to be named as the plugin_name; a package whose
    # two names differ is found only by its plugin_name, and the error for the entry
    # point's name used to say "unknown plugin" and list the other name among all the
    # installed ones, without connecting the two (plugin author audit).
    install_plugin(site, "zalias", """
        Probe.plugin_name = "zalias_dest"

        @hookimpl
        def router_register_destinations(register):
            register(Probe)
    """)
    registry = create_registry()
    assert registry.get("zalias_dest").package == "zalias"
    reason = broken_reason(registry, "zalias")
    assert ("unknown plugin 'zalias': the entry point 'zalias' of zalias 0.1 registers "
            "'zalias_dest'; write plugin: zalias_dest") in reason
