"""Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates").

Every coordinate of the region's estimate is the median of that coordinate over
the region's updates. While fewer than half the updates are Byzantine, the
median of each coordinate lies between honest values, however far the
Byzantine ones are; a mean can be dragged anywhere by a single client.

The median is **unweighted**: sample counts are reported by the clients
themselves, so weighting by them would let one Byzantine client claim a huge
count and own the median. Yin et al. analyse the unweighted estimator.

Memory: the matrix is only read; columns are processed in blocks of at most
:data:`CHUNK_ELEMENTS` values (one sorted copy of the block at a time), so the
extra memory is the ``(d,)`` result plus ``O(n·chunk)``, not a copy of the
``(n, d)`` matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedkube.aggregator.strategies.columns import CHUNK_ELEMENTS, blocks, check_rows

if TYPE_CHECKING:
    from fedkube.spec import Robust

NAME = "median"

# Each column block is copied and sorted: numpy's (SIMD) sort of the block
# measured faster than np.median's partition here.


def estimate(
    updates: np.ndarray,
    weights: np.ndarray,
    params: Robust,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """The coordinate-wise median of the rows of ``updates`` (n, d), as float32 (d,).

    ``weights`` is checked for shape but not used (see the module docstring).
    With an even ``n`` the median is the mean of the two middle values.
    """
    n, d = check_rows(updates, weights)
    out = np.empty(d, np.float32)
    low, high = (n - 1) // 2, n // 2
    for columns in blocks(d, n, chunk_elements):
        block = np.sort(updates[:, columns], axis=0)  # a copy: the input is only read
        out[columns] = block[low : high + 1].mean(axis=0, dtype=np.float64)
    return out
