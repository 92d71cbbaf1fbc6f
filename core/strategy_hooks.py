"""The client side of a strategy, applied to whatever loop trains the model.

FedProx and SCAFFOLD change the local gradient: FedProx adds
``μ·(w − w_start)``, the gradient of its proximal term ``μ/2·‖w − w_start‖²``
(Li et al., 2020); SCAFFOLD adds ``c − c_i`` (Karimireddy et al., 2020).
Both are added to the ``.grad`` of the model's trainable parameters just
before every optimizer step, through torch's global optimizer step hooks, so
they reach a loop the user wrote (any ``torch.optim`` optimizer, gradient
accumulation, a ``GradScaler``, which unscales before it steps) without the
user writing them. The same hooks count the steps the loop took (FedNova's
and SCAFFOLD's τ) and the learning rate each step used (SCAFFOLD's option-II
estimate of the client's control variate, :func:`StepLog.rate`).

Only the parameters of the model being trained are touched: an optimizer
over other tensors steps as it would anyway. A loop that updates weights
without a ``torch.optim`` optimizer takes no step that fedkube sees;
:func:`client_strategy` then reports zero steps, and the worker refuses to
send an update that its strategy could not correct.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)


@dataclass
class StepLog:
    """What the optimizer steps of one round of local training did.

    ``steps`` counts the steps of the busiest optimizer over the model's
    parameters (a loop with two optimizers takes one step per batch, not two).
    """

    by_optimizer: dict[int, int] = field(default_factory=dict)
    rate_sum: float = 0.0

    @property
    def steps(self) -> int:
        return max(self.by_optimizer.values(), default=0)

    def rate(self) -> float:
        """The mean effective learning rate, ``lr / (1 − momentum)``, over the steps.

        With momentum ``m``, SGD's steady-state step is ``lr / (1 − m)``; a
        learning-rate schedule is averaged over the steps it took.
        """
        counted = sum(self.by_optimizer.values())
        return self.rate_sum / counted if counted else 0.0


@contextmanager
def client_strategy(
    model: nn.Module,
    proximal_mu: float = 0.0,
    correction: Mapping[str, np.ndarray] | None = None,
) -> Iterator[StepLog]:
    """While inside: every optimizer step over ``model`` gets the strategy's gradient terms.

    ``proximal_mu`` is FedProx's μ (``w_start``: the weights on entry);
    ``correction`` maps parameter names to SCAFFOLD's ``c − c_i``. Yields
    the :class:`StepLog` that the steps fill in.
    """
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    ours = {id(p) for p in named.values()}
    start = {id(p): p.detach().clone() for p in named.values()} if proximal_mu else {}
    shifts: dict[int, torch.Tensor] = {}
    for name, values in (correction or {}).items():
        if name in named:
            param = named[name]
            shifts[id(param)] = torch.as_tensor(values, device=param.device, dtype=param.dtype)
    log = StepLog()

    def before(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if not (start or shifts):
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None or id(param) not in ours:
                        continue
                    if start:
                        param.grad.add_(param.detach() - start[id(param)], alpha=proximal_mu)
                    shift = shifts.get(id(param))
                    if shift is not None:
                        param.grad.add_(shift)

    def after(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        group = next(
            (g for g in optimizer.param_groups if any(id(p) in ours for p in g["params"])), None
        )
        if group is None:
            return
        log.by_optimizer[id(optimizer)] = log.by_optimizer.get(id(optimizer), 0) + 1
        log.rate_sum += float(group.get("lr", 0.0)) / (1.0 - float(group.get("momentum", 0.0)))

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()
