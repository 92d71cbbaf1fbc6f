"""FedAvgM: FedAvg with server momentum (Hsu et al., 2019, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification").

With non-IID clients the round-to-round mean delta ``Δ̄`` is noisy and can
oscillate; a momentum buffer on the server averages the direction over rounds
without any change on the clients::

    v ← β·v + Δ̄
    w ← w + η·v

``β`` is ``strategy.serverMomentum`` and ``η`` the server learning rate
(``Strategy.server_lr``). ``β = 0`` is plain FedAvg. The state holds one
float32 buffer per parameter, ``"v/<name>"``, initially zero (Hsu et al. start
from zero momentum), so it can be checkpointed as safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, apply_delta, stored_buffer
from fedkube.training.norms import l2_norm

if TYPE_CHECKING:
    from fedkube.spec import Strategy

NAME = "fedavgm"
VELOCITY = "v/"


def init_state(weights: Mapping[str, np.ndarray], params: Strategy) -> Tensors:
    """A zero momentum buffer ``"v/<name>"`` per parameter."""
    return {VELOCITY + name: np.zeros(w.shape, np.float32) for name, w in weights.items()}


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """``v ← β·v + Δ̄; w ← w + η·v`` as new arrays (weights, state, delta untouched)."""
    beta = np.float32(params.server_momentum)
    velocity: Tensors = {}
    for name, w in weights.items():
        previous = stored_buffer(state, VELOCITY + name, w.shape, 0.0)
        velocity[name] = (beta * previous + aggregate.delta[name]).astype(np.float32, copy=False)
    new_weights = apply_delta(weights, velocity, params.server_lr)
    return new_weights, {VELOCITY + name: v for name, v in velocity.items()}


def state_summary(state: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The L2 norm of the whole momentum buffer (all parameters together)."""
    return {"momentum_norm": l2_norm({k: a for k, a in state.items() if k.startswith(VELOCITY)})}
