"""Split a data set across simulated tenants: IID or label-skewed (Dirichlet).

Pure functions of (labels, seed): every worker computes the same split and
keeps only its own part, so no tenant ever receives another tenant's indices.
"""

from __future__ import annotations

import numpy as np


def iid(num_samples: int, parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the indices into ``parts`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(chunk) for chunk in np.array_split(order, parts)]


def dirichlet(
    labels: np.ndarray, parts: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided by proportions ~ Dir(alpha).

    Smaller ``alpha`` means more skew (alpha = 0.5 leaves most tenants with a
    few dominant classes). Redraws, a bounded number of times, until every
    part holds at least ``min_size`` samples.
    """
    if parts < 1:
        raise ValueError("parts must be at least 1")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // parts)
    for _ in range(1000):
        buckets: list[list[int]] = [[] for _ in range(parts)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for bucket, chunk in zip(buckets, np.split(members, cuts), strict=True):
                bucket.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_size:
            return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    raise ValueError(f"could not give each of {parts} parts {min_size} samples with alpha={alpha}")


def split_replicas(indices: np.ndarray, replicas: int, replica: int) -> np.ndarray:
    """A tenant's share for one of its replicas (contiguous, deterministic)."""
    return np.array_split(indices, replicas)[replica]
