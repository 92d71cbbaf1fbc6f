"""Every strategy through the real hierarchy: real Redis, HTTP, workers and torch.

Short runs of the small digits job in one process (tests/federation.py): what
is checked is that each strategy's client side, combiner fold and server step
work together and leave the state they promise, not how well they learn
(``fedkube compare --strategies`` measures that).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.strategies import REGISTRY, scaffold
from fedkube.spec import parse_job
from fedkube.training.learning import load_data
from fedkube.workers.client_state import ClientState
from fedkube.workers.pipeline import SCAFFOLD_STATE
from tests.federation import federate
from tests.support import small_job_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def job_with(strategy: dict, rounds: int = 3, learning_rate: float = 0.05):
    document = small_job_dict(
        rounds=rounds,
        strategy=strategy,
        training={"epochs": 2, "batchSize": 16, "learningRate": learning_rate, "momentum": 0.9},
        participation={"minFraction": 1.0, "roundTimeoutSeconds": 30},
    )
    return parse_job(document)


# FedAdagrad's second moment only grows: at the shared default server rate of 0.1
# its first steps are ten times smaller than FedAdam's, too slow for three rounds.
SERVER_LR = {"fedadagrad": {"serverLearningRate": 0.5}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
async def test_every_strategy_trains_through_the_hierarchy(redis_server, tmp_path, name):
    # prepare
    job = job_with({"name": name, **SERVER_LR.get(name, {})})
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: it learned, and the history and checkpoint say which strategy with what state
    assert outcome.status == "succeeded", outcome
    assert outcome.accuracy[-1] > 0.5, outcome  # 10 classes: chance is 0.1
    assert all(r["strategy"] == name and r["robust"] == "none" for r in outcome.history)
    assert outcome.checkpoint is not None
    stateful = bool(REGISTRY[name].module.init_state(outcome.checkpoint.weights, job.spec.strategy))
    assert bool(outcome.checkpoint.state) == stateful
    assert bool(outcome.history[-1]["server_state"]) == stateful


async def test_scaffolds_server_variate_is_the_weighted_mean_of_the_clients_own(
    redis_server, tmp_path
):
    # prepare: full participation, so c = Σ p_i·c_i holds after every round when
    # every Δc went up through the combiners and every c_i was kept by its client
    job = job_with({"name": "scaffold"})
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert
    assert outcome.status == "succeeded" and outcome.checkpoint is not None, outcome
    server_c = scaffold.split(outcome.checkpoint.state)[1]
    sizes = {c.id: len(load_data(job, "train", c)) for c in job.clients()}
    total = sum(sizes.values())
    kept = {
        c.id: ClientState(tmp_path / "clients" / c.id, job.name, c.id).load(
            SCAFFOLD_STATE, before_round=job.spec.rounds + 1
        )
        for c in job.clients()
    }
    assert all(state is not None for state in kept.values())
    for name, c in server_c.items():
        mean = sum(sizes[i] / total * kept[i][name].astype(np.float64) for i in kept)
        np.testing.assert_allclose(c, mean, rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(next(iter(server_c.values()))) > 0


async def test_a_robust_rule_wraps_a_server_optimizer(redis_server, tmp_path):
    # prepare: FedAdam's step on a per-region coordinate-wise median
    job = job_with({"name": "fedadam", "robust": {"rule": "median", "normBound": 5.0}})
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert
    assert outcome.status == "succeeded", outcome
    assert {(r["strategy"], r["robust"]) for r in outcome.history} == {("fedadam", "median")}
    assert set(outcome.history[-1]["server_state"]) == {
        "first_moment_norm",
        "second_moment_norm",
    }
