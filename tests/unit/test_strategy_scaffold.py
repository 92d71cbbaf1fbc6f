"""SCAFFOLD maths: the client's option-II control update and the server step."""

from __future__ import annotations

import numpy as np

from fedkube.aggregator.strategies import scaffold
from fedkube.aggregator.strategies.sums import RoundAggregate
from fedkube.spec import Strategy
from fedkube.training import strategy_client


def arrays(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_the_client_control_update_is_option_two_of_the_paper():
    # prepare: x (round start), y (after K=4 steps at lr 0.5), c, c_i
    start, end = {"w": arrays(1.0, 2.0)}, {"w": arrays(0.0, 4.0)}
    c, c_i = {"w": arrays(0.1, -0.2)}, {"w": arrays(0.3, 0.0)}
    # execute
    new, delta = strategy_client.client_control_update(
        c_i, c, start, end, steps=4, learning_rate=0.5
    )
    # assert: c_i⁺ = c_i − c + (x − y)/(K·η) = (0.3−0.1+1/2, 0+0.2−2/2) = (0.7, −0.8)
    np.testing.assert_allclose(new["w"], [0.7, -0.8], rtol=1e-6)
    np.testing.assert_allclose(delta["w"], [0.4, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(c_i["w"], arrays(0.3, 0.0))  # untouched


def test_the_server_moves_the_model_and_c_by_the_participating_share():
    # prepare: 2 of 8 clients reported; mean Δy = (1, −1), mean Δc = (4, 8)
    weights = {"w": arrays(1.0, 1.0)}
    state = {"control/w": arrays(0.5, 0.5)}
    aggregate = RoundAggregate(
        delta={"w": arrays(1.0, -1.0), "control/w": arrays(4.0, 8.0)},
        weight=20.0,
        count=2,
        mean_local_steps=3.0,
        population=8,
    )
    # execute
    new_weights, new_state = scaffold.server_step(
        weights, aggregate, state, Strategy(name="scaffold", server_learning_rate=0.5)
    )
    # assert: x + η·Δy = (1.5, 0.5); c + (2/8)·Δc = (1.5, 2.5)
    np.testing.assert_allclose(new_weights["w"], [1.5, 0.5])
    np.testing.assert_allclose(new_state["control/w"], [1.5, 2.5])
    np.testing.assert_array_equal(state["control/w"], arrays(0.5, 0.5))
    assert scaffold.state_summary(new_state)["control_variate_norm"] == np.float32(
        np.hypot(1.5, 2.5)
    )


def test_the_control_variate_travels_with_the_model_and_splits_back():
    # prepare
    weights = {"layer.weight": arrays(1.0), "layer.bias": arrays(2.0)}
    state = scaffold.init_state(weights, Strategy(name="scaffold"))
    # execute
    payload = scaffold.downlink(weights, state)
    model, control = scaffold.split(payload)
    # assert
    assert sorted(payload) == [
        "control/layer.bias",
        "control/layer.weight",
        "layer.bias",
        "layer.weight",
    ]
    assert model.keys() == control.keys() == weights.keys()
    assert all(not c.any() for c in control.values())
