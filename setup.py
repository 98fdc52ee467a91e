"""Package layout that pyproject.toml cannot express: ``plugins/`` installs as ``router_plugins``.

A bare top-level ``plugins`` package would collide with other projects that ship one, so the
built-in destinations are imported as ``router_plugins.<name>``, like any third-party package.
"""

from setuptools import find_packages, setup

core = find_packages(include=["router", "router.*"])
builtin = ["router_plugins" + name[len("plugins"):]
           for name in find_packages(include=["plugins", "plugins.*"])]
setup(packages=core + builtin, package_dir={"router_plugins": "plugins"},
      package_data={"router": ["py.typed"], "router_plugins": ["*/*.md"]})
