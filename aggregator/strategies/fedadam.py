"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization").

Adam's exponential moving average of ``Δ̄²`` as the second moment::

    v ← β2·v + (1 − β2)·Δ̄²

so the per-coordinate step follows the recent scale of the pseudo-gradient.
The rest of the step (``m``, ``τ``, ``η``) is shared: see
:mod:`fedkube.aggregator.strategies.adaptive`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies import adaptive
from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors

if TYPE_CHECKING:
    from fedkube.spec import Strategy

NAME = "fedadam"

init_state = adaptive.init_state
state_summary = adaptive.state_summary


def second_moment(v: np.ndarray, delta_sq: np.ndarray, params: Strategy) -> np.ndarray:
    """``β2·v + (1 − β2)·Δ̄²`` as a new array."""
    beta2 = np.float32(params.beta2)
    return beta2 * v + (np.float32(1) - beta2) * delta_sq


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """One FedAdam step; returns (new weights, new state), inputs untouched."""
    return adaptive.server_step(weights, aggregate, state, params, second_moment)
