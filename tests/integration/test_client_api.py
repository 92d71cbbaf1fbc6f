"""The Client API: a plain PyTorch script over PNG files, as a client of a whole federation.

``fedkube.examples.digits_script`` keeps its own ``main()``, Dataset,
DataLoader and loop; six lines make it a client. Here it runs under real
workers (real Redis, real HTTP, in the test's process), alone as before,
and as a worker process of ``fedkube run``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkube.examples import digit_files, digits
from fedkube.spec import FederatedJob, parse_job
from fedkube.training.learning import build_model, data_context, load_float_state
from tests.federation import federate
from tests.support import small_job_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SCRIPT = "fedkube.examples.digits_script"


def script_job(images: Path, strategy: str = "fedavg", **spec: Any) -> FederatedJob:
    document = small_job_dict(
        rounds=3,
        task={"script": SCRIPT, "args": ["--epochs", "3", "--hidden", "16"]},
        strategy={"name": strategy, "proximalMu": 0.01},
        **spec,
    )
    del document["spec"]["data"]["entrypoint"]
    for tenant in document["spec"]["tenants"]:
        tenant["data"] = {"kwargs": {"root": str(images / tenant["name"])}}
    return parse_job(document)


def held_out_accuracy(job: FederatedJob, weights: dict[str, np.ndarray]) -> float:
    model = build_model(job)
    load_float_state(model, weights)
    test = digits.make_data(data_context(job, "test", None))
    with torch.no_grad():
        predicted = model(torch.as_tensor(test.x)).argmax(dim=1).numpy()
    return float((predicted == test.y).mean())


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
async def test_a_script_with_its_own_loop_trains_the_federation_from_image_files(
    strategy, redis_server, tmp_path
):
    # prepare: every tenant's partition as PNG files, read by the script's own Dataset
    images = tmp_path / "images"
    job = script_job(images, strategy)
    written = digit_files.write_images(job, images)
    start = held_out_accuracy(job, {})
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: every client of every round reported, and the final model learned digits
    assert outcome.status == "succeeded", outcome
    assert [r["reported"] for r in outcome.history] == [4, 4, 4]
    assert sum(written[t.name] for t in job.spec.tenants) == sum(
        float(r["weight"]) for r in outcome.history[-1:]
    )
    assert outcome.checkpoint is not None
    accuracy = held_out_accuracy(job, outcome.checkpoint.weights)
    assert accuracy > 0.85 > start, (start, accuracy)
    assert all(w.rounds_done == 3 for w in outcome.workers)


def test_the_script_alone_trains_once_as_it_did_before_fedkube(tmp_path):
    # prepare
    job = script_job(tmp_path)
    digit_files.write_images(job, tmp_path)
    # execute
    done = subprocess.run(
        [sys.executable, "-m", SCRIPT, "--data", str(tmp_path / "a"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # assert
    assert done.returncode == 0, done.stderr
    assert "standalone" in done.stderr


async def test_a_script_that_raises_loses_that_round_and_starts_afresh_for_the_next(
    redis_server, tmp_path, caplog
):
    # prepare: a script that raises at tenant b in round 2
    document = small_job_dict(
        rounds=3,
        task={"script": "tests.scanner_script"},
        participation={"minFraction": 0.5, "roundTimeoutSeconds": 10},
    )
    del document["spec"]["data"]["entrypoint"]
    job = parse_job(document)
    caplog.set_level(logging.ERROR, logger="fedkube.worker")
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: b sat round 2 out, with the script's traceback in the log, and came back
    assert outcome.status == "succeeded", outcome
    assert [r["reported"] for r in outcome.history] == [4, 3, 4]
    failures = [r.getMessage() for r in caplog.records if "the task failed" in r.getMessage()]
    assert len(failures) == 1, failures
    assert "tests.scanner_script raised: RuntimeError: scanner of b is offline" in failures[0]
    assert 'scanner_script.py", line' in failures[0]
    assert next(w for w in outcome.workers if w.tenant == "b").rounds_done == 2
