"""The torch side of a task: data contexts, local training, evaluation.

Shared by the worker runtime (local training), the global aggregator
(evaluation on the held-out split) and the baselines in ``fedkube compare``,
so that all three train and measure the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from fedkube.entrypoints import resolve
from fedkube.spec import Client, FederatedJob, Training

if TYPE_CHECKING:
    from fedkube.policy import DataBinding

Role = Literal["train", "test", "pooled"]


@dataclass(frozen=True)
class DataContext:
    """What a data factory is told: who is asking, and for which split.

    ``role`` is ``train`` for one client's own partition, ``test`` for the
    global tier's held-out split and ``pooled`` for all training data (the
    centralised baseline only).
    """

    role: Role
    client: Client | None
    partition_scheme: str
    alpha: float
    test_fraction: float
    seed: int
    num_tenants: int = 1  # tenants of the job: a simulated split needs it for every role


@dataclass(frozen=True)
class ArrayData:
    """Features and integer labels, as numpy arrays."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(len(self.y))


def build_model(job: FederatedJob) -> nn.Module:
    """The job's model, initialised from ``spec.seed`` (same on every tier)."""
    torch.manual_seed(job.spec.seed)
    model = resolve(job.spec.model.entrypoint)(**job.spec.model.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{job.spec.model.entrypoint} returned {type(model).__name__}, not nn.Module"
        )
    return model


def load_data(
    job: FederatedJob,
    role: Role,
    client: Client | None = None,
    binding: DataBinding | None = None,
) -> ArrayData:
    """Call the job's data factory for one role (and client).

    ``binding`` is the site's own data binding (fedkube.policy): its
    entrypoint replaces the manifest's (with only its kwargs), or its kwargs
    are merged last, so a site's paths never have to be in the manifest.
    """
    spec = job.spec
    kwargs: dict[str, Any] = dict(spec.data.kwargs)
    if client is not None:
        tenant = next(t for t in spec.tenants if t.name == client.tenant)
        kwargs.update(tenant.data.kwargs)
    entrypoint = spec.data.entrypoint
    if binding is not None:
        if binding.entrypoint is not None:
            entrypoint, kwargs = binding.entrypoint, {}
        kwargs.update(binding.kwargs)
    context = DataContext(
        role=role,
        client=client,
        partition_scheme=spec.data.partition.scheme.value,
        alpha=spec.data.partition.alpha,
        test_fraction=spec.data.test_fraction,
        seed=spec.seed,
        num_tenants=len(spec.tenants),
    )
    data = resolve(entrypoint)(context, **kwargs)
    if not isinstance(data, ArrayData):
        raise TypeError(f"{entrypoint} returned {type(data).__name__}, not ArrayData")
    return data


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's floating-point state as float32 numpy arrays (what travels)."""
    return {
        name: tensor.detach().cpu().to(torch.float32).numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def load_float_state(model: nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copy arrays into the model's matching floating-point tensors."""
    state = model.state_dict()
    with torch.no_grad():
        for name, array in tensors.items():
            state[name].copy_(torch.from_numpy(np.array(array, copy=True)))


def _optimizer(model: nn.Module, training: Training) -> torch.optim.Optimizer:
    if training.optimizer.value == "adam":
        return torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    return torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )


def proximal_term(
    params: Iterable[tuple[torch.Tensor, torch.Tensor]], mu: float
) -> torch.Tensor | float:
    """FedProx's ``μ/2·Σ‖w − w_g‖²`` over (local, round-start) parameter pairs.

    The round-start parameters are constants (no gradient flows into them); the
    gradient of the term on ``w`` is ``μ·(w − w_g)`` (Li et al., 2020).
    """
    if mu == 0:
        return 0.0
    total: torch.Tensor | float = 0.0
    for local, start in params:
        total = total + torch.sum((local - start.detach()) ** 2)
    return 0.5 * mu * total


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training did: mean loss and optimizer steps (τ)."""

    loss: float
    steps: int


def train(
    model: nn.Module, data: ArrayData, training: Training, seed: int, epochs: int | None = None
) -> float:
    """Train in place for ``training.epochs`` (or ``epochs``); returns the mean loss."""
    return train_local(model, data, training, seed, epochs).loss


def train_local(
    model: nn.Module,
    data: ArrayData,
    training: Training,
    seed: int,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    correction: Mapping[str, np.ndarray] | None = None,
) -> LocalResult:
    """Local training with the client side of the job's strategy.

    ``proximal_mu`` adds FedProx's ``μ/2·‖w − w_start‖²`` to every batch's loss
    (``w_start`` the weights the round started from). ``correction`` adds
    SCAFFOLD's ``c − c_i`` to the gradient of each named parameter before
    every optimizer step.
    """
    device = next(model.parameters()).device
    x = torch.as_tensor(data.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(data.y, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, training)
    loss_fn = nn.CrossEntropyLoss()
    named = dict(model.named_parameters())
    start = [(p, p.detach().clone()) for p in named.values()] if proximal_mu else []
    shifts = (
        [(named[n], torch.as_tensor(c, device=device)) for n, c in correction.items() if n in named]
        if correction
        else []
    )
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs or training.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for first in range(0, len(y), training.batch_size):
            batch = order[first : first + training.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            (loss + proximal_term(start, proximal_mu)).backward()
            for param, shift in shifts:
                if param.grad is not None:
                    param.grad.add_(shift)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return LocalResult(loss=total / max(batches, 1), steps=batches)


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayData) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of the model on ``data``."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(data.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(data.y, dtype=torch.long, device=device)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return float(loss), float(accuracy)
