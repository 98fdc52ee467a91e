"""``make bench``: every benchmark, its figures printed as JSON (recorded in
docs/performance.md). Pass stage names to run only some: ``python -m bench.run core``."""

from __future__ import annotations

import json
import platform
import sys


def main(argv: list[str]) -> int:
    stages = argv or ["core"]
    print(json.dumps({"python": platform.python_version(), "machine": platform.machine()}))
    for stage in stages:
        module = __import__(f"bench.{stage}", fromlist=["run"])
        figures = module.run()
        print(json.dumps({"benchmark": stage, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
