"""FedProx (Li et al., 2020): FedAvg with a proximal term in every local loss.

Each worker minimises ``F_i(w) + μ/2·‖w − w_g‖²`` where ``w_g`` is the global
model it started the round from (``spec.strategy.proximalMu``): the term pulls
local training back toward the global model and so limits client drift under
non-IID data. The server side is plain FedAvg, so the combiners fold FedProx
updates like any other. The term itself is torch code and lives with local
training (:func:`fedkube.training.learning.proximal_term`), so that the aggregator tier
never imports torch for it.
"""

from __future__ import annotations

from fedkube.aggregator.strategies.fedavg import init_state, server_step, state_summary

NAME = "fedprox"

__all__ = ["NAME", "init_state", "server_step", "state_summary"]
