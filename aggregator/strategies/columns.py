"""A region's update matrix in column blocks: what the robust rules share.

The robust rules see a region's updates as one float32 matrix of ``n`` rows
(clients) and ``d`` columns (parameters). A coordinate-wise rule (median,
trimmed mean) or a Gram matrix (Krum) only ever needs a few columns at a
time, so each walks the matrix in blocks of about :data:`CHUNK_ELEMENTS`
values: the block's copy stays cache-sized and the extra memory is
O(n·block), never another (n, d) matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fedkube.aggregator.strategies.sums import FOLD_CHUNK

# Values (rows × columns) per block: 1 MiB of float32, as for the fold.
CHUNK_ELEMENTS = FOLD_CHUNK


def check_rows(updates: np.ndarray, weights: np.ndarray | None = None) -> tuple[int, int]:
    """``(n, d)`` of a non-empty update matrix (and weights of shape ``(n,)``)."""
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {updates.shape}")
    n, d = updates.shape
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights shape {weights.shape}, expected ({n},)")
    return n, d


def blocks(columns: int, rows: int, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Column slices holding about ``chunk_elements`` values of ``rows`` rows each."""
    step = max(1, chunk_elements // max(rows, 1))
    for start in range(0, columns, step):
        yield slice(start, min(start + step, columns))
