"""Print the requirements of one of fedkube's images, from pyproject.toml (the Dockerfile's input).

    python3 scripts/image-requirements.py full   # every declared dependency
    python3 scripts/image-requirements.py slim   # less [tool.fedkube.image] training-only
    python3 scripts/image-requirements.py build  # the build backend ([build-system] requires)

The declared dependencies stay the one list: `pip install fedkube` gets all of them, and the
slim image (operator, combiners) is that list less the training stack. Standard library
only: it runs in the image's build stage before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement, normalised (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(image: str, pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement lines for ``image`` (``full`` or ``slim``), or ``build``'s."""
    data = tomllib.loads(pyproject.read_text())
    if image == "build":
        return list(data["build-system"]["requires"])
    declared: list[str] = data["project"]["dependencies"]
    if image == "full":
        return declared
    if image != "slim":
        raise ValueError(f"unknown image {image!r}: full, slim or build")
    left_out = {requirement_name(r) for r in data["tool"]["fedkube"]["image"]["training-only"]}
    unknown = left_out - {requirement_name(r) for r in declared}
    if unknown:
        raise ValueError(f"training-only names undeclared dependencies: {sorted(unknown)}")
    return [r for r in declared if requirement_name(r) not in left_out]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: image-requirements.py full|slim|build")
    try:
        print("\n".join(requirements(sys.argv[1])))
    except ValueError as error:
        sys.exit(f"image-requirements.py: {error}")
