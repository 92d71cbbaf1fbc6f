"""fedkube: Kubernetes-native federated learning.

The shared core (job spec, round protocol, Redis keys, tensor codec, metric
names) lives directly in this package; the services live in
``fedkube.aggregator`` and ``fedkube.workers`` and the Kubernetes operator in
``fedkube.operator`` (folders ``aggregator/``, ``workers/`` and ``operator/``
at the top of the repository).
"""

__version__ = "0.1.0"
