"""fedkube: Kubernetes-native federated learning.

This package (folder ``core/``) is what every tier shares; the services live in
``fedkube.aggregator`` and ``fedkube.workers`` and the Kubernetes operator in
``fedkube.operator`` (folders ``aggregator/``, ``workers/`` and ``operator/``
at the top of the repository). Dependencies point from those down to here,
never between them.

At the top, the names a manifest, a site or a user's code may write:
``spec`` (the FederatedJob model), ``policy`` (a site's policy), ``errors``,
``task`` and ``client`` (the two ways to bring training code), ``classifier``
(the built-in task), ``datasets`` and ``examples`` (data and model factories),
and ``cli`` (the ``fedkube`` command). Below them, one sub-package per concern:

- ``wire``: what travels between tiers (round protocol, tensor codec,
  compression, signatures, secure aggregation, failure reports);
- ``state``: what persists (round state in Redis, the lease, checkpoints, the
  local ``redis-server``);
- ``service``: what every long-running service needs (HTTP, metrics, logs,
  long polls, backoff, credentials, fault points, child processes);
- ``training``: the ML side (models and data, local training, the client side
  of the strategies, DP, norms, partitioning, evaluation and its headline
  metric);
- ``local``: the embedded runtime (``fedkube run``, processes or Ray);
- ``tools``: the other commands' work (``compare``, ``export``, the README's
  generated reference).
"""

__version__ = "0.1.0"
