"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization").

Adagrad's running sum as the second moment::

    v ← v + Δ̄²

The per-coordinate step only shrinks over the rounds, which suits sparse or
rarely-updated coordinates; ``β2`` is not used. The rest of the step (``m``,
``τ``, ``η``) is shared: see :mod:`fedkube.aggregator.strategies.adaptive`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies import adaptive
from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors

if TYPE_CHECKING:
    from fedkube.spec import Strategy

NAME = "fedadagrad"

init_state = adaptive.init_state
state_summary = adaptive.state_summary


def second_moment(v: np.ndarray, delta_sq: np.ndarray, params: Strategy) -> np.ndarray:
    """``v + Δ̄²`` as a new array."""
    return v + delta_sq


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """One FedAdagrad step; returns (new weights, new state), inputs untouched."""
    return adaptive.server_step(weights, aggregate, state, params, second_moment)
