"""FedProx: the proximal gradient reaches the optimizer step, and what it does to training."""

from __future__ import annotations

import numpy as np
import torch

from fedkube.datasets import ArrayData
from fedkube.spec import parse_job
from fedkube.task import TaskContext, load_task
from fedkube.training.learning import train_local
from fedkube.training.strategy_hooks import client_strategy
from tests.support import small_job_dict


def test_a_step_under_fedprox_adds_mu_times_the_drift_from_the_round_start_to_the_gradient():
    # prepare: a parameter that drifted from its round-start value before the step
    weight = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    model = torch.nn.Module()
    model.register_parameter("w", weight)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    # execute
    with client_strategy(model, proximal_mu=0.5) as steps:
        with torch.no_grad():
            weight.sub_(torch.tensor([1.0, 2.0]))  # now (0, 1): drift (-1, -2)
        weight.grad = torch.zeros(2)
        optimizer.step()
    # assert: the gradient got 0.5·(-1, -2), so the step moved w by (0.5, 1)
    np.testing.assert_allclose(weight.detach().numpy(), [0.5, 2.0])
    assert steps.steps == 1 and steps.rate() == 1.0


def test_a_large_mu_keeps_local_training_near_the_global_model():
    # prepare: the same data, seed and start, with and without the proximal term
    rng = np.random.default_rng(0)
    data = ArrayData(rng.standard_normal((64, 4)).astype(np.float32), rng.integers(0, 3, 64))
    job = parse_job(small_job_dict(training={"epochs": 5, "batchSize": 8, "learningRate": 0.1}))
    task = load_task(job)

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in model.parameters()]
        ctx = TaskContext(job, "train", seed=1)
        result = train_local(task, model, data, ctx, proximal_mu=mu)
        assert result.steps == 5 * 8
        return sum(
            float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before, strict=True)
        )

    # execute
    free, held = drift(0.0), drift(10.0)
    # assert
    assert held < 0.5 * free
