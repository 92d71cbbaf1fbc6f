"""FedProx: the proximal term and what it does to local training."""

from __future__ import annotations

import numpy as np
import torch

from fedkube.learning import ArrayData, proximal_term, train_local
from fedkube.spec import Training


def test_the_proximal_term_is_half_mu_squared_distance_and_its_gradient_mu_times_drift():
    # prepare
    local = torch.tensor([1.0, 3.0], requires_grad=True)
    start = torch.tensor([0.0, 1.0])
    # execute
    term = proximal_term([(local, start)], mu=0.5)
    term.backward()
    # assert: 0.25·(1 + 4) = 1.25; gradient 0.5·(1, 2)
    assert float(term.detach()) == 1.25
    np.testing.assert_allclose(local.grad.numpy(), [0.5, 1.0])


def test_a_large_mu_keeps_local_training_near_the_global_model():
    # prepare: the same data, seed and start, with and without the proximal term
    rng = np.random.default_rng(0)
    data = ArrayData(rng.standard_normal((64, 4)).astype(np.float32), rng.integers(0, 3, 64))
    training = Training(epochs=5, batch_size=8, learning_rate=0.1)

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in model.parameters()]
        result = train_local(model, data, training, seed=1, proximal_mu=mu)
        assert result.steps == 5 * 8
        return sum(
            float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before, strict=True)
        )

    # execute
    free, held = drift(0.0), drift(10.0)
    # assert
    assert held < 0.5 * free
