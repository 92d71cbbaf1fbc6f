"""Server optimizers: FedAvgM (Hsu et al. 2019) and FedAdam / FedYogi / FedAdagrad
(Reddi et al. 2021), each step checked against a hand computation."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from fedkube.aggregator.strategies import fedadagrad, fedadam, fedavg, fedavgm, fedyogi
from fedkube.aggregator.strategies.sums import RoundAggregate
from fedkube.spec import Strategy

ADAPTIVE = [fedadam, fedyogi, fedadagrad]


def f32(values) -> np.ndarray:
    return np.array(values, np.float32)


def frozen(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only copies: any write into an input raises instead of passing silently."""
    copies = {name: a.copy() for name, a in tensors.items()}
    for array in copies.values():
        array.setflags(write=False)
    return copies


def aggregate_of(delta: dict[str, np.ndarray]) -> RoundAggregate:
    return RoundAggregate(delta=delta, weight=10.0, count=2, mean_local_steps=1.0, population=2)


def assert_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name, array in expected.items():
        assert actual[name].dtype == np.float32, name
        np.testing.assert_allclose(actual[name], array, rtol=1e-6, atol=1e-7, err_msg=name)


# -- FedAvgM ------------------------------------------------------------------


def test_fedavgm_step_is_momentum_then_server_lr():
    # prepare
    params = Strategy(name="fedavgm", server_momentum=0.9, server_learning_rate=0.5)
    weights = frozen({"w": f32([1.0, 2.0]), "b": f32([[0.0]])})
    state = frozen({"v/w": f32([0.5, -1.0]), "v/b": f32([[2.0]])})
    delta = frozen({"w": f32([0.1, 0.2]), "b": f32([[-1.0]])})

    # execute
    new_weights, new_state = fedavgm.server_step(weights, aggregate_of(delta), state, params)

    # assert: v = 0.9·v + Δ; w = w + 0.5·v
    assert_tensors(new_state, {"v/w": f32([0.55, -0.7]), "v/b": f32([[0.8]])})
    assert_tensors(new_weights, {"w": f32([1.275, 1.65]), "b": f32([[0.4]])})


def test_fedavgm_two_rounds_from_the_initial_state():
    # prepare
    params = Strategy(name="fedavgm", server_momentum=0.5)  # η defaults to 1.0
    weights = {"w": f32([1.0, 1.0])}
    state = fedavgm.init_state(weights, params)
    first, second = {"w": f32([1.0, 0.0])}, {"w": f32([0.0, 2.0])}

    # execute
    weights1, state1 = fedavgm.server_step(weights, aggregate_of(first), state, params)
    weights2, state2 = fedavgm.server_step(weights1, aggregate_of(second), state1, params)

    # assert: v1 = Δ1 = [1, 0]; w1 = [2, 1]; v2 = 0.5·[1, 0] + [0, 2] = [0.5, 2]; w2 = [2.5, 3]
    assert_tensors(state, {"v/w": f32([0.0, 0.0])})
    assert_tensors(state1, {"v/w": f32([1.0, 0.0])})
    assert_tensors(weights1, {"w": f32([2.0, 1.0])})
    assert_tensors(state2, {"v/w": f32([0.5, 2.0])})
    assert_tensors(weights2, {"w": f32([2.5, 3.0])})


def test_fedavgm_without_momentum_is_fedavg():
    # prepare
    params = Strategy(name="fedavgm", server_momentum=0.0, server_learning_rate=0.7)
    weights = {"w": f32([1.0, -3.0, 0.25])}
    aggregate = aggregate_of({"w": f32([0.5, 0.5, -1.0])})

    # execute
    momentum, _ = fedavgm.server_step(
        weights, aggregate, fedavgm.init_state(weights, params), params
    )
    plain, _ = fedavg.server_step(weights, aggregate, {}, params)

    # assert
    assert_tensors(momentum, plain)


def test_fedavgm_summary_is_the_norm_of_the_whole_buffer():
    # prepare
    state = {"v/w": f32([3.0, 0.0]), "v/b": f32([[0.0, 4.0]])}

    # execute
    summary = fedavgm.state_summary(state)

    # assert
    assert summary == {"momentum_norm": pytest.approx(5.0)}


# -- FedAdam, FedYogi, FedAdagrad ---------------------------------------------

# β1 = 0.5, β2 = 0.75, τ = 0.5, η = 0.1 and a state that is not the initial one,
# so every branch of every rule shows (Yogi: v > Δ², v = Δ², v < Δ²). The values
# are exact in float32, so Yogi's tie v = Δ² is a real tie.
PARAMS = {"beta1": 0.5, "beta2": 0.75, "tau": 0.5, "server_learning_rate": 0.1}
WEIGHTS = {"a": f32([1.0, 2.0, 3.0, 4.0]), "b": f32([[0.5]])}
STATE = {
    "m/a": f32([0.2, -0.4, 0.0, 0.0]),
    "m/b": f32([[1.0]]),
    "v/a": f32([4.0, 2.25, 0.25, 0.25]),
    "v/b": f32([[0.25]]),
}
DELTA = {"a": f32([1.5, 1.5, 0.0, 1.5]), "b": f32([[0.5]])}  # Δ² = [2.25, 2.25, 0, 2.25], [[0.25]]
# m ← 0.5·m + 0.5·Δ, the same for the three rules
M_NEW = {"a": [0.85, 0.55, 0.0, 0.75], "b": [[0.75]]}
V_NEW = {
    # v ← 0.75·v + 0.25·Δ²
    fedadam.NAME: {"a": [3.5625, 2.25, 0.1875, 0.75], "b": [[0.25]]},
    # v ← v − 0.25·Δ²·sign(v − Δ²): signs [+, 0, +, −] and [[0]]
    fedyogi.NAME: {"a": [3.4375, 2.25, 0.25, 0.8125], "b": [[0.25]]},
    # v ← v + Δ²
    fedadagrad.NAME: {"a": [6.25, 4.5, 0.25, 2.5], "b": [[0.5]]},
}


@pytest.mark.parametrize("module", ADAPTIVE, ids=lambda m: m.NAME)
def test_adaptive_step_matches_the_hand_computation(module: ModuleType):
    # prepare
    params = Strategy(name=module.NAME, **PARAMS)
    weights, state, delta = frozen(WEIGHTS), frozen(STATE), frozen(DELTA)

    # execute
    new_weights, new_state = module.server_step(weights, aggregate_of(delta), state, params)

    # assert: w ← w + 0.1·m/(√v + 0.5)
    m_new, v_new = M_NEW, V_NEW[module.NAME]
    expected_weights = {
        name: WEIGHTS[name] + 0.1 * np.array(m_new[name]) / (np.sqrt(v_new[name]) + 0.5)
        for name in WEIGHTS
    }
    assert_tensors(
        new_state,
        {
            "m/a": f32(m_new["a"]),
            "m/b": f32(m_new["b"]),
            "v/a": f32(v_new["a"]),
            "v/b": f32(v_new["b"]),
        },
    )
    assert_tensors(new_weights, expected_weights)


@pytest.mark.parametrize("module", ADAPTIVE, ids=lambda m: m.NAME)
def test_adaptive_initial_state_is_zero_first_moment_and_tau_squared(module: ModuleType):
    # prepare
    params = Strategy(name=module.NAME, tau=0.5)

    # execute
    state = module.init_state({"a": f32([1.0, 2.0]), "b": f32([[3.0]])}, params)

    # assert
    assert_tensors(
        state,
        {
            "m/a": f32([0.0, 0.0]),
            "m/b": f32([[0.0]]),
            "v/a": f32([0.25, 0.25]),
            "v/b": f32([[0.25]]),
        },
    )


def test_first_fedadagrad_step_from_the_initial_state_uses_the_default_server_lr():
    # prepare: no explicit server learning rate: FedOpt's default 0.1
    params = Strategy(name="fedadagrad", beta1=0.5, tau=0.5)
    weights = {"w": f32([1.0, 1.0])}
    state = fedadagrad.init_state(weights, params)

    # execute
    new_weights, new_state = fedadagrad.server_step(
        weights, aggregate_of({"w": f32([1.2, 0.0])}), state, params
    )

    # assert: m = [0.6, 0]; v = 0.25 + [1.44, 0] = [1.69, 0.25]; w += 0.1·[0.6/(1.3+0.5), 0]
    assert params.server_lr == 0.1
    assert_tensors(new_state, {"m/w": f32([0.6, 0.0]), "v/w": f32([1.69, 0.25])})
    assert_tensors(new_weights, {"w": f32([1.0 + 0.1 * 0.6 / 1.8, 1.0])})


@pytest.mark.parametrize("module", [fedavgm, *ADAPTIVE], ids=lambda m: m.NAME)
def test_server_step_returns_new_arrays_and_leaves_its_inputs_alone(module: ModuleType):
    # prepare
    params = Strategy(name=module.NAME, **PARAMS)
    weights, delta = frozen(WEIGHTS), frozen(DELTA)
    state = frozen(module.init_state(WEIGHTS, params))
    before = {
        "weights": {k: a.copy() for k, a in weights.items()},
        "state": {k: a.copy() for k, a in state.items()},
        "delta": {k: a.copy() for k, a in delta.items()},
    }

    # execute
    new_weights, new_state = module.server_step(weights, aggregate_of(delta), state, params)

    # assert
    for name, inputs in (("weights", weights), ("state", state), ("delta", delta)):
        for key, array in inputs.items():
            np.testing.assert_array_equal(array, before[name][key])
    inputs_ids = {id(a) for group in (weights, state, delta) for a in group.values()}
    assert not inputs_ids & {id(a) for a in (*new_weights.values(), *new_state.values())}
    assert new_state.keys() == state.keys()
    assert all(a.dtype == np.float32 and a.flags.writeable for a in new_state.values())


@pytest.mark.parametrize("module", [fedavgm, *ADAPTIVE], ids=lambda m: m.NAME)
def test_a_state_without_buffers_starts_like_a_fresh_one(module: ModuleType):
    # prepare: e.g. a checkpoint written by FedAvg, whose state is empty
    params = Strategy(name=module.NAME, **PARAMS)
    aggregate = aggregate_of(DELTA)

    # execute
    from_empty = module.server_step(WEIGHTS, aggregate, {}, params)
    from_init = module.server_step(WEIGHTS, aggregate, module.init_state(WEIGHTS, params), params)

    # assert
    for got, want in zip(from_empty, from_init, strict=True):
        assert_tensors(got, want)


@pytest.mark.parametrize("module", [fedavgm, *ADAPTIVE], ids=lambda m: m.NAME)
def test_a_state_of_another_shape_is_an_error(module: ModuleType):
    params = Strategy(name=module.NAME)
    state = {key: np.zeros(7, np.float32) for key in module.init_state(WEIGHTS, params)}
    with pytest.raises(ValueError, match="shape"):
        module.server_step(WEIGHTS, aggregate_of(DELTA), state, params)


@pytest.mark.parametrize("module", ADAPTIVE, ids=lambda m: m.NAME)
def test_adaptive_summary_is_the_norm_of_each_moment(module: ModuleType):
    # prepare
    state = {
        "m/a": f32([3.0, 0.0]),
        "m/b": f32([[4.0]]),
        "v/a": f32([1.0, 2.0]),
        "v/b": f32([[2.0, 4.0]]),
    }

    # execute
    summary = module.state_summary(state)

    # assert: √(9 + 16) = 5 and √(1 + 4 + 4 + 16) = 5
    assert summary == {
        "first_moment_norm": pytest.approx(5.0),
        "second_moment_norm": pytest.approx(5.0),
    }
