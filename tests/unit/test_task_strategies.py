"""FedProx and SCAFFOLD reach a loop the user wrote: the same models as the built-in loop.

The user's loop is ``fedkube.examples.digits_task``: plain PyTorch (a
DataLoader, torch.optim.SGD with momentum, cross-entropy) that never
mentions a strategy. The built-in loop is the classifier task. Both run
through the worker's ``compute_update``, so the updates compared are the
ones that would be sent, SCAFFOLD's ``Δc`` included. A third, hand-written
loop adds the proximal term to the loss and ``c − c_i`` to the gradients
itself, so that the hooks are checked against the formulas and not only
against each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedkube.aggregator.strategies import scaffold
from fedkube.spec import FederatedJob, parse_job
from fedkube.training.learning import build_model, float_state, load_data, load_float_state
from fedkube.wire import signing
from fedkube.workers.pipeline import LocalUpdate, round_seed
from fedkube.workers.runtime import Worker, WorkerConfig
from tests.support import small_job_dict, tenant_signing_key

TRAINING = {"epochs": 2, "batchSize": 16, "learningRate": 0.05, "momentum": 0.9}
USER_TASK = {"entrypoint": "fedkube.examples.digits_task:DigitsTask", "kwargs": {"hidden": 16}}
MU = 0.5
TOLERANCE = 1e-5


def job_of(strategy: str, user_loop: bool, script: bool = False) -> FederatedJob:
    spec: dict[str, Any] = {
        "strategy": {"name": strategy, "proximalMu": MU},
        "training": TRAINING,
    }
    document = small_job_dict(**spec)
    if script:
        document["spec"]["task"] = {"script": "tests.digits_script_loop"}
        document["spec"]["model"]["kwargs"] = {"hidden": 16}
    elif user_loop:
        document["spec"]["task"] = USER_TASK
        del document["spec"]["model"]
        del document["spec"]["data"]["entrypoint"]
    return parse_job(document)


def one_update(job: FederatedJob, state_dir: Path) -> tuple[LocalUpdate, dict[str, np.ndarray]]:
    """Round 1 of client ``a-0`` from the initial model (and a non-zero SCAFFOLD ``c``)."""
    client = job.clients()[0]
    worker = Worker(
        WorkerConfig(
            job=job,
            clients=[client],
            combiner_url="http://127.0.0.1:9",
            token="unused",
            signing_key=signing.load_signing_key(tenant_signing_key(client.tenant), "test"),
            state_dir=state_dir,
        )
    )
    weights = float_state(build_model(job))
    payload = dict(weights)
    if job.spec.strategy.name == "scaffold":
        rng = np.random.default_rng(11)
        control = {
            scaffold.CONTROL + n: rng.normal(0, 0.05, w.shape).astype(np.float32)
            for n, w in weights.items()
        }
        payload = scaffold.downlink(weights, control)
    seat = worker.seats[client.id]
    try:
        return worker.compute_update(seat, worker._data(seat), payload, 1), payload
    finally:
        worker.task.close()


def hand_written(job: FederatedJob, payload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The strategy's formulas written into the loop by hand: the reference."""
    weights, control = scaffold.split(payload)
    model = build_model(job)
    load_float_state(model, weights)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    arrays = load_data(job, "train", job.clients()[0])
    data = TensorDataset(torch.as_tensor(arrays.x), torch.as_tensor(arrays.y))
    seed = round_seed(job.spec.seed, job.clients()[0].id, 1)
    loader = DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _epoch in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if job.spec.strategy.name == "fedprox":
                drift = sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters())
                loss = loss + 0.5 * MU * drift
            loss.backward()
            for name, param in model.named_parameters():
                if name in control:
                    param.grad.add_(torch.as_tensor(control[name]))
            optimizer.step()
    return float_state(model)


@pytest.mark.parametrize("strategy", ["fedprox", "scaffold"])
def test_a_user_written_loop_gets_the_strategy_and_trains_the_built_in_loops_model(
    strategy, tmp_path
):
    # prepare
    builtin_job, user_job = job_of(strategy, False), job_of(strategy, True)
    # execute
    builtin, payload = one_update(builtin_job, tmp_path / "builtin")
    user, user_payload = one_update(user_job, tmp_path / "user")
    reference = hand_written(builtin_job, payload)
    # assert: the same start, the same update (Δw and SCAFFOLD's Δc), the same steps
    assert payload.keys() == user_payload.keys()
    assert all(np.array_equal(payload[n], user_payload[n]) for n in payload)
    assert builtin.steps == user.steps > 0
    assert builtin.delta.keys() == user.delta.keys()
    for name in builtin.delta:
        np.testing.assert_allclose(user.delta[name], builtin.delta[name], atol=TOLERANCE, rtol=0)
    weights, _control = scaffold.split(payload)
    for name, start in weights.items():
        np.testing.assert_allclose(
            start + builtin.delta[name], reference[name], atol=TOLERANCE, rtol=0
        )
    if strategy == "scaffold":
        assert any(n.startswith(scaffold.CONTROL) for n in user.delta)


def test_without_the_strategy_the_hand_written_reference_differs(tmp_path):
    # prepare: the reference with FedProx, against FedAvg's update (no proximal term)
    plain, payload = one_update(job_of("fedavg", True), tmp_path / "plain")
    # execute
    reference = hand_written(job_of("fedprox", False), payload)
    # assert: μ = 0.5 moves the weights well beyond the tolerance (the check can fail)
    gaps = [np.abs(payload[n] + plain.delta[n] - reference[n]).max() for n in reference]
    assert max(gaps) > 100 * TOLERANCE


@pytest.mark.parametrize("strategy", ["fedprox", "scaffold"])
def test_a_client_api_script_gets_the_strategy_and_trains_the_same_update_as_the_task(
    strategy, tmp_path
):
    # prepare: the task's loop, and the same loop as a script that keeps its own main
    task_job, script_job = job_of(strategy, True), job_of(strategy, False, script=True)
    # execute
    task, payload = one_update(task_job, tmp_path / "task")
    script, _payload = one_update(script_job, tmp_path / "script")
    # assert
    assert script.steps == task.steps > 0
    assert script.delta.keys() == task.delta.keys()
    for name in task.delta:
        np.testing.assert_allclose(script.delta[name], task.delta[name], atol=TOLERANCE, rtol=0)
