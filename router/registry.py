"""Finds destination plugins and keeps the destination types they register, by plugin name.

Plugins come from the entry-point group ``router.destinations`` (the built-ins included, so
they load exactly as a third-party package does). A plugin that fails to load or to register
(an import error, a bad ``plugin_name``, a name another package took first) is remembered,
not fatal: a config that uses it fails at start with the plugin's error; one that does not
merely gets a warning.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple

import pluggy
from pydantic import BaseModel

from router import hookspecs
from router.destination import Destination
from router.errors import ConfigError

ENTRY_POINT_GROUP = "router.destinations"
log = logging.getLogger("router.plugins")


@dataclass(frozen=True)
class DestinationType:
    """A registered destination class and where it came from."""

    cls: type[Destination]
    package: str
    version: str

    @property
    def name(self) -> str:
        return self.cls.plugin_name


@dataclass
class Registry:
    """The destination types known to this process, and the plugins that failed to load."""

    types: dict[str, DestinationType] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    entry_points: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """Each loaded entry point's name: its package and version, and the plugin names it
    registered (for a config that names the entry point rather than the ``plugin_name``)."""

    def get(self, plugin: str) -> DestinationType:
        """The type registered as ``plugin``, or a ``ConfigError`` saying why there is none."""
        if plugin in self.types:
            return self.types[plugin]
        if plugin in self.broken:
            raise ConfigError(f"plugin {plugin!r} failed to load: {self.broken[plugin]}")
        if self.entry_points.get(plugin, ("", []))[1]:
            where, names = self.entry_points[plugin]
            use = (f"write plugin: {names[0]}" if len(names) == 1
                   else "write one of them as plugin:")
            raise ConfigError(f"unknown plugin {plugin!r}: the entry point {plugin!r} of {where} "
                              f"registers {', '.join(map(repr, names))}; {use}")
        known = ", ".join(sorted(self.types)) or "none"
        failed = "".join(f"; {name} failed to load: {why}" for name, why in self.broken.items())
        raise ConfigError(f"unknown plugin {plugin!r}; installed: {known}{failed}")


def create_registry(*, entry_points: bool = True,
                    extra_plugins: tuple[ModuleType | object, ...] = ()) -> Registry:
    """Build a plugin manager and collect every destination type.

    Never called at import time: tests build their own registry, with ``extra_plugins`` for
    plugins defined in the test itself.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    origins: dict[object, _Origin] = {}
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            package, version = _distribution(ep)
            try:
                module = ep.load()
                if pm.is_registered(module):
                    continue
                _register_checked(pm, module, name=f"{ep.name} ({package})")
            except Exception as exc:  # noqa: BLE001 - any failure of third-party code
                reason = _one_line(f"{type(exc).__name__}: {exc}")
                registry.broken[ep.name] = f"{reason} (package {package} {version})"
                log.warning("destination plugin %r from %s %s failed to load: %s",
                            ep.name, package, version, reason)
                continue
            origins[module] = _Origin(ep.name, package, version)
    from_entry_points = set(origins)
    for plugin in extra_plugins:
        _register_checked(pm, plugin)
        name = getattr(plugin, "__name__", type(plugin).__name__)
        origins[plugin] = _Origin(name, name, "local")

    registering = {impl.plugin: impl for impl in
                   pm.hook.router_register_destinations.get_hookimpls()}
    for plugin, origin in origins.items():
        impl = registering.get(plugin)
        if impl is None:  # no @hookimpl, or a misspelt hook name: nothing would say why
            registry.broken[origin.name] = ("it implements no router_register_destinations "
                                            "hook (is the function decorated with @hookimpl?)")
            log.warning("destination plugin %r from %s %s registers nothing: %s", origin.name,
                        origin.package, origin.version, registry.broken[origin.name])
            continue
        before = len(registry.types)

        registered: list[str] = []
        if plugin in from_entry_points:
            registry.entry_points[origin.name] = (f"{origin.package} {origin.version}",
                                                  registered)

        def register(cls: type[Destination], _origin: _Origin = origin,
                     _registered: list[str] = registered) -> None:
            _add_type(registry, cls, _origin.package, _origin.version)
            _registered.append(cls.plugin_name)

        try:
            returned = impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - one broken package never stops the others
            reason = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            registry.broken[origin.name] = _one_line(reason)
            log.warning("destination plugin %s %s failed to register: %s", origin.package,
                        origin.version, registry.broken[origin.name])
            continue
        if len(registry.types) == before and returned is not None:
            registry.broken[origin.name] = (
                f"its router_register_destinations returned {type(returned).__name__} "
                "instead of calling register(cls) for each destination class")
            log.warning("destination plugin %s %s registers nothing: %s", origin.package,
                        origin.version, registry.broken[origin.name])
    return registry


_HOOK_NAMES = [name for name in vars(hookspecs) if name.startswith("router_")]
"""The hooks a plugin may implement, for the name a misspelt one was likely meant to be."""


class _Origin(NamedTuple):
    """Where a plugin came from: its entry point's name (which a config's ``plugin:`` is
    matched against when it is broken), and its package."""

    name: str
    package: str
    version: str


def _register_checked(pm: pluggy.PluginManager, plugin: object, *, name: str | None = None
                      ) -> None:
    """Register ``plugin``, refusing it (unregistered again) when it implements a hook the
    router does not know: a misspelt hook name in one package would otherwise stop every
    registry from being built, for every config."""
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        misspelt = re.search(r"unknown hook '(\w+)'", str(exc))
        close = difflib.get_close_matches(misspelt[1], _HOOK_NAMES) if misspelt else []
        if close:
            raise pluggy.PluginValidationError(
                exc.plugin, f"{exc}; did you mean {close[0]}?") from None
        raise


def _one_line(text: str) -> str:
    """A message as one log line (pluggy's span several)."""
    return " ".join(text.split())


def _add_type(registry: Registry, cls: type[Destination], package: str, version: str) -> None:
    where = f"(from {package} {version})"
    if not (isinstance(cls, type) and issubclass(cls, Destination)):
        raise ConfigError(f"{cls!r} registered {where} is not a router.Destination subclass")
    name = getattr(cls, "plugin_name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{cls.__name__} {where} needs a plugin_name that is an identifier")
    settings = getattr(cls, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
        raise ConfigError(f"{cls.__name__} {where} needs a pydantic Settings model")
    existing = registry.types.get(name)
    if existing and existing.cls is not cls:
        raise ConfigError(f"plugin name {name!r} {where} is already registered by "
                          f"{existing.package} {existing.version}")
    registry.types[name] = DestinationType(cls, package, version)


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return ep.module, "unknown"
    return dist.metadata["Name"], dist.version
