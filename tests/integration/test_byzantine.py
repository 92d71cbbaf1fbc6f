"""Byzantine tenants: 20 % of the clients attack, robust rules hold the line.

The whole federation runs in the test's event loop on a real redis-server
and real loopback HTTP: a global aggregator, a combiner per region and twenty
real workers training the digits model. The attackers are workers of this
test's own subclasses (sign flip ×10, Gaussian noise, ×1000 scaling): the
attack is reachable only from here, never from a manifest.

Data are split IID so that a robust rule's own cost under label skew does not
blur the attack's effect: what is measured is the attack.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedkube.datasets import ArrayData
from fedkube.spec import FederatedJob, parse_job
from fedkube.state.redis_server import RedisServer
from fedkube.workers.pipeline import LocalUpdate
from fedkube.workers.runtime import Worker
from fedkube.workers.seat import Seat
from tests.federation import federate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

TENANTS = [f"t{i}" for i in range(20)]  # t0..t9 in eu, t10..t19 in us


class SignFlipWorker(Worker):
    """Sends −10 × its honest update."""

    def compute_update(
        self, seat: Seat, data: ArrayData, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        update = super().compute_update(seat, data, payload, number)
        update.delta = {k: -10.0 * v for k, v in update.delta.items()}
        return update


class GaussianWorker(Worker):
    """Sends noise, 10 × the spread of an honest update."""

    def compute_update(
        self, seat: Seat, data: ArrayData, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        update = super().compute_update(seat, data, payload, number)
        rng = np.random.default_rng(number)
        update.delta = {
            k: rng.normal(0.0, 10.0 * float(v.std()) + 1e-3, v.shape).astype(np.float32)
            for k, v in update.delta.items()
        }
        return update


class ScaledWorker(Worker):
    """Sends its honest update scaled ×1000 (a boosted, model-replacement-style update)."""

    def compute_update(
        self, seat: Seat, data: ArrayData, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        update = super().compute_update(seat, data, payload, number)
        update.delta = {k: 1000.0 * v for k, v in update.delta.items()}
        return update


# 20 % of the clients, both attacks in each region (robust rules run per region).
ATTACKERS: dict[str, type[Worker]] = {
    "t0-0": SignFlipWorker,
    "t1-0": GaussianWorker,
    "t10-0": SignFlipWorker,
    "t11-0": GaussianWorker,
}


def byzantine_job(strategy: dict[str, Any]) -> FederatedJob:
    return parse_job(
        {
            "apiVersion": "fedkube.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "byzantine"},
            "spec": {
                "rounds": 20,
                "seed": 11,
                "model": {
                    "entrypoint": "fedkube.examples.digits:make_model",
                    "kwargs": {"hidden": 64},
                },
                "data": {
                    "entrypoint": "fedkube.examples.digits:make_data",
                    "partition": {"scheme": "iid"},
                },
                "regions": [{"name": "eu"}, {"name": "us"}],
                "tenants": [
                    {"name": name, "region": "eu" if i < 10 else "us"}
                    for i, name in enumerate(TENANTS)
                ],
                "training": {"epochs": 3, "batchSize": 16, "learningRate": 0.05, "momentum": 0.9},
                "participation": {
                    "minFraction": 1.0,
                    "roundTimeoutSeconds": 20,
                    "onQuorumMissed": "fail",
                },
                "strategy": strategy,
            },
        }
    )


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory) -> float:
    """FedAvg with every client honest: the settled accuracy robust runs are held to."""
    root = tmp_path_factory.mktemp("clean")
    with RedisServer(root / "redis") as redis:
        clean = asyncio.run(federate(byzantine_job({"name": "fedavg"}), redis.url, root, {}))
    assert clean.status == "succeeded" and len(clean.accuracy) == 20, clean
    return clean.settled


async def test_fedavg_breaks_under_twenty_percent_attackers(redis_server, tmp_path, clean_accuracy):
    # execute
    attacked = await federate(
        byzantine_job({"name": "fedavg"}), redis_server.url, tmp_path, ATTACKERS
    )
    # assert: a visible drop (or a job that fails outright, its model gone non-finite)
    print(f"FedAvg: clean {clean_accuracy:.4f}, attacked: {attacked}")
    assert clean_accuracy > 0.9
    assert attacked.settled < clean_accuracy - 0.2


@pytest.mark.parametrize(
    "robust",
    [
        {"rule": "median"},
        {"rule": "trimmedMean", "trimFraction": 0.2},
        {"rule": "multiKrum", "byzantine": 2},
    ],
    ids=["median", "trimmedMean", "multiKrum"],
)
async def test_a_robust_rule_holds_accuracy_under_twenty_percent_attackers(
    redis_server, tmp_path, clean_accuracy, robust
):
    # execute
    attacked = await federate(
        byzantine_job({"name": "fedavg", "robust": robust}), redis_server.url, tmp_path, ATTACKERS
    )
    # assert: within 2 points of the clean FedAvg run
    print(f"{robust['rule']}: clean {clean_accuracy:.4f}, attacked: {attacked}")
    assert attacked.status == "succeeded", attacked
    assert attacked.settled >= clean_accuracy - 0.02


async def test_norm_bound_contains_one_client_scaled_a_thousandfold(
    redis_server, tmp_path, clean_accuracy
):
    # prepare
    scaled: dict[str, type[Worker]] = {"t3-0": ScaledWorker}
    # execute
    unbounded = await federate(
        byzantine_job({"name": "fedavg"}), redis_server.url, tmp_path / "unbounded", scaled
    )
    bounded = await federate(
        byzantine_job({"name": "fedavg", "robust": {"normBound": 2.0}}),
        redis_server.url,
        tmp_path / "bounded",
        scaled,
    )
    # assert
    print(f"x1000: clean {clean_accuracy:.4f}, unbounded: {unbounded}, bounded: {bounded}")
    assert unbounded.settled < clean_accuracy - 0.2
    assert bounded.status == "succeeded", bounded
    assert bounded.settled >= clean_accuracy - 0.02
