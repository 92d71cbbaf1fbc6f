"""The torch side of a task: data contexts, local training, evaluation.

Shared by the worker runtime (local training), the global aggregator
(evaluation on the held-out split) and the baselines in ``fedkube compare``,
so that all three train and measure the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from fedkube.entrypoints import resolve
from fedkube.spec import Client, FederatedJob, Lora, Training

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
    """The job's model, initialised from ``spec.seed`` (same on every tier).

    With ``spec.training.peft`` the entrypoint's model is the frozen base of
    a peft model with LoRA adapters (:func:`with_lora`).
    """
    torch.manual_seed(job.spec.seed)
    model = resolve(job.spec.model.entrypoint)(**job.spec.model.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{job.spec.model.entrypoint} returned {type(model).__name__}, not nn.Module"
        )
    if job.spec.training.peft is not None:
        return with_lora(model, job.spec.training.peft)
    return model


def with_lora(model: nn.Module, lora: Lora) -> nn.Module:
    """``model`` frozen, with trainable LoRA adapters (peft) on ``lora.target_modules``.

    Empty ``target_modules``: peft's default for the model's architecture
    (read from ``model.config.model_type``, e.g. GPT-2's ``c_attn``). The
    adapters' ``B`` starts at zero, so the wrapped model computes what the
    base does until it trains.
    """
    import peft

    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
    )
    with warnings.catch_warnings():
        # GPT-2's Conv1D layers store weights transposed: peft says so, and adapts to it.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        wrapped: nn.Module = peft.get_peft_model(model, config)
    return wrapped


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` is a base with adapters (a peft model): then only they travel."""
    return getattr(model, "peft_config", None) is not None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that local training updates (all of them unless some are frozen)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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
    """The model's floating-point state as float32 numpy arrays (what travels).

    For an adapted model (:func:`is_adapted`) only its trainable tensors, the
    adapters: the frozen base is built from the seed (or loaded) by every
    tier and never sent, aggregated or checkpointed.
    """
    if is_adapted(model):
        tensors: Mapping[str, torch.Tensor] = trainable_parameters(model)
    else:
        tensors = model.state_dict()
    return {
        name: tensor.detach().cpu().to(torch.float32).numpy().copy()
        for name, tensor in tensors.items()
        if tensor.is_floating_point()
    }


def load_float_state(model: nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copy arrays into the model's matching floating-point tensors."""
    state = model.state_dict()
    with torch.no_grad():
        for name, array in tensors.items():
            state[name].copy_(torch.from_numpy(np.array(array, copy=True)))


def _optimizer(model: nn.Module, training: Training) -> torch.optim.Optimizer:
    params = list(trainable_parameters(model).values())
    if training.optimizer.value == "adam":
        return torch.optim.Adam(params, lr=training.learning_rate)
    return torch.optim.SGD(params, lr=training.learning_rate, momentum=training.momentum)


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
    named = trainable_parameters(model)
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


# Targets per forward pass in evaluate(): a language model's rows hold one
# target per position, so its held-out set is evaluated in slices.
EVAL_TARGETS = 16384


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayData) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of the model on ``data``, over every target.

    ``y`` holds one class per row, or one per position (a language model's
    next tokens, with logits shaped ``(rows, classes, positions)``). Rows go
    through the model in slices of about :data:`EVAL_TARGETS` targets.
    """
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(data.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(data.y, dtype=torch.long, device=device)
    per_row = max(1, int(np.prod(y.shape[1:])))
    rows = max(1, EVAL_TARGETS // per_row)
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, len(y), rows):
        logits = model(x[first : first + rows])
        target = y[first : first + rows]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum().item())
        count += target.numel()
    return loss_sum / max(count, 1), correct / max(count, 1)
