"""Guards on the architecture, read from the source with ``ast`` (nothing is imported to check).

- Destinations are pure: nothing under ``plugins/`` reaches the transport, the event loop, the
  storage or the server; the core owns all of those.
- Built-ins are plugins: nothing under ``router/`` imports a built-in destination by name, and
  they use only the public plugin API (``router``, ``router.semantics``, ``router.testing``).
- The plugin contract cannot drift from its docs: every hook and every public ``Destination``
  method appears in ``docs/plugins.md`` with its signature.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"

FORBIDDEN_IN_PLUGINS = ("aiohttp", "asyncio", "router.delivery", "router.storage", "router.server")
FORBIDDEN_IN_CORE = ("router_plugins", "plugins")


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, with its line; ``from a import b`` yields both
    ``a`` and ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    problems = []
    for path in python_files(folder):
        for line, module in imported_modules(path):
            for banned in forbidden:
                if module == banned or module.startswith(banned + "."):
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(problems))


def test_the_import_scanner_sees_what_it_must(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\nfrom router import storage\nfrom router.delivery import x\n"
                      "import importlib\nimportlib.import_module('aiohttp')\n"
                      "def f():\n    import router.server.app\n")
    modules = {module for _, module in imported_modules(sample)}
    assert {"asyncio", "router.storage", "router.delivery", "aiohttp",
            "router.server.app"} <= modules


def test_plugins_do_no_io_and_touch_no_core_internals():
    assert violations("plugins", FORBIDDEN_IN_PLUGINS) == []


def test_built_in_destinations_use_only_the_public_plugin_api():
    # docs/plugins.md says the built-ins are written exactly as a third-party plugin is: a
    # helper they reached for in router.events or router.templates was not documented, and
    # could have changed under a third-party plugin that copied one.
    import router
    public = {"router", "router.semantics", "router.testing",
              *(f"router.{name}" for name in router.__all__)}
    reached = [f"{path.relative_to(ROOT)}:{line} imports {module}"
               for path in python_files("plugins") if not path.name.startswith("test_")
               for line, module in imported_modules(path)
               if module.startswith("router") and not module.startswith("router_plugins")
               and module not in public and not module.startswith(("router.semantics.",
                                                                   "router.testing."))]
    assert reached == []


def test_the_core_never_imports_a_built_in_destination():
    assert violations("router", FORBIDDEN_IN_CORE) == []


# -- docs/plugins.md -------------------------------------------------------------------------------

def hook_specs() -> list[ast.FunctionDef]:
    tree = ast.parse((ROOT / "router" / "hookspecs.py").read_text())
    hooks = [node for node in tree.body if isinstance(node, ast.FunctionDef)
             and any(getattr(d, "id", getattr(getattr(d, "func", None), "id", None)) == "hookspec"
                     for d in node.decorator_list)]
    assert hooks, "router/hookspecs.py declares no @hookspec"
    return hooks


def destination_methods() -> list[tuple[str, list[str]]]:
    from router.destination import Destination
    methods = []
    for name, member in vars(Destination).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        params = [p for p in inspect.signature(member).parameters if p != "self"]
        methods.append((name, params))
    assert methods, "router.destination.Destination has no public methods"
    return methods


@pytest.fixture
def docs() -> str:
    if not DOCS.exists():
        pytest.skip("docs/plugins.md does not exist yet (it is being written)")
    return DOCS.read_text()


def documented_signature(docs: str, name: str) -> str | None:
    """The first ``name(...)`` written in the docs, or None."""
    match = re.search(rf"\b{re.escape(name)}\(([^)]*)\)", docs)
    return match.group(1) if match else None


@pytest.mark.parametrize("hook", [h.name for h in hook_specs()])
def test_every_hook_is_documented_with_its_signature(docs, hook):
    spec = next(h for h in hook_specs() if h.name == hook)
    params = [arg.arg for arg in spec.args.args]
    signature = documented_signature(docs, hook)
    assert signature is not None, f"docs/plugins.md does not mention {hook}(...)"
    for param in params:
        assert param in signature, f"{hook}: parameter {param} missing from the docs"


@pytest.mark.parametrize("method, params", destination_methods(),
                         ids=[name for name, _ in destination_methods()])
def test_every_destination_method_is_documented_with_its_signature(docs, method, params):
    signature = documented_signature(docs, method)
    assert signature is not None, f"docs/plugins.md does not mention {method}(...)"
    for param in params:
        assert param in signature, f"{method}: parameter {param} missing from the docs"


def test_destination_class_attributes_are_documented(docs):
    for attribute in ("plugin_name", "Settings", "delivery"):
        assert attribute in docs
