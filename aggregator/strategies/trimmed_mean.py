"""Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates").

For every coordinate the region's values are sorted, ``k = ⌊β·n⌋`` are dropped
at each end (``β`` = ``robust.trimFraction``) and the rest are averaged. With
at most ``k`` Byzantine updates, every extreme value they send is cut, and the
mean of the remaining ``n − 2k`` keeps more of the honest information than the
median does (``β → ½`` tends to the median, ``β = 0`` is the plain mean).
``β < ½`` (the spec enforces it) leaves at least one value per coordinate.

The mean is **unweighted**: sample counts are reported by the clients
themselves, so weighting by them would let a Byzantine client that survives
the trim claim a huge count. Yin et al. analyse the unweighted estimator.

Memory: the matrix is only read; columns are processed in blocks of at most
:data:`CHUNK_ELEMENTS` values (one sorted copy of the block at a time), so the
extra memory is the ``(d,)`` result plus ``O(n·chunk)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies.columns import CHUNK_ELEMENTS, blocks, check_rows

if TYPE_CHECKING:
    from fedkube.spec import Robust

NAME = "trimmedMean"

# A full (SIMD) sort of each column block measured faster than np.partition at
# the two cut points.


def trim_count(n: int, fraction: float) -> int:
    """``k = ⌊β·n⌋`` values cut at each end, at most ``(n − 1) // 2`` so one is left."""
    return min(math.floor(fraction * n), (n - 1) // 2)


def estimate(
    updates: np.ndarray,
    weights: np.ndarray,
    params: Robust,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """The coordinate-wise β-trimmed mean of the rows of ``updates`` (n, d), as float32 (d,).

    ``weights`` is checked for shape but not used (see the module docstring).
    Each coordinate's kept values are summed in float64.
    """
    n, d = check_rows(updates, weights)
    k = trim_count(n, params.trim_fraction)
    out = np.empty(d, np.float32)
    for columns in blocks(d, n, chunk_elements):
        block = updates[:, columns]
        if k > 0:
            block = np.sort(block, axis=0)  # a copy: the input is only read
        out[columns] = block[k : n - k].mean(axis=0, dtype=np.float64)
    return out
