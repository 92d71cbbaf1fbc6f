"""Krum and Multi-Krum (Blanchard et al., 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent").

Each update is scored by how close it sits to its ``n − f − 2`` nearest
neighbours (sum of squared L2 distances), ``f`` being the Byzantine updates
tolerated (``robust.byzantine``). An honest update has many honest neighbours
close by; a Byzantine one must stay near the honest cluster to score well, so
it can do little harm. Krum returns the single best-scoring update,
Multi-Krum the mean of the ``m`` best (lower variance than one update).

Blanchard et al.'s guarantee needs ``n > 2f + 2``. With fewer updates
``n − f − 2`` drops below one; we still score on the **one** nearest neighbour
(rather than refuse the round), which keeps isolated outliers out but carries
no guarantee.

Multi-Krum here takes the **sample-weighted** mean of the selected updates, so
that with ``f = 0`` and ``m = n`` it equals FedAvg; Blanchard et al. average
uniformly.

Distances come from the Gram matrix ``G = X·Xᵀ``:
``‖x_i − x_j‖² = G_ii + G_jj − 2·G_ij``. ``G`` is accumulated in float64 over
column blocks of at most :data:`CHUNK_ELEMENTS` values; each block is first
centred on its column mean (distances do not change under a shift), which
removes the component the updates share and with it most of the cancellation
in the formula. Extra memory is ``O(n² + n·chunk)``: never the ``(n, n, d)``
differences nor a copy of the ``(n, d)`` matrix.

The block products are small (``n`` rows), so BLAS gains little from threads
on them, and loses a lot when its threads outnumber the CPUs the pod may use
(a CPU limit does not change the core count BLAS sees): on a shared 2-core
machine the Gram matrix of 100 × 1M took 0.25 s on one BLAS thread and 2.7 to
12 s on two. The products therefore run on :data:`BLAS_THREADS` threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from fedkube.aggregator.strategies.columns import CHUNK_ELEMENTS, blocks, check_rows

if TYPE_CHECKING:
    from fedkube.spec import Robust

KRUM = "krum"
MULTI_KRUM = "multiKrum"

# Values (rows × columns) per block of the Gram matrix: 1 MiB of float32, the
# size at which the blocked float32 matrix product measured fastest here.
BLAS_THREADS = 1


def pairwise_sq_distances(
    updates: np.ndarray, *, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """The ``(n, n)`` float64 matrix of squared L2 distances between rows (zero diagonal)."""
    n, d = check_rows(updates)
    gram = np.zeros((n, n), np.float64)
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        for columns in blocks(d, n, chunk_elements):
            block = updates[:, columns]
            centred = block - block.mean(axis=0, dtype=np.float32)  # a new (n, chunk) array
            gram += centred @ centred.T
    sq_norms = np.diag(gram)
    distances = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)  # rounding can go slightly negative
    np.fill_diagonal(distances, 0.0)
    return distances


def neighbours(n: int, f: int) -> int:
    """Neighbours in a score: ``n − f − 2``, at least 1 (and at most the ``n − 1`` others)."""
    return min(max(n - f - 2, 1), max(n - 1, 0))


def scores(updates: np.ndarray, f: int, *, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Krum scores (float64, one per row): the sum of squared distances from row ``i``
    to its :func:`neighbours` nearest other rows. A single row scores 0."""
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    distances = pairwise_sq_distances(updates, chunk_elements=chunk_elements)
    n = distances.shape[0]
    k = neighbours(n, f)
    if k == 0:
        return np.zeros(n, np.float64)
    np.fill_diagonal(distances, np.inf)  # a row is not its own neighbour
    nearest = np.partition(distances, k - 1, axis=1)[:, :k]
    return nearest.sum(axis=1)


def select(
    updates: np.ndarray, f: int, m: int, *, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """Indices of the ``m`` rows with the lowest scores, best first (ties: lower index)."""
    n, _ = check_rows(updates)
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, {n}], got {m}")
    order = np.argsort(scores(updates, f, chunk_elements=chunk_elements), kind="stable")
    return order[:m]


def keep_count(n: int, params: Robust) -> int:
    """Multi-Krum's ``m``: ``robust.multiKrumKeep``, else ``n − f``; clamped to ``[1, n]``."""
    m = params.multi_krum_keep if params.multi_krum_keep is not None else n - params.byzantine
    return min(max(m, 1), n)


def estimate_krum(
    updates: np.ndarray,
    weights: np.ndarray,
    params: Robust,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """Krum: a float32 copy of the best-scoring row (``weights`` is only checked)."""
    check_rows(updates, weights)
    best = select(updates, params.byzantine, 1, chunk_elements=chunk_elements)[0]
    return updates[best].astype(np.float32, copy=True)


def estimate_multi_krum(
    updates: np.ndarray,
    weights: np.ndarray,
    params: Robust,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """Multi-Krum: the sample-weighted mean of the :func:`keep_count` best rows, float32 (d,)."""
    n, d = check_rows(updates, weights)
    if not np.all(weights > 0) or not np.all(np.isfinite(weights)):
        raise ValueError("weights must be positive, finite sample counts")
    m = keep_count(n, params)
    chosen = np.sort(select(updates, params.byzantine, m, chunk_elements=chunk_elements))
    share = weights[chosen] / weights[chosen].sum()
    coefficients = share.astype(np.float32)
    out = np.empty(d, np.float32)
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        for columns in blocks(d, len(chosen), chunk_elements):
            out[columns] = coefficients @ updates[chosen, columns]  # an (m, chunk) copy
    return out
