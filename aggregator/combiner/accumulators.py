"""Where a region's accepted updates go until its partial is sent: one interface, two kinds.

* :class:`RunningSum` — ``Σ w_i·Δ_i`` folded in place, memory O(model)
  whatever the number of clients (FedAvg and every strategy that reduces by a
  weighted sum).
* :class:`RobustBuffer` — every update kept whole (O(clients × model),
  bounded by ``spec.strategy.robust.maxBufferBytes``) for a robust rule
  (median, trimmed mean, Krum) that needs them all at once; its estimate
  goes up as ``estimate × Σw`` so the global tier reduces it like a sum.

Secure aggregation has no accumulator here: the combiner cannot read what it
adds (see :mod:`.secure_intake`). Both kinds end in a :class:`RegionSum`,
the content of the region's partial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedkube.aggregator.combiner.update_buffer import UpdateBuffer
from fedkube.aggregator.strategies import ROBUST_RULES
from fedkube.aggregator.strategies.sums import Tensors, WeightedSum
from fedkube.aggregator.validation import Template
from fedkube.spec import Strategy
from fedkube.wire.compression import Part


@dataclass(frozen=True)
class RegionSum:
    """A region's partial: ``Σ w_i·Δ_i`` (or a robust stand-in), ``Σ w_i``, count, ``Σ w_i·τ_i``."""

    tensors: Tensors = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    steps: float = 0.0


class Accumulator(Protocol):
    """A round's accepted updates for one region; ``add`` and ``reduce`` run in a thread."""

    # Whether reduce() is real work, timed into fedkube_aggregation_seconds
    # (a running sum is already reduced; the robust rule runs at the flush).
    timed_reduce: bool

    def check_room(self) -> None:
        """Refuse (``buffer_full``) an update that would not fit, before it is recorded."""

    def add(
        self, update: Mapping[str, np.ndarray | Part], counted: float, scale: float, steps: float
    ) -> None:
        """Take ``scale · update``, counting ``counted`` toward the weight."""

    def reduce(self) -> RegionSum:
        """The region's sum, once every update is in."""


class RunningSum:
    """The weighted sum, folded as updates arrive."""

    timed_reduce = False

    def __init__(self, template: Template):
        self.sum = WeightedSum.zeros(template)

    def check_room(self) -> None:
        return None

    def add(
        self, update: Mapping[str, np.ndarray | Part], counted: float, scale: float, steps: float
    ) -> None:
        self.sum.fold(update, counted, scale, steps)

    def reduce(self) -> RegionSum:
        return RegionSum(self.sum.sums, self.sum.weight, self.sum.count, self.sum.steps)


class RobustBuffer:
    """The updates kept whole, reduced by ``strategy.robust.rule`` at the flush."""

    timed_reduce = True

    def __init__(self, template: Template, clients: int, strategy: Strategy):
        self.rule = ROBUST_RULES[strategy.robust.rule]
        self.params = strategy.robust
        self.buffer = UpdateBuffer.for_template(template, clients, self.params.max_buffer_bytes)

    def check_room(self) -> None:
        self.buffer.check_room()

    def add(
        self, update: Mapping[str, np.ndarray | Part], counted: float, scale: float, steps: float
    ) -> None:
        # A row is the update per unit of weight, as the running sum would count it.
        self.buffer.add(update, scale / counted, counted, steps)

    def reduce(self) -> RegionSum:
        return RegionSum(*self.buffer.reduce(self.rule, self.params))


def new_accumulator(strategy: Strategy, template: Template, clients: int) -> Accumulator:
    """The kind the strategy needs, sized for ``clients`` selected clients."""
    if strategy.robust.rule in ROBUST_RULES:
        return RobustBuffer(template, clients, strategy)
    return RunningSum(template)
