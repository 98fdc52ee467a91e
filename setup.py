"""Package layout that pyproject.toml cannot express: ``plugins/`` installs as ``router_plugins``.

A bare top-level ``plugins`` package would collide with other projects that ship one, so the
built-in destinations are imported as ``router_plugins.<name>``, like any third-party package.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithoutPluginTests(build_py):
    """Leaves each built-in destination's tests (``plugins/<name>/test_*.py``, kept beside
    it as Segment keeps its destinations') out of the wheel: they read the repository's
    ``tests/fixtures`` and cannot run from site-packages."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if not package.startswith("router_plugins"):
            return modules
        return [(pkg, module, path) for pkg, module, path in modules
                if not module.startswith("test_")]


core = find_packages(include=["router", "router.*"])
builtin = ["router_plugins" + name[len("plugins"):]
           for name in find_packages(include=["plugins", "plugins.*"])]
setup(packages=core + builtin, package_dir={"router_plugins": "plugins"},
      package_data={"router": ["py.typed"]}, cmdclass={"build_py": BuildWithoutPluginTests})
