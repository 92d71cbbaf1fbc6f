"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization"; the Yogi rule
is Zaheer et al., 2018).

Yogi's additive second-moment update::

    v ← v − (1 − β2)·Δ̄²·sign(v − Δ̄²)

moves ``v`` towards ``Δ̄²`` by at most ``(1 − β2)·Δ̄²`` per round. Unlike Adam's
multiplicative decay, ``v`` cannot collapse quickly after a few large rounds,
so the effective step size grows more slowly: Reddi et al. found it the most
stable of the three on non-IID data. ``v`` stays positive: from ``v > 0`` a
decrease happens only when ``v > Δ̄²``, and it is smaller than ``Δ̄²``.
The rest of the step is shared: see :mod:`fedkube.aggregator.strategies.adaptive`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies import adaptive
from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors

if TYPE_CHECKING:
    from fedkube.spec import Strategy

NAME = "fedyogi"

init_state = adaptive.init_state
state_summary = adaptive.state_summary


def second_moment(v: np.ndarray, delta_sq: np.ndarray, params: Strategy) -> np.ndarray:
    """``v − (1 − β2)·Δ̄²·sign(v − Δ̄²)`` as a new array."""
    rate = np.float32(1) - np.float32(params.beta2)
    return v - rate * delta_sq * np.sign(v - delta_sq)


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """One FedYogi step; returns (new weights, new state), inputs untouched."""
    return adaptive.server_step(weights, aggregate, state, params, second_moment)
