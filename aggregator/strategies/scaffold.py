"""SCAFFOLD (Karimireddy et al., 2020): control variates against client drift.

The server keeps a control variate ``c`` (one array per model tensor) and
sends it down with the model; each client keeps its own ``c_i`` across rounds
in its durable state and corrects every local SGD step by ``c − c_i``:
``y ← y − η_l·(∇F_i(y) + c − c_i)``. After ``K`` local steps it updates its
variate with option II of the paper,
``c_i⁺ = c_i − c + (x − y)/(K·η_l)``, and sends ``Δc_i = c_i⁺ − c_i`` beside
``Δy_i = y − x``.

On the wire the control variates are extra tensors named
``control/<tensor>`` in the same safetensors payload as the weights, so the
combiners validate and fold ``Δc`` exactly like ``Δw`` (one running sum, no
special case). The server then applies ``x ← x + η_g·Δ̄y`` and
``c ← c + (|S|/N)·Δ̄c``, with ``|S|`` the clients in the round and ``N`` all
clients of the job. The means are sample-weighted like FedAvg's (the paper
uses plain means; with equal client sizes they agree).

The client's side (the payload's ``control/`` split and option II) is in
:mod:`fedkube.training.strategy_client`, which the worker imports without this package.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, apply_delta
from fedkube.spec import Strategy
from fedkube.training.norms import l2_norm
from fedkube.training.strategy_client import CONTROL, split

NAME = "scaffold"


def init_state(weights: Mapping[str, np.ndarray], params: Strategy) -> Tensors:
    """``c = 0`` for every model tensor."""
    return {CONTROL + name: np.zeros(w.shape, np.float32) for name, w in weights.items()}


def downlink(weights: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> Tensors:
    """What travels down: the model and the server's control variate."""
    return {**weights, **state}


def server_step(
    weights: Mapping[str, np.ndarray],
    aggregate: RoundAggregate,
    state: Mapping[str, np.ndarray],
    params: Strategy,
) -> tuple[Tensors, Tensors]:
    """``x ← x + η_g·Δ̄y``; ``c ← c + (|S|/N)·Δ̄c``."""
    delta, control_delta = split(aggregate.delta)
    share = aggregate.count / aggregate.population
    new_state = {
        CONTROL + name: (c + np.float32(share) * control_delta[name]).astype(np.float32)
        for name, c in split(state)[1].items()
    }
    return apply_delta(weights, delta, params.server_lr), new_state


def state_summary(state: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {"control_variate_norm": l2_norm(state)}
