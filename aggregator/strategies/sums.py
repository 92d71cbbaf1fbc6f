"""The sums every tier and strategy share: a region's running sum, its partial, the mean.

The maths is split along the hierarchy so that memory stays O(model):

* :class:`WeightedSum` is a combiner's running sum ``Σ w_i·Δ_i`` and ``Σ w_i``.
  It owns its buffer and folds each update in as it arrives; the update's
  arrays are only read.
* :class:`Partial` is what a region sends up; :func:`reduce_partials` turns the
  regional partials into the global mean delta ``Σ_r S_r / Σ_r W_r``, which
  equals flat FedAvg over all clients.
* :func:`aggregate_partials` adds what server optimizers need beside the mean
  (total weight, count, the mean number of local steps): a
  :class:`RoundAggregate`, the input of every ``server_step``.
* :func:`apply_delta` and :func:`stored_buffer` are the server steps' shared parts.

Rejected or failed replies never reach these functions: the combiner passes
only accepted updates, and the caller passes the list of partials, empty ones
(weight 0) included, as data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedkube.wire.compression import Part

Tensors = dict[str, np.ndarray]

# Elements per step of the fold (1 MiB of float32): small enough that the scaled
# chunk stays in cache, large enough that Python's per-call overhead is negligible;
# benchmarks/fold.py measured 1 << 18 ahead of 1 << 16 here.
FOLD_CHUNK = 1 << 18


@dataclass
class WeightedSum:
    """A running ``Σ w_i·Δ_i`` over named float32 tensors, plus ``Σ w_i``."""

    sums: Tensors
    weight: float = 0.0
    count: int = 0
    steps: float = 0.0  # Σ w_i·τ_i, the weighted local steps (FedNova needs them)
    _scratch: np.ndarray = field(default_factory=lambda: np.empty(FOLD_CHUNK, np.float32))

    @classmethod
    def zeros_like(cls, template: Mapping[str, np.ndarray]) -> WeightedSum:
        return cls({name: np.zeros(a.shape, np.float32) for name, a in template.items()})

    @classmethod
    def zeros(cls, template: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> WeightedSum:
        """A zero sum shaped like a model template (names -> (shape, dtype))."""
        return cls({name: np.zeros(shape, np.float32) for name, (shape, _dt) in template.items()})

    def fold(
        self,
        delta: Mapping[str, np.ndarray | Part],
        weight: float,
        scale: float | None = None,
        steps: float = 1.0,
    ) -> None:
        """Add ``scale·delta`` in place (``scale`` defaults to ``weight``).

        One cache-sized chunk at a time: memory traffic per element is one
        read of the update and one read-modify-write of the sum, the same as
        ``a += b``. A compressed update (:class:`fedkube.wire.compression.Part`)
        folds from its wire form: int8 dequantised chunk by chunk, top-k as a
        scatter-add. ``weight`` always counts toward ``Σ w_i``; a strategy
        that rescales updates (FedNova's ``w_i/τ_i``) passes its own ``scale``.
        """
        factor = np.float32(weight if scale is None else scale)
        for name, total in self.sums.items():
            dst = total.reshape(-1)
            part = delta[name]
            if isinstance(part, Part):
                part.fold_into(dst, factor)
                continue
            src = part.reshape(-1)
            for start in range(0, dst.size, FOLD_CHUNK):
                stop = min(start + FOLD_CHUNK, dst.size)
                scaled = self._scratch[: stop - start]
                np.multiply(src[start:stop], factor, out=scaled)
                np.add(dst[start:stop], scaled, out=dst[start:stop])
        self.weight += weight
        self.count += 1
        self.steps += weight * steps


@dataclass(frozen=True)
class Partial:
    """One region's contribution to a round: its sums, total weight and count."""

    region: str
    sums: Tensors
    weight: float
    count: int
    steps: float = 0.0  # Σ w_i·τ_i over the region's clients


@dataclass(frozen=True)
class RoundAggregate:
    """What a server step sees of one round, whatever the hierarchy looked like.

    ``delta`` is the weighted mean of the client deltas (``Σ w_i·Δ_i / Σ w_i``,
    or a robust estimate of it); ``population`` is every client of the job and
    ``count`` those whose update is in ``delta``.
    """

    delta: Tensors
    weight: float
    count: int
    mean_local_steps: float
    population: int


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
    # One cache-sized float64 block at a time: no model-sized float64 copies.
    acc = np.empty(FOLD_CHUNK, np.float64)
    mean: Tensors = {}
    for name, first in live[0].sums.items():
        out = np.empty(first.shape, np.float32)
        flat = out.reshape(-1)
        sources = [p.sums[name].reshape(-1) for p in live]
        for start in range(0, flat.size, FOLD_CHUNK):
            stop = min(start + FOLD_CHUNK, flat.size)
            block = acc[: stop - start]
            block[:] = sources[0][start:stop]
            for source in sources[1:]:
                block += source[start:stop]
            block /= total
            flat[start:stop] = block
        mean[name] = out
    return mean


def aggregate_partials(partials: Sequence[Partial], population: int) -> RoundAggregate:
    """The round's mean delta with its weight, count and mean local steps."""
    delta = reduce_partials(partials)
    weight = sum(p.weight for p in partials)
    return RoundAggregate(
        delta=delta,
        weight=weight,
        count=sum(p.count for p in partials),
        mean_local_steps=sum(p.steps for p in partials) / weight,
        population=population,
    )


def apply_delta(
    weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], lr: float
) -> Tensors:
    """The next global model ``w + lr·Δ̄`` as new arrays (inputs untouched)."""
    return {
        name: (w + np.float32(lr) * delta[name]).astype(w.dtype, copy=False)
        for name, w in weights.items()
    }


def stored_buffer(
    state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], fill: float
) -> np.ndarray:
    """A server optimizer's buffer ``key`` from ``state``, or ``fill`` when it has none.

    A checkpoint written under a stateless strategy (FedAvg) has no buffers;
    they then start from their initial value, as on a fresh job. A buffer of
    another shape belongs to another model and is refused.
    """
    buffer = state.get(key)
    if buffer is None:
        return np.full(shape, fill, np.float32)
    if buffer.shape != shape:
        raise ValueError(f"state {key}: shape {buffer.shape}, model has {shape}")
    return buffer
