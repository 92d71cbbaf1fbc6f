"""FedNova (Wang et al., 2020): normalised averaging by local steps.

Clients that run more local steps (more data, more epochs) move further and
would dominate plain FedAvg's mean, biasing the global model toward their
objective. FedNova averages each client's *normalised* update ``Δ_i/τ_i``
(``τ_i`` its local SGD steps) and rescales by the effective number of steps
``τ_eff = Σ p_i·τ_i``: ``Δ = τ_eff · Σ p_i·Δ_i/τ_i`` with ``p_i = w_i/Σw``.

This folds into the same running sums as FedAvg: a combiner folds ``Δ_i``
with the coefficient :func:`fold_scale` ``= w_i/τ_i`` instead of ``w_i``, and
the partials carry ``Σ w_i·τ_i`` beside ``Σ w_i``, so the global tier can form
``τ_eff`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedkube.aggregator.strategies.fedavg import init_state, state_summary
from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, apply_delta
from fedkube.spec import Strategy
from fedkube.training.strategy_client import fednova_fold_scale as fold_scale

NAME = "fednova"

__all__ = ["NAME", "fold_scale", "init_state", "server_step", "state_summary"]


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """``w + η·τ_eff·Σp_i·Δ_i/τ_i`` (the aggregate's mean is the normalised one)."""
    return apply_delta(weights, aggregate.delta, params.server_lr * aggregate.mean_local_steps), {}
