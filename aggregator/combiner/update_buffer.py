"""A region's updates kept whole, for the robust rules that need them all.

A robust rule (median, trimmed mean, Krum) cannot be folded into a running
sum: it needs every update of the region at once. The buffer holds them as
rows of one float32 matrix (memory ``clients × model``) whose size is bounded
by ``spec.strategy.robust.maxBufferBytes``: an update that would not fit is
refused with reason ``buffer_full`` before it is recorded, so the round
loses nothing it acknowledged.

Each row is the update as the running sum would have counted it per unit of
weight (``Δ_i · scale_i / w_i``: ``Δ_i`` itself for FedAvg, ``Δ_i/τ_i`` for
FedNova), so the rule's estimate stands in for the region's weighted mean and
the partial it becomes (``estimate × Σw``) reduces at the global tier like
any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedkube.aggregator.strategies import RobustRule
from fedkube.aggregator.strategies.sums import Tensors
from fedkube.aggregator.validation import Template
from fedkube.errors import UpdateRejected
from fedkube.spec import Robust
from fedkube.wire.compression import Part
from fedkube.wire.protocol import Reason


@dataclass
class UpdateBuffer:
    """Up to ``capacity`` flattened updates, their weights and local steps."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    capacity: int
    max_bytes: int
    _rows: np.ndarray | None = None
    weights: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)

    @classmethod
    def for_template(cls, template: Template, clients: int, max_bytes: int) -> UpdateBuffer:
        names = list(template)
        shapes = [template[name][0] for name in names]
        size = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes) * 4
        return cls(names, shapes, min(clients, max_bytes // max(size, 1)), max_bytes)

    @property
    def width(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

    @property
    def count(self) -> int:
        return len(self.weights)

    def check_room(self) -> None:
        """Refuse (``buffer_full``) an update that would not fit: call before recording it."""
        if self.count >= self.capacity:
            raise UpdateRejected(
                Reason.buffer_full.value,
                f"the region's robust-aggregation buffer holds {self.capacity} updates of "
                f"{self.width * 4} bytes (spec.strategy.robust.maxBufferBytes={self.max_bytes})",
                503,
            )

    def add(
        self,
        tensors: Mapping[str, np.ndarray | Part],
        coefficient: float,
        weight: float,
        steps: float,
    ) -> None:
        """Store ``coefficient · tensors`` as the next row (the caller checked room)."""
        self.check_room()
        if self._rows is None:
            # Allocated once per round on the first update; pages are touched
            # only as rows fill, so a half-empty round costs half the memory.
            self._rows = np.empty((self.capacity, self.width), np.float32)
        row = self._rows[self.count]
        offset = 0
        for name in self.names:
            tensor = tensors[name]
            if isinstance(tensor, Part):  # a compressed update: written dense into its row
                tensor.fold_into(
                    row[offset : offset + tensor.size], np.float32(coefficient), assign=True
                )
                offset += tensor.size
                continue
            flat = tensor.reshape(-1)
            np.multiply(flat, np.float32(coefficient), out=row[offset : offset + flat.size])
            offset += flat.size
        self.weights.append(weight)
        self.steps.append(weight * steps)

    def reduce(self, rule: RobustRule, params: Robust) -> tuple[Tensors, float, int, float]:
        """``(estimate × Σw as named tensors, Σw, count, Σ w·τ)`` for the partial."""
        if self._rows is None or not self.weights:
            return {}, 0.0, 0, 0.0
        weights = np.asarray(self.weights, np.float64)
        estimate = rule(self._rows[: self.count], weights, params)
        total = float(weights.sum())
        flat = estimate.astype(np.float32) * np.float32(total)
        sums: Tensors = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            sums[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return sums, total, self.count, float(sum(self.steps))
