"""The shared server step of FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021,
"Adaptive Federated Optimization", Algorithm 2).

The mean client delta ``Δ̄`` is treated as a pseudo-gradient (pointing downhill,
so the step adds it) and fed to an adaptive optimizer on the server::

    m ← β1·m + (1 − β1)·Δ̄
    v ← rule(v, Δ̄²)               (Adam, Yogi or Adagrad: the only difference)
    w ← w + η·m / (√v + τ)

Per-coordinate step sizes help when client drift makes some coordinates of
``Δ̄`` much noisier than others. As in the paper there is no bias correction;
``τ`` both bounds the step (``|step| ≤ η·|m|/τ``) and sets the initial second
moment: ``m`` starts at zero and ``v`` at ``τ²`` (the paper requires
``v₋₁ ≥ τ²``). The state is two float32 buffers per parameter, ``"m/<name>"``
and ``"v/<name>"``, so it can be checkpointed as safetensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, apply_delta, stored_buffer
from fedkube.training.norms import l2_norm

if TYPE_CHECKING:
    from fedkube.spec import Strategy

FIRST = "m/"
SECOND = "v/"

SecondMomentRule = Callable[[np.ndarray, np.ndarray, "Strategy"], np.ndarray]
"""``(v, Δ̄², params) -> new v``: returns a new float32 array, reads ``v`` only."""


def init_state(weights: Mapping[str, np.ndarray], params: Strategy) -> Tensors:
    """``m = 0`` and ``v = τ²`` per parameter."""
    state: Tensors = {}
    tau_sq = np.float32(params.tau) ** 2
    for name, w in weights.items():
        state[FIRST + name] = np.zeros(w.shape, np.float32)
        state[SECOND + name] = np.full(w.shape, tau_sq, np.float32)
    return state


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
    second_moment: SecondMomentRule,
) -> tuple[Tensors, Tensors]:
    """One FedOpt step with the given second-moment rule; all inputs are only read."""
    beta1 = np.float32(params.beta1)
    tau = np.float32(params.tau)
    new_weights: Tensors = {}
    new_state: Tensors = {}
    for name, w in weights.items():
        delta = aggregate.delta[name]
        m = stored_buffer(state, FIRST + name, w.shape, 0.0)
        v = stored_buffer(state, SECOND + name, w.shape, float(tau) ** 2)
        m_new = (beta1 * m + (np.float32(1) - beta1) * delta).astype(np.float32, copy=False)
        v_new = second_moment(v, np.square(delta), params).astype(np.float32, copy=False)
        step = m_new / (np.sqrt(v_new) + tau)
        # One tensor at a time, so the temporaries stay tensor-sized, not model-sized.
        new_weights.update(apply_delta({name: w}, {name: step}, params.server_lr))
        new_state[FIRST + name] = m_new
        new_state[SECOND + name] = v_new
    return new_weights, new_state


def state_summary(state: Mapping[str, np.ndarray]) -> dict[str, float]:
    """L2 norms of the first and the second moment (each over all parameters)."""
    return {
        "first_moment_norm": l2_norm({k: a for k, a in state.items() if k.startswith(FIRST)}),
        "second_moment_norm": l2_norm({k: a for k, a in state.items() if k.startswith(SECOND)}),
    }
