"""Fixtures for the chaos tests: the cluster tests' control plane, namespace and operator.

They are the fixtures of tests/cluster/conftest.py, re-exported so that the
faults here run against the same real components. Being defined again in
this folder, the session-scoped control plane is this folder's own: a test
here that restarts kube-apiserver never disturbs tests/cluster.
"""

from __future__ import annotations

from tests.cluster.conftest import api_client, control_plane, crd, namespace, operator

__all__ = ["api_client", "control_plane", "crd", "namespace", "operator"]
