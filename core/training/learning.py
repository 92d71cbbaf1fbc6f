"""The torch side of a job: its model, its data, one round of local training.

Shared by the worker runtime (local training), the global aggregator
(evaluation on the held-out split) and the baselines in ``fedkube compare``,
so that all three build, load and train the same way, through the job's
task (:mod:`fedkube.task`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedkube.datasets import DataContext
from fedkube.errors import EntrypointError
from fedkube.spec import Client, FederatedJob, Lora
from fedkube.task import Role, Task, TaskContext, load_task
from fedkube.training.entrypoints import resolve
from fedkube.training.strategy_hooks import client_strategy

if TYPE_CHECKING:
    from fedkube.policy import DataBinding


def build_model(job: FederatedJob, task: Task | None = None) -> nn.Module:
    """The job's model, initialised from ``spec.seed`` (same on every tier).

    Built by the task's ``model()`` when it has one, else by
    ``spec.model``'s entrypoint. With ``spec.training.peft`` it is the
    frozen base of a peft model with LoRA adapters (:func:`with_lora`).
    """
    task = task or load_task(job)
    torch.manual_seed(job.spec.seed)
    if task.has("model"):
        model = task.call("model", TaskContext(job, "train", seed=job.spec.seed))
        where = f"spec.task {task.reference!r}: model()"
    elif job.spec.model is not None:
        model = resolve(job.spec.model.entrypoint)(**job.spec.model.kwargs)
        where = job.spec.model.entrypoint
    else:
        raise EntrypointError(
            f"spec.model: required, because task {task.reference!r} has no model()"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} returned {type(model).__name__}, not torch.nn.Module")
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
    task: Task | None = None,
    scratch: Path | None = None,
) -> Any:
    """This client's (or the global tier's) data for one role.

    The kwargs are ``spec.data.kwargs``, then the tenant's
    ``tenants[].data.kwargs``, then the site's own binding's (fedkube.policy),
    so a site's paths never have to be in the manifest. A binding with an
    entrypoint of its own replaces the job's loader (with only its kwargs).
    Otherwise the task's ``data()`` loads it, else ``spec.data``'s factory.
    """
    spec = job.spec
    task = task or load_task(job)
    kwargs: dict[str, Any] = dict(spec.data.kwargs)
    if client is not None:
        tenant = next(t for t in spec.tenants if t.name == client.tenant)
        kwargs.update(tenant.data.kwargs)
    entrypoint = spec.data.entrypoint
    if binding is not None:
        if binding.entrypoint is not None:
            entrypoint, kwargs = binding.entrypoint, {}
        kwargs.update(binding.kwargs)
    if task.has("data") and (binding is None or binding.entrypoint is None):
        context = TaskContext(
            job, role, seed=spec.seed, client=client, data_kwargs=kwargs, scratch=scratch
        )
        data = task.call("data", context)
        where = f"spec.task {task.reference!r}: data()"
    elif entrypoint is not None:
        data = call_factory(entrypoint, job, role, client, kwargs)
        where = entrypoint
    else:
        raise EntrypointError(
            f"spec.data.entrypoint: required, because task {task.reference!r} has no data()"
        )
    if data is None:
        raise TypeError(f"{where} returned None for role {role!r}")
    return data


def call_factory(
    entrypoint: str,
    job: FederatedJob,
    role: Role,
    client: Client | None,
    kwargs: Mapping[str, Any],
) -> Any:
    """A ``spec.data``-style factory's data: ``entrypoint(DataContext, **kwargs)``."""
    return resolve(entrypoint)(data_context(job, role, client), **kwargs)


def data_context(job: FederatedJob, role: Role, client: Client | None) -> DataContext:
    """What ``spec.data``'s factory is told."""
    spec = job.spec
    return DataContext(
        role=role,
        client=client,
        partition_scheme=spec.data.partition.scheme.value,
        alpha=spec.data.partition.alpha,
        test_fraction=spec.data.test_fraction,
        seed=spec.seed,
        num_tenants=len(spec.tenants),
    )


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
    """Copy arrays into the model's matching floating-point tensors, once each.

    The arrays are often read-only views of a downloaded model: a float32 CPU
    tensor takes them with one numpy copy into its memory; any other goes
    through a writable copy that torch can wrap (it refuses read-only memory).
    """
    state = model.state_dict()
    with torch.no_grad():
        for name, array in tensors.items():
            target = state[name]
            if target.device.type == "cpu" and target.dtype == torch.float32:
                target_array = target.numpy()
                np.copyto(target_array, np.asarray(array).reshape(target_array.shape))
                continue
            target.copy_(torch.from_numpy(np.array(array, copy=True)))


@dataclass(frozen=True)
class LocalResult:
    """One round of local training: the task's result and the steps its loop took."""

    examples: int
    metrics: Mapping[str, float]
    steps: int  # optimizer steps over the model (τ)
    rate: float  # their mean effective learning rate (fedkube.training.strategy_hooks.StepLog.rate)

    @property
    def loss(self) -> float:
        return float(self.metrics.get("loss", math.nan))


def train_local(
    task: Task,
    model: nn.Module,
    data: Any,
    ctx: TaskContext,
    proximal_mu: float = 0.0,
    correction: Mapping[str, np.ndarray] | None = None,
) -> LocalResult:
    """``task.train`` with the client side of the job's strategy.

    ``proximal_mu`` adds FedProx's proximal gradient and ``correction``
    SCAFFOLD's ``c − c_i`` at every optimizer step of the task's loop
    (:func:`fedkube.training.strategy_hooks.client_strategy`).
    """
    with client_strategy(model, proximal_mu, correction) as steps:
        result = task.train(model, data, ctx)
    return LocalResult(result.examples, dict(result.metrics), steps.steps, steps.rate())
