"""Model and data factories for the benchmarks (``bench_models:make_model``).

Importable when ``benchmarks/`` is on ``sys.path`` (the benchmark scripts put
it there). The data is random: the benchmarks measure orchestration, not
learning.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fedkube.datasets import ArrayData, DataContext


def make_model(inputs: int = 1000, outputs: int = 1000) -> nn.Module:
    """One dense layer: ``inputs * outputs + outputs`` float parameters (1,001,000 by default)."""
    return nn.Sequential(nn.Linear(inputs, outputs))


def make_data(
    context: DataContext, inputs: int = 1000, classes: int = 10, samples: int = 64
) -> ArrayData:
    """A few random samples with ``inputs`` features and integer labels < ``classes``."""
    client = context.client
    salt = 0 if client is None else 1 + client.tenant_index * 1000 + client.replica
    rng = np.random.default_rng(context.seed * 7919 + salt)
    x = rng.standard_normal((samples, inputs), dtype=np.float32)
    y = rng.integers(0, classes, size=samples, dtype=np.int64)
    return ArrayData(x, y)
