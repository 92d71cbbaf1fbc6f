"""Fault points that only a test turns on: the chaos suite kills a component
at an exact step of a round, which no outside signal can time.

``FEDKUBE_TEST_FAULTS=global.after_checkpoint@3`` (comma-separated
``point@round``) makes the process SIGKILL itself the first time it reaches
that point in that round. Each fires once: it leaves a marker in
``FEDKUBE_TEST_FAULTS_DIR`` (required with it), so the restarted process runs
through. Unset, as it always is outside the tests, ``reached`` is one dict
lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from fedkube.errors import FedkubeError

FAULTS_ENV = "FEDKUBE_TEST_FAULTS"
FAULTS_DIR_ENV = "FEDKUBE_TEST_FAULTS_DIR"

log = logging.getLogger("fedkube.service.faults")


def parse(text: str) -> dict[str, set[int]]:
    """``"a@1,b@2"`` -> ``{"a": {1}, "b": {2}}``; a malformed entry is an error, not ignored."""
    points: dict[str, set[int]] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        point, at, number = entry.partition("@")
        if not point or not at or not number.isdigit():
            raise FedkubeError(f"{FAULTS_ENV}: {entry!r} is not POINT@ROUND")
        points.setdefault(point, set()).add(int(number))
    return points


_POINTS = parse(os.environ.get(FAULTS_ENV, ""))


def reached(point: str, number: int) -> None:
    """Die here (SIGKILL, no clean-up) if a test asked for it and it has not fired yet."""
    if number not in _POINTS.get(point, ()):
        return
    folder = os.environ.get(FAULTS_DIR_ENV)
    if not folder:
        raise FedkubeError(f"{FAULTS_ENV} needs {FAULTS_DIR_ENV}, where fired faults are marked")
    marker = Path(folder) / f"{point}@{number}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    log.error("test fault %s in round %d: killing this process", point, number)
    os.kill(os.getpid(), signal.SIGKILL)
