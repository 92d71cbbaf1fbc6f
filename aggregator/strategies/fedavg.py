"""FedAvg (McMahan et al., 2017): the sample-weighted mean of client deltas.

The maths is split along the hierarchy so that memory stays O(model):

* :class:`WeightedSum` is a combiner's running sum ``Σ w_i·Δ_i`` and ``Σ w_i``.
  It owns its buffer and folds each update in as it arrives; the update's
  arrays are only read.
* :func:`reduce_partials` turns the regional partials into the global mean
  delta ``Σ_r S_r / Σ_r W_r``, which equals flat FedAvg over all clients.
* :func:`apply_delta` is the server step ``w + η·Δ̄`` (``η`` the server
  learning rate; 1.0 is plain FedAvg).

Rejected or failed replies never reach these functions: the combiner passes
only accepted updates, and the caller passes the list of partials, empty ones
(weight 0) included, as data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]

# Elements per step of the fold (1 MiB of float32): small enough that the scaled
# chunk stays in cache, large enough that Python's per-call overhead is negligible;
# benchmarks/fold.py measured 1 << 18 ahead of 1 << 16 here.
FOLD_CHUNK = 1 << 18

NAME = "fedavg"


@dataclass
class WeightedSum:
    """A running ``Σ w_i·Δ_i`` over named float32 tensors, plus ``Σ w_i``."""

    sums: Tensors
    weight: float = 0.0
    count: int = 0
    _scratch: np.ndarray = field(default_factory=lambda: np.empty(FOLD_CHUNK, np.float32))

    @classmethod
    def zeros_like(cls, template: Mapping[str, np.ndarray]) -> WeightedSum:
        return cls({name: np.zeros(a.shape, np.float32) for name, a in template.items()})

    def fold(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight·delta`` in place, one cache-sized chunk at a time.

        Memory traffic per element is one read of the update and one
        read-modify-write of the sum: the same as ``a += b``.
        """
        for name, total in self.sums.items():
            src = delta[name].reshape(-1)
            dst = total.reshape(-1)
            for start in range(0, dst.size, FOLD_CHUNK):
                stop = min(start + FOLD_CHUNK, dst.size)
                scaled = self._scratch[: stop - start]
                np.multiply(src[start:stop], np.float32(weight), out=scaled)
                np.add(dst[start:stop], scaled, out=dst[start:stop])
        self.weight += weight
        self.count += 1


@dataclass(frozen=True)
class Partial:
    """One region's contribution to a round: its sums, total weight and count."""

    region: str
    sums: Tensors
    weight: float
    count: int


def reduce_partials(partials: Sequence[Partial]) -> Tensors:
    """The global weighted-mean delta from the regional partials.

    Partials with zero weight (a region where nobody reported) are skipped.
    Accumulates in float64: there are few partials, and each already holds a
    sum of many client updates.
    """
    live = [p for p in partials if p.weight > 0]
    if not live:
        raise ValueError("no partial carries any weight: nothing to aggregate")
    total = sum(p.weight for p in live)
    sums = {name: np.zeros(array.shape, np.float64) for name, array in live[0].sums.items()}
    for partial in live:
        for name, acc in sums.items():
            acc += partial.sums[name]
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}


def apply_delta(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], lr: float):
    """The next global model ``w + lr·Δ̄`` as new arrays (inputs untouched)."""
    return {
        name: (w + np.float32(lr) * delta[name]).astype(w.dtype, copy=False)
        for name, w in weights.items()
    }


def flat_fedavg(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """Reference FedAvg over all clients at once (for tests and benchmarks)."""
    total = float(sum(weights))
    sums = {name: np.zeros(array.shape, np.float64) for name, array in deltas[0].items()}
    for delta, weight in zip(deltas, weights, strict=True):
        for name, acc in sums.items():
            acc += weight * delta[name].astype(np.float64)
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}
