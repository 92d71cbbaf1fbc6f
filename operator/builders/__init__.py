"""Pure manifest builders: one FederatedJob in, the Kubernetes objects it needs out.

Every ``build_*`` function takes plain values and returns a new dict; none
reads the cluster or mutates its inputs, so each is unit-tested without one.
Handlers feed them what only the cluster knows (the job's uid, existing
credentials, whether the job is suspended or finished) through
:class:`Target` and apply what :func:`build_children` returns.

Every child carries an ownerReference to the job (garbage collection deletes
it with the job), the labels of :mod:`fedkube.operator.naming`, and a
``fedkube.io/spec-hash`` annotation: the reconciler compares hashes instead
of fields, so an unchanged job costs one list per kind and no write.

One module per kind of child: :mod:`.configuration` (ConfigMap, Secrets,
ServiceAccounts), :mod:`.workers` (worker pods, NetworkPolicies), :mod:`.tier`
(the aggregator tier's Deployments and Services), with :mod:`.containers` (what
every fedkube container has) and :mod:`.common` (:class:`Target`, the spec hash)
below them; :func:`build_children` lists them all. This package's names are the
ones the handlers and the reconciler use.
"""

from fedkube.operator.builders.children import build_children
from fedkube.operator.builders.common import (
    CA_KEY_KEY,
    SIGNING_KEY_KEY,
    TOKEN_KEY,
    RunMode,
    Target,
)
from fedkube.operator.builders.containers import combiner_url, service_hosts

__all__ = [
    "CA_KEY_KEY",
    "SIGNING_KEY_KEY",
    "TOKEN_KEY",
    "RunMode",
    "Target",
    "build_children",
    "combiner_url",
    "service_hosts",
]
