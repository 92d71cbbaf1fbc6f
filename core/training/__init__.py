"""The ML side of a job: building models and loading data (``learning``),
resolving user entrypoints, the client side of the strategies (``strategy_client``
and the optimizer hooks of ``strategy_hooks``), differential privacy, norms and
clipping, partitioning simulated tenants, evaluation at the sites and the
job's headline metric.

Importing this package loads nothing: modules that need torch import it
themselves, so that the slim image's services (which have no torch) can use
the pure ones (``evaluation``, ``headline``, ``norms``).
"""
