"""FedAvg (McMahan et al., 2017): the sample-weighted mean of client deltas.

The hierarchy's sums (:mod:`.sums`) already give the round's weighted mean
delta; FedAvg's server step is ``w + η·Δ̄`` (``η`` the server learning rate;
1.0 is plain FedAvg), and it keeps no server state. :func:`flat_fedavg` is the
reference the tests and benchmarks compare the hierarchy with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, apply_delta

if TYPE_CHECKING:
    from fedkube.spec import Strategy

NAME = "fedavg"


def init_state(weights: Mapping[str, np.ndarray], params: Strategy) -> Tensors:
    """FedAvg keeps no server state."""
    return {}


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """``w + η·Δ̄``; the state stays empty."""
    return apply_delta(weights, aggregate.delta, params.server_lr), {}


def state_summary(state: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {}


def flat_fedavg(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """Reference FedAvg over all clients at once (for tests and benchmarks)."""
    total = float(sum(weights))
    sums = {name: np.zeros(array.shape, np.float64) for name, array in deltas[0].items()}
    for delta, weight in zip(deltas, weights, strict=True):
        for name, acc in sums.items():
            acc += weight * delta[name].astype(np.float64)
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}
