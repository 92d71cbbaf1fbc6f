"""Aggregation strategies, one small module each, chosen by ``spec.strategy``.

A *server strategy* (``spec.strategy.name``) says how the round's mean delta
becomes the next global model (``init_state``, ``server_step``,
``state_summary``) and, where the algorithm needs it, what the combiner folds
(FedNova's ``fold_scale``) and what travels down with the model (SCAFFOLD's
control variate). A *robust rule* (``spec.strategy.robust.rule``) replaces a
region's weighted sum by a robust estimate over its buffered updates; it
wraps any server strategy. The spec's enums must list exactly the names here
(a test checks it).

How they compose through the hierarchy (see the README's "Strategies"):

* worker: local training, with FedProx's proximal term or SCAFFOLD's
  correction; sends ``Δw`` (and SCAFFOLD's ``Δc``) and its local steps;
* combiner: clips to ``robust.normBound`` if set; then either folds into one
  running sum (memory O(model)) or, with a robust rule, buffers the region's
  updates (O(clients × model), bounded) and sends ``estimate × Σw`` as its sum;
* global: weighted mean of the regions' partials, then the server step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from fedkube.aggregator.strategies import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fednova,
    fedprox,
    fedyogi,
    krum,
    median,
    scaffold,
    trimmed_mean,
)
from fedkube.aggregator.strategies.sums import Tensors
from fedkube.spec import Robust
from fedkube.training.strategy_client import CLIENT_STRATEGIES, ClientStrategy

RobustRule = Callable[[np.ndarray, np.ndarray, Robust], np.ndarray]


def _model_only(weights: Mapping[str, np.ndarray], _state: Mapping[str, np.ndarray]) -> Tensors:
    return dict(weights)


@dataclass(frozen=True)
class StrategyInfo:
    """A server strategy and the hooks the other tiers need from it.

    What its clients must do (FedProx's proximal term, SCAFFOLD's variates,
    FedNova's local steps and fold coefficient) is its
    :class:`~fedkube.training.strategy_client.ClientStrategy`, shared with the worker.
    """

    name: str
    module: ModuleType  # init_state, server_step, state_summary
    downlink: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Tensors] = _model_only

    @property
    def client(self) -> ClientStrategy:
        return CLIENT_STRATEGIES[self.name]

    @property
    def fold_scale(self) -> Callable[[float, int], float]:
        return self.client.fold_scale

    @property
    def needs_local_steps(self) -> bool:
        return self.client.needs_local_steps

    @property
    def proximal(self) -> bool:
        return self.client.proximal

    @property
    def control_variates(self) -> bool:
        return self.client.control_variates


REGISTRY: dict[str, StrategyInfo] = {
    info.name: info
    for info in (
        StrategyInfo(fedavg.NAME, fedavg),
        StrategyInfo(fedavgm.NAME, fedavgm),
        StrategyInfo(fedadam.NAME, fedadam),
        StrategyInfo(fedyogi.NAME, fedyogi),
        StrategyInfo(fedadagrad.NAME, fedadagrad),
        StrategyInfo(fedprox.NAME, fedprox),
        StrategyInfo(scaffold.NAME, scaffold, downlink=scaffold.downlink),
        StrategyInfo(fednova.NAME, fednova),
    )
}

ROBUST_RULES: dict[str, RobustRule] = {
    median.NAME: median.estimate,
    trimmed_mean.NAME: trimmed_mean.estimate,
    krum.KRUM: krum.estimate_krum,
    krum.MULTI_KRUM: krum.estimate_multi_krum,
}
"""Rules that need a region's updates buffered; ``none`` folds as usual."""
