"""FedNova maths: normalised folding through the hierarchy, then τ_eff."""

from __future__ import annotations

import numpy as np

from fedkube.aggregator.strategies import fednova
from fedkube.aggregator.strategies.sums import Partial, WeightedSum, aggregate_partials
from fedkube.spec import Strategy


def test_fednova_through_two_regions_matches_the_papers_formula():
    # prepare: three clients (w, τ, Δ); two in one region, one in the other
    clients = [
        (10.0, 2, np.array([4.0, 0.0], np.float32)),
        (30.0, 6, np.array([6.0, 12.0], np.float32)),
        (60.0, 3, np.array([-3.0, 3.0], np.float32)),
    ]
    partials = []
    for region, members in (("eu", clients[:2]), ("us", clients[2:])):
        acc = WeightedSum.zeros_like({"w": members[0][2]})
        for weight, steps, delta in members:
            acc.fold({"w": delta}, weight, fednova.fold_scale(weight, steps), steps)
        partials.append(Partial(region, acc.sums, acc.weight, acc.count, acc.steps))
    weights = {"w": np.zeros(2, np.float32)}
    # execute
    aggregate = aggregate_partials(partials, population=3)
    new, state = fednova.server_step(weights, aggregate, {}, Strategy(name="fednova"))
    # assert, by hand: p = (0.1, 0.3, 0.6); Σp·Δ/τ = 0.1·(2,0) + 0.3·(1,2) + 0.6·(−1,1)
    #   = (−0.1, 1.2); τ_eff = 0.1·2 + 0.3·6 + 0.6·3 = 3.8; Δ = (−0.38, 4.56)
    assert aggregate.mean_local_steps == 3.8
    np.testing.assert_allclose(new["w"], [-0.38, 4.56], rtol=1e-5)
    assert state == {}


def test_with_equal_steps_fednova_is_fedavg():
    # prepare
    deltas = [np.array([1.0, 2.0], np.float32), np.array([3.0, -2.0], np.float32)]
    acc = WeightedSum.zeros_like({"w": deltas[0]})
    for weight, delta in zip((1.0, 3.0), deltas, strict=True):
        acc.fold({"w": delta}, weight, fednova.fold_scale(weight, 5), 5)
    # execute
    aggregate = aggregate_partials([Partial("eu", acc.sums, acc.weight, acc.count, acc.steps)], 2)
    new, _ = fednova.server_step({"w": np.zeros(2, np.float32)}, aggregate, {}, Strategy())
    # assert: the FedAvg mean (0.25·(1,2) + 0.75·(3,−2)) = (2.5, −1)
    np.testing.assert_allclose(new["w"], [2.5, -1.0], rtol=1e-6)
