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
estimate of the client's control variate, :meth:`StepLog.rate`).

Only the parameters of the models being trained are touched: an optimizer
over other tensors steps as it would anyway. A script of the Client API
(:mod:`fedkube.client`) trains a model object of its own, in a thread of
its own; ``receive()`` adds it to the round's hooks
(:meth:`RoundHooks.track`). A loop that updates weights without a
``torch.optim`` optimizer takes no step that fedkube sees: the log then says
zero steps, and the worker refuses an update that its strategy could not
correct.
"""

from __future__ import annotations

import threading
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


class RoundHooks:
    """The strategy's terms for the tracked parameters, by the parameter's identity."""

    def __init__(self, proximal_mu: float, correction: Mapping[str, np.ndarray] | None):
        self.proximal_mu = proximal_mu
        self.correction = correction or {}
        self.start: dict[int, torch.Tensor] = {}
        self.shifts: dict[int, torch.Tensor] = {}
        self.ours: set[int] = set()
        self.log = StepLog()

    def track(self, model: nn.Module) -> None:
        """Correct the steps over ``model``'s trainable parameters from now on (start: now)."""
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self.ours.add(id(param))
            if self.proximal_mu:
                self.start[id(param)] = param.detach().clone()
            if name in self.correction:
                self.shifts[id(param)] = torch.as_tensor(
                    self.correction[name], device=param.device, dtype=param.dtype
                )

    def before(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if not (self.start or self.shifts):
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None or id(param) not in self.ours:
                        continue
                    start = self.start.get(id(param))
                    if start is not None:
                        param.grad.add_(param.detach() - start, alpha=self.proximal_mu)
                    shift = self.shifts.get(id(param))
                    if shift is not None:
                        param.grad.add_(shift)

    def after(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        group = next(
            (g for g in optimizer.param_groups if any(id(p) in self.ours for p in g["params"])),
            None,
        )
        if group is None:
            return
        log = self.log
        log.by_optimizer[id(optimizer)] = log.by_optimizer.get(id(optimizer), 0) + 1
        log.rate_sum += float(group.get("lr", 0.0)) / (1.0 - float(group.get("momentum", 0.0)))


# Torch's global step hooks are installed once per process and never removed:
# registering and removing them while another thread steps an optimizer would
# change the dict that thread iterates (tests run a federation in one process,
# its workers training side by side). They dispatch to the rounds in training.
_active: list[RoundHooks] = []
_lock = threading.Lock()
_installed = False
# The hooks of the round that this thread trains (client_strategy sets them).
_local = threading.local()


def _before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    with _lock:
        rounds = list(_active)
    for hooks in rounds:
        hooks.before(optimizer, args, kwargs)


def _after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    with _lock:
        rounds = list(_active)
    for hooks in rounds:
        hooks.after(optimizer, args, kwargs)


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            register_optimizer_step_pre_hook(_before)
            register_optimizer_step_post_hook(_after)
            _installed = True


@contextmanager
def client_strategy(
    model: nn.Module,
    proximal_mu: float = 0.0,
    correction: Mapping[str, np.ndarray] | None = None,
) -> Iterator[StepLog]:
    """While inside: every optimizer step over ``model`` gets the strategy's gradient terms.

    ``proximal_mu`` is FedProx's μ (``w_start``: the weights on entry);
    ``correction`` maps parameter names to SCAFFOLD's ``c − c_i``. Yields
    the :class:`StepLog` that the steps fill in. Rounds in training side by
    side (threads) each touch only their own parameters.
    """
    _install()
    hooks = RoundHooks(proximal_mu, correction)
    hooks.track(model)
    with _lock:
        _active.append(hooks)
    _local.hooks = hooks
    try:
        yield hooks.log
    finally:
        _local.hooks = None
        with _lock:
            _active.remove(hooks)


def current() -> RoundHooks | None:
    """The hooks of the round this thread is training (None outside :func:`client_strategy`)."""
    return getattr(_local, "hooks", None)
