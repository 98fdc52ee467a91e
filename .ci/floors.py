"""Print pip constraints pinning each dependency that pyproject.toml gives a floor
(``name>=X``) to exactly that floor: the oldest versions the project says it works with.

``make test-lowest`` installs the project under these constraints, so a floor that no longer
holds (code come to rely on a newer release's API or fix) fails a test instead of reaching a
user whose other packages keep an older release. Dependencies of dependencies take the
newest release their ranges allow, as pip would give a user."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOOR = re.compile(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floors(pyproject: dict) -> dict[str, str]:
    project = pyproject["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    found: dict[str, str] = {}
    for requirement in requirements:
        match = FLOOR.fullmatch(requirement.strip())
        if match and match[1] != project["name"]:
            found[match[1].lower()] = match[3]
    return found


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    for name, version in sorted(floors(tomllib.loads(path.read_text())).items()):
        print(f"{name}=={version}")
