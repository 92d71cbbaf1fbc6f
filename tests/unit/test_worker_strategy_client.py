"""The worker's copy of the strategies' client side agrees with the aggregator's.

fedkube.strategy_client exists so that the worker need not import
fedkube.aggregator; these tests pin it to the server side's definitions
(the flags, FedNova's fold coefficient, SCAFFOLD's split and option II, and
the norm clip that DP's clipNorm applies).
"""

import numpy as np
import pytest

from fedkube import strategy_client
from fedkube.aggregator.strategies import REGISTRY, norm_bound, scaffold
from fedkube.aggregator.validation import l2_norm


def test_every_server_strategy_has_a_client_side_with_the_same_flags_and_fold():
    assert set(strategy_client.CLIENT_STRATEGIES) == set(REGISTRY)
    for name, server in REGISTRY.items():
        client = strategy_client.CLIENT_STRATEGIES[name]
        assert (client.proximal, client.control_variates, client.needs_local_steps) == (
            server.proximal,
            server.control_variates,
            server.needs_local_steps,
        ), name
        for weight, steps in ((3.0, 4), (10.0, 1), (0.5, 7)):
            assert client.fold_scale(weight, steps) == server.fold_scale(weight, steps), name


def test_only_fedavg_like_strategies_accept_an_update_without_counted_steps():
    needs = {n for n, s in strategy_client.CLIENT_STRATEGIES.items() if s.needs_steps}
    assert needs == {"fedprox", "scaffold", "fednova"}


def test_scaffold_split_and_control_update_match_the_servers():
    rng = np.random.default_rng(3)
    weights = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": np.ones(4, np.float32)}
    control = {
        scaffold.CONTROL + n: rng.normal(size=w.shape).astype(np.float32)
        for n, w in weights.items()
    }
    payload = scaffold.downlink(weights, control)
    assert strategy_client.CONTROL == scaffold.CONTROL
    ours, theirs = strategy_client.split(payload), scaffold.split(payload)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.keys() == reference.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], reference[name])
    c = theirs[1]
    c_i = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in c.items()}
    end = {n: w + 0.1 for n, w in weights.items()}
    mine_new, mine_delta = strategy_client.client_control_update(c_i, c, weights, end, 5, 0.05)
    ref_new, ref_delta = scaffold.client_control_update(c_i, c, weights, end, 5, 0.05)
    for name in c:
        np.testing.assert_array_equal(mine_new[name], ref_new[name])
        np.testing.assert_array_equal(mine_delta[name], ref_delta[name])
    with pytest.raises(ValueError, match="at least one local step"):
        strategy_client.client_control_update(c_i, c, weights, end, 0, 0.05)


@pytest.mark.parametrize("bound", [0.5, 2.0, 1e6])
def test_the_dp_clip_is_the_norm_bound_clip(bound):
    rng = np.random.default_rng(5)
    update = {"w": rng.normal(size=(10, 3)).astype(np.float32), "b": np.full(3, 0.7, np.float32)}
    assert strategy_client.l2_norm(update) == l2_norm(update)
    mine, my_scale = strategy_client.clip(update, bound)
    ref, ref_scale = norm_bound.clip(update, bound)
    assert my_scale == ref_scale
    for name in update:
        np.testing.assert_array_equal(mine[name], ref[name])
        assert mine[name].dtype == np.float32
    assert strategy_client.l2_norm(mine) <= bound * (1 + 1e-6)


def test_the_clip_scale_of_edge_norms():
    assert strategy_client.clip_scale(0.0, 1.0) == 1.0
    assert strategy_client.clip_scale(float("inf"), 1.0) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        strategy_client.clip_scale(float("nan"), 1.0)
    with pytest.raises(ValueError, match="bound"):
        strategy_client.clip_scale(1.0, 0.0)
