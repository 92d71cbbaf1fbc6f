"""The same job placed as Ray actors on a local Ray (``--runtime ray``)."""

from __future__ import annotations

import json
import os

import pytest

from tests.support import fedkube_cli

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def test_fedkube_run_on_ray_trains_to_completion(job_file, tmp_path):
    out = tmp_path / "run"
    done = fedkube_cli(
        "run",
        str(job_file(rounds=2)),
        "--runtime",
        "ray",
        "--out",
        str(out),
        timeout=480,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "runtime ray" in done.stdout
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["reported"] == 4 for r in records)
    # The services ran inside Ray actors and logged to the run directory.
    assert "round closed" in (out / "logs" / "global.log").read_text()
    assert "update sent" in (out / "logs" / "worker-a-0.log").read_text()
