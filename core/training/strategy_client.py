"""The client side of the server strategies: what a worker needs of ``spec.strategy``.

A worker trains with the job's strategy (FedProx's proximal term, SCAFFOLD's
correction and control-variate update, FedNova's local-step count) and, under
secure aggregation, scales its masked update the way its combiner would fold
it. Those pieces live here, in the shared core, so that the worker does not
import the aggregator's package (services depend on the core, not on each
other). The server side (``init_state``, ``server_step``, the folds and the
robust rules) stays in :mod:`fedkube.aggregator.strategies`, which takes
these pieces from here: one definition for both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]

# SCAFFOLD's control variates travel as extra tensors named ``control/<tensor>``.
CONTROL = "control/"


def _weight(weight: float, _local_steps: int) -> float:
    return weight


def fednova_fold_scale(weight: float, local_steps: int) -> float:
    """FedNova's coefficient of a client in the regional sum: ``w_i/τ_i``."""
    return weight / local_steps


@dataclass(frozen=True)
class ClientStrategy:
    """What one server strategy asks of the clients that train for it."""

    name: str
    proximal: bool = False  # the worker adds FedProx's μ/2·‖w − w_g‖²
    control_variates: bool = False  # the worker keeps SCAFFOLD's c_i
    needs_local_steps: bool = False  # the fold divides by τ_i: updates must state it
    # The coefficient the combiner folds an update with (a masked update is pre-scaled).
    fold_scale: Callable[[float, int], float] = _weight

    @property
    def needs_steps(self) -> bool:
        """True when an update without a counted optimizer step cannot be used."""
        return self.proximal or self.control_variates or self.needs_local_steps


CLIENT_STRATEGIES: dict[str, ClientStrategy] = {
    info.name: info
    for info in (
        ClientStrategy("fedavg"),
        ClientStrategy("fedavgm"),
        ClientStrategy("fedadam"),
        ClientStrategy("fedyogi"),
        ClientStrategy("fedadagrad"),
        ClientStrategy("fedprox", proximal=True),
        ClientStrategy("scaffold", control_variates=True),
        ClientStrategy("fednova", needs_local_steps=True, fold_scale=fednova_fold_scale),
    )
}


def split(tensors: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
    """(model tensors, SCAFFOLD's control tensors by model name) of a downlink payload."""
    model = {k: v for k, v in tensors.items() if not k.startswith(CONTROL)}
    control = {k[len(CONTROL) :]: v for k, v in tensors.items() if k.startswith(CONTROL)}
    return model, control


def client_control_update(
    c_i: Mapping[str, np.ndarray],
    c: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    end: Mapping[str, np.ndarray],
    steps: int,
    learning_rate: float,
) -> tuple[Tensors, Tensors]:
    """SCAFFOLD's option II: ``(c_i⁺, Δc_i)`` from the round's start ``x`` and end ``y``.

    ``c_i⁺ = c_i − c + (x − y)/(K·η_l)`` with ``K`` local steps at rate ``η_l``.
    """
    if steps < 1:
        raise ValueError("SCAFFOLD needs at least one local step")
    inverse = np.float32(1.0 / (steps * learning_rate))
    new = {
        name: (c_i[name] - c[name] + (start[name] - end[name]) * inverse).astype(np.float32)
        for name in c
    }
    return new, {name: new[name] - c_i[name] for name in c}
