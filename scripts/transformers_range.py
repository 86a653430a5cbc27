"""Print the transformers requirement of pyproject.toml (`--requirement`) or its lower bound (`--oldest`).

Used by .ci/run, which runs the test suite on both ends of the supported range.
"""

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement() -> str:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(r"transformers\b", d))


def oldest() -> str:
    found = re.search(r">=\s*([\w.]+)", requirement())
    if not found:
        raise SystemExit("pyproject.toml's transformers requirement has no lower bound (>=)")
    return found.group(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--requirement", action="store_true", help="the requirement string, e.g. transformers>=5.21.1,<5.25")
    group.add_argument("--oldest", action="store_true", help="its lower bound, e.g. 5.21.1")
    args = parser.parse_args()
    print(requirement() if args.requirement else oldest())
