"""What a worker needs of the job's strategy, from the one definition both sides share.

fedkube.training.strategy_client exists so that the worker need not import
fedkube.aggregator; the server side takes the same pieces from it.
"""

import numpy as np
import pytest

from fedkube.aggregator.strategies import REGISTRY, scaffold
from fedkube.training import strategy_client


def test_every_server_strategy_has_a_client_side():
    assert set(strategy_client.CLIENT_STRATEGIES) == set(REGISTRY)
    assert REGISTRY["fednova"].fold_scale(6.0, 3) == 2.0
    assert REGISTRY["fedavg"].fold_scale(6.0, 3) == 6.0


def test_only_fedavg_like_strategies_accept_an_update_without_counted_steps():
    needs = {n for n, s in strategy_client.CLIENT_STRATEGIES.items() if s.needs_steps}
    assert needs == {"fedprox", "scaffold", "fednova"}


def test_a_scaffold_downlink_splits_into_the_model_and_its_control_variate():
    # prepare: what the server sends down, the model beside control/<name>
    weights = {"a": np.ones((3, 2), np.float32), "b": np.zeros(4, np.float32)}
    control = {scaffold.CONTROL + n: np.full(w.shape, 0.5, np.float32) for n, w in weights.items()}
    # execute
    model, variate = strategy_client.split(scaffold.downlink(weights, control))
    # assert
    assert model.keys() == weights.keys() and variate.keys() == weights.keys()
    np.testing.assert_array_equal(variate["a"], np.full((3, 2), 0.5, np.float32))


def test_the_control_update_needs_a_local_step():
    # Option II divides by K·η_l (its formula: tests/unit/test_strategy_scaffold.py).
    one = {"w": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="at least one local step"):
        strategy_client.client_control_update(one, one, one, one, 0, 0.05)
