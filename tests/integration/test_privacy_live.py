"""Differential privacy through the real tiers: a real redis-server, real HTTP, real workers.

The noise the global tier adds is measured on a round whose clients all send
zeros (so the model's change is the noise alone); clipping is checked by a
client that does not clip, whose update the combiner refuses by name; the
budget by a job that must stop before a round would pass it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedkube.datasets import ArrayData
from fedkube.spec import DpMode, parse_job
from fedkube.training import privacy
from fedkube.training.learning import build_model, float_state
from fedkube.workers.pipeline import LocalUpdate
from fedkube.workers.runtime import Worker
from fedkube.workers.seat import Seat
from tests.federation import federate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

CLIENTS = 8


def dp_job(name: str, rounds: int, **dp: object) -> dict:
    spec = {
        "rounds": rounds,
        "seed": 3,
        "model": {
            "entrypoint": "fedkube.examples.synthetic:make_model",
            "kwargs": {"features": 32, "classes": 10, "hidden": 128, "layers": 2},
        },
        "data": {
            "entrypoint": "fedkube.examples.synthetic:make_data",
            "kwargs": {"samples": 1600, "features": 32, "classes": 10},
            "partition": {"scheme": "iid"},
        },
        "regions": [{"name": "eu"}, {"name": "us"}],
        "tenants": [
            {"name": f"t{i}", "region": "eu" if i < CLIENTS // 2 else "us"} for i in range(CLIENTS)
        ],
        "training": {"epochs": 1, "batchSize": 16, "learningRate": 0.1},
        "participation": {"fraction": 1.0, "minFraction": 0.5, "roundTimeoutSeconds": 30},
        "privacy": {"dp": {"mode": "central", **dp}},
        "evaluation": {"everyRounds": rounds},
    }
    return {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": spec,
    }


class ZeroWorker(Worker):
    """Trains, then sends a zero update: the round's change is the noise alone."""

    def compute_update(
        self, seat: Seat, data: ArrayData, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        update = super().compute_update(seat, data, payload, number)
        update.delta = {name: np.zeros_like(d) for name, d in update.delta.items()}
        return update


class UnclippedWorker(Worker):
    """Skips the clip and sends a large update (what a faulty or hostile client might)."""

    def _privatise(self, update: LocalUpdate) -> LocalUpdate:
        update.delta = {name: 100.0 * d for name, d in update.delta.items()}
        return update


async def test_the_global_tier_adds_noise_once_with_the_calibrated_deviation(
    redis_server, tmp_path
):
    # prepare: 8 clients in 2 regions sending zeros; noise multiplier 2, clip 1
    job = parse_job(dp_job("noise", 1, clipNorm=1.0, noiseMultiplier=2.0))
    before = float_state(build_model(job))
    zeros = {f"t{i}-0": ZeroWorker for i in range(CLIENTS)}
    # execute
    outcome = await federate(job, redis_server.url, tmp_path, zeros)
    # assert: the model moved by N(0, (z·S/m)²) per value: noise once, on the mean
    # of all regions' updates (per region it would be √2 larger)
    assert outcome.status == "succeeded", outcome
    assert outcome.checkpoint is not None
    change = np.concatenate(
        [(outcome.checkpoint.weights[n] - w).reshape(-1) for n, w in before.items()]
    )
    assert change.size > 20_000
    assert float(change.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(change.std()) == pytest.approx(2.0 * 1.0 / CLIENTS, rel=0.03)
    # and the round's privacy is in the history, as the accountant computes it
    record = outcome.history[0]
    expected = privacy.epsilon_of(DpMode.central, 2.0, [1.0], 1e-5)
    assert record["epsilon"] == pytest.approx(expected, rel=1e-5)
    assert (record["delta"], record["noise_multiplier"], record["dp_rate"]) == (1e-5, 2.0, 1.0)


async def test_every_client_is_clipped_and_an_unclipped_update_is_refused_by_name(
    redis_server, tmp_path, caplog
):
    # prepare: a small clip bound; one client does not clip. Each round waits out its
    # deadline for that client, so the deadline is short (the others take about a second).
    document = dp_job("clip", 2, clipNorm=0.05, noiseMultiplier=0.5)
    document["spec"]["participation"]["roundTimeoutSeconds"] = 12
    job = parse_job(document)
    caplog.set_level(logging.WARNING, logger="fedkube")
    # execute
    outcome = await federate(job, redis_server.url, tmp_path, {"t0-0": UnclippedWorker})
    # assert: the seven clients that clip are in every round, the eighth never
    assert outcome.status == "succeeded", outcome
    assert [(r["reported"], r["dropped"]) for r in outcome.history] == [(7, 1), (7, 1)]
    refusals = [r for r in caplog.records if "over_clip_norm" in r.getMessage()]
    assert refusals and all(getattr(r, "client", None) == "t0-0" for r in refusals)
    assert "spec.privacy.dp.clipNorm 0.05" in refusals[0].getMessage()
    # under DP each client counts once, whatever its sample count
    assert all(r["weight"] == 7 for r in outcome.history)


async def test_a_job_stops_before_a_round_would_pass_its_privacy_budget(redis_server, tmp_path):
    # prepare: a budget that two rounds fit and three do not
    two = privacy.epsilon_of(DpMode.central, 1.0, [1.0, 1.0], 1e-5)
    three = privacy.epsilon_of(DpMode.central, 1.0, [1.0] * 3, 1e-5)
    budget = (two + three) / 2
    job = parse_job(dp_job("budget", 5, clipNorm=1.0, noiseMultiplier=1.0, budget=budget))
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: two rounds ran, the job succeeded and says why it stopped
    assert outcome.status == "succeeded"
    assert [r["round"] for r in outcome.history] == [1, 2]
    assert outcome.history[-1]["epsilon"] == pytest.approx(two, rel=1e-5)
    assert "privacy budget reached" in outcome.message and "round 3" in outcome.message
