"""Plugin packages installed for a test: a module and a ``.dist-info`` with its
``entry_points.txt`` in a directory put on ``sys.path`` (or ``PYTHONPATH`` for a ``router``
subprocess), found through importlib.metadata exactly as pip-installed packages are."""

from __future__ import annotations

import textwrap
from pathlib import Path

PROBE = """
    from router import Destination, HttpRequest, Payload
    from router.hookspecs import hookimpl
    from pydantic import BaseModel


    class Probe(Destination):
        plugin_name = {plugin_name!r}

        class Settings(BaseModel):
            pass

        def translate(self, event, options):
            return [Payload({{"id": event.messageId, "type": event.type}})]

        def build_request(self, payloads):
            return HttpRequest.json("POST", "https://example.com/", [p.body for p in payloads])
"""
"""A destination class ``Probe`` whose plugin name is the package's; a test adds the
registration hook and whatever it changes."""

REGISTERS_PROBE = """
    @hookimpl
    def router_register_destinations(register):
        register(Probe)
"""


def install_plugin(site: Path, name: str, source: str) -> None:
    """A package ``name`` (module and entry point of that name) whose module is ``PROBE``
    followed by ``source``."""
    code = textwrap.dedent(PROBE.format(plugin_name=name)) + textwrap.dedent(source)
    (site / f"{name}.py").write_text(code)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[router.destinations]\n{name} = {name}\n")
