"""Partitioning: disjoint, complete, deterministic, skewed when asked."""

from __future__ import annotations

import numpy as np

from fedkube.datasets import DataContext
from fedkube.examples.digits import make_data
from fedkube.spec import Client
from fedkube.training import partition


def test_dirichlet_parts_are_disjoint_complete_and_skewed():
    labels = np.repeat(np.arange(10), 100)
    parts = partition.dirichlet(labels, parts=6, alpha=0.5, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 10
    # Label skew: the dominant class of a part is far above the uniform 10 %.
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.25


def test_same_seed_same_split_other_seed_other_split():
    labels = np.repeat(np.arange(10), 50)
    a = partition.dirichlet(labels, 4, 0.5, seed=3)
    b = partition.dirichlet(labels, 4, 0.5, seed=3)
    c = partition.dirichlet(labels, 4, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_parts_are_balanced():
    parts = partition.iid(103, 4, seed=0)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_a_worker_gets_only_its_own_share_of_digits():
    def client(index: int, replica: int = 0, replicas: int = 1) -> Client:
        return Client(f"t{index}-{replica}", f"t{index}", "eu", replica, replicas, index, 3)

    def context(role, c=None):
        return DataContext(role, c, "dirichlet", 0.5, 0.2, 7)

    pooled = make_data(context("pooled"))
    shards = [make_data(context("train", client(i))) for i in range(3)]
    assert sum(len(s) for s in shards) == len(pooled)
    halves = [make_data(context("train", client(0, r, 2))) for r in range(2)]
    assert sum(len(h) for h in halves) == len(shards[0])
    test = make_data(context("test"))
    assert len(test) + len(pooled) == 1797
