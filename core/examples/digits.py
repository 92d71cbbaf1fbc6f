"""scikit-learn's bundled digits (8x8 images, 10 classes), no download needed.

``make_data`` splits a stratified held-out test set off first (the global
tier's evaluation set), then partitions the training part across tenants
(IID or Dirichlet label skew) and a tenant's part across its replicas. A
worker keeps only its own indices. Role ``validation`` partitions the
held-out set the same way: each client's own validation share.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fedkube.datasets import ArrayData, DataContext
from fedkube.training import partition


def make_model(hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def make_data(context: DataContext) -> ArrayData:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=context.test_fraction, stratify=y, random_state=context.seed
    )
    if context.role == "test":
        return ArrayData(x_test, y_test)
    if context.role == "pooled":
        return ArrayData(x_train, y_train)
    client = context.client
    if client is None:
        raise ValueError(f"role {context.role!r} needs a client")
    if context.role == "validation":
        # The client's share of the held-out set, drawn with the same skew as its
        # training share: a site validates on data like its own.
        x_train, y_train = x_test, y_test
    if context.partition_scheme == "dirichlet":
        parts = partition.dirichlet(y_train, client.num_tenants, context.alpha, context.seed)
    else:
        parts = partition.iid(len(y_train), client.num_tenants, context.seed)
    mine = partition.split_replicas(parts[client.tenant_index], client.replicas, client.replica)
    return ArrayData(x_train[mine], y_train[mine])
