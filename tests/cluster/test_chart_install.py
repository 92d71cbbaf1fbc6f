"""``helm lint``, and ``helm install``/``upgrade``/``uninstall`` of charts/fedkube on the
loopback control plane: what the release creates and what it leaves.

The chart's operator running in a pod and training a job, in both modes, is
tests/realnode/test_pods.py, on a real node.
"""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.jobs import get_json
from tests.controlplane import ControlPlane
from tests.support import ROOT

CHART = ROOT / "charts" / "fedkube"
RELEASE = "fedkube"
# Nothing runs here (kwok's nodes), so the image is never pulled.
IMAGE = ["--set", "image.repository=fedkube", "--set", "image.tag=test"]


def install(cp: ControlPlane, namespace: str, *values: str) -> None:
    cp.helm("install", RELEASE, str(CHART), "-n", namespace, *IMAGE, *values)


def released(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    """Every object of the release the API server has, namespaced and cluster-scoped."""
    kinds = (
        "deployments,statefulsets,services,secrets,serviceaccounts,networkpolicies,"
        "roles,rolebindings,configmaps"
    )
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    namespaced = get_json(cp, namespace, kinds, "-l", selector)["items"]
    cluster = json.loads(
        cp.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "json").stdout
    )["items"]
    return namespaced + [c for c in cluster if c["metadata"]["name"].endswith(f"-{namespace}")]


def test_helm_lint_is_clean(control_plane: ControlPlane):
    done = control_plane.helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in done.stdout, done.stdout


def test_upgrade_keeps_the_redis_password_and_uninstall_leaves_only_the_crd(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
):
    install(control_plane, namespace, "--set", "redis.persistence.enabled=false")
    password = get_json(control_plane, namespace, "secret", "fedkube-redis")["data"]["password"]
    # An upgrade keeps the random Redis password: jobs and the AOF depend on it.
    control_plane.helm(
        "upgrade", RELEASE, str(CHART), "-n", namespace, "--reuse-values",
        "--set", "operator.logLevel=DEBUG",
    )  # fmt: skip
    upgraded = get_json(control_plane, namespace, "secret", "fedkube-redis")["data"]["password"]
    assert upgraded == password
    before = released(control_plane, namespace)
    assert any(o["kind"] == "ClusterRole" for o in before)
    control_plane.helm("uninstall", RELEASE, "-n", namespace, "--wait")
    assert released(control_plane, namespace) == []
    # Helm never deletes a chart's CRDs: deleting one deletes every FederatedJob.
    control_plane.kubectl("get", "crd", "federatedjobs.fedkube.io")
