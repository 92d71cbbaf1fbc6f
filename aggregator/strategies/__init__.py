"""Aggregation strategies, one small module each, chosen by ``spec.strategy.name``.

A strategy provides the combiner's fold (``WeightedSum``), the global
reduction of regional partials and the server step. Later strategies
(FedProx, FedAdam, trimmed mean, ...) join :data:`REGISTRY`; the job spec's
``strategy.name`` enum must list exactly these names (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from fedkube.aggregator.strategies import fedavg


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    module: ModuleType
    foldable: bool  # can a combiner keep one running sum instead of every update?


REGISTRY: dict[str, StrategyInfo] = {
    fedavg.NAME: StrategyInfo(name=fedavg.NAME, module=fedavg, foldable=True),
}
