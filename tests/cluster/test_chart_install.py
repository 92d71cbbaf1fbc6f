"""``helm install`` of charts/fedkube on the real control plane, in both modes.

The chart's own operator does the work: its Deployment's pod (and the bundled
Redis StatefulSet's) is run by ``tests/podrunner.py`` as the chart wrote it,
logging in with the chart's ServiceAccount, so the RBAC it gets is exactly
the chart's. A FederatedJob applied next to it trains to Succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from fedkube import signing
from fedkube.operator.builders import SIGNING_KEY_KEY
from fedkube.redis_server import free_port
from tests.cluster.jobs import apply, get_json, job_document, status
from tests.controlplane import ControlPlane
from tests.podrunner import PodRunner
from tests.support import ROOT, wait_for

CHART = ROOT / "charts" / "fedkube"
RELEASE = "fedkube"
# The image is never pulled here (the pod runner runs `fedkube` from the venv).
CENTRAL = "https://central.fedkube.invalid/{job}/{region}"
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


def claim_volume(cp: ControlPlane, name: str, path: Path) -> None:
    """A pre-provisioned PersistentVolume for the Redis claim (no provisioner here)."""
    cp.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name, "labels": {"fedkube.io/test": "true"}},
                "spec": {
                    "capacity": {"storage": "8Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "hostPath": {"path": str(path)},
                },
            }
        ),
    )


def lease_holder(cp: ControlPlane, namespace: str) -> str:
    found = cp.kubectl(
        "get", "lease", "-n", namespace, "fedkube-operator", "-o", "json", check=False
    )
    if found.returncode != 0:
        return ""
    return str(json.loads(found.stdout)["spec"].get("holderIdentity") or "")


@pytest.fixture
def helm_namespace(namespace: str, control_plane: ControlPlane) -> Iterator[str]:
    """The test's namespace; whatever the test left installed is uninstalled after it."""
    yield namespace
    control_plane.helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)


def test_helm_lint_is_clean(control_plane: ControlPlane):
    done = control_plane.helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in done.stdout, done.stdout


def test_a_central_install_reconciles_a_job_to_success_with_the_charts_own_operator(
    control_plane: ControlPlane,
    crd: None,
    helm_namespace: str,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    namespace = helm_namespace
    claim_volume(control_plane, f"redis-{namespace}", tmp_path / "redis-volume")
    metrics_port = free_port()
    install(control_plane, namespace, "--set", f"operator.metricsPort={metrics_port}")
    with PodRunner(api_client, namespace, tmp_path / "pods") as runner:
        # The operator, logged in as the chart's ServiceAccount, takes the Lease.
        wait_for(
            lambda: lease_holder(control_plane, namespace).startswith("fedkube-operator-"),
            90,
            f"the chart's operator to take its Lease; runner errors: {runner.errors}",
        )
        document = job_document()
        document["spec"]["rounds"] = 2
        document["spec"]["participation"] = {"minFraction": 1.0, "roundTimeoutSeconds": 120}
        apply(control_plane, namespace, document)
        final = wait_for(
            lambda: (
                (s := status(control_plane, namespace, "mnist")).get("phase")
                in ("Succeeded", "Failed")
                and s
            ),
            300,
            "the job to finish",
        )
        operator_pod = lease_holder(control_plane, namespace)
        operator_log = runner.log(operator_pod)
        redis_log = runner.log("fedkube-redis-0")
        assert not runner.errors, runner.errors
    assert final["phase"] == "Succeeded", (final, operator_log[-4000:])
    assert final["progress"] == "2/2"
    # The job's aggregator tier got the bundled Redis' password through the job's
    # own Secret, and round state went to the bundled Redis: its append-only file.
    secret = get_json(control_plane, namespace, "secret", "mnist-redis")
    assert secret["metadata"]["ownerReferences"][0]["name"] == "mnist"
    assert list((tmp_path / "pods" / "claims").glob("*/appendonlydir/*.aof")), redis_log[-2000:]
    # Nothing was refused: every verb the operator used, the chart granted.
    assert "forbidden" not in operator_log.lower(), operator_log[-4000:]


def test_a_site_install_runs_the_site_operator_only(
    control_plane: ControlPlane,
    crd: None,
    helm_namespace: str,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    namespace = helm_namespace
    install(
        control_plane,
        namespace,
        "--set",
        "mode=site",
        "--set",
        "site.name=hospital-a",
        "--set",
        f"central.address={CENTRAL}",
        "--set",
        f"operator.metricsPort={free_port()}",
    )
    kinds = {(o["kind"], o["metadata"]["name"]) for o in released(control_plane, namespace)}
    assert ("Deployment", "fedkube-operator") in kinds
    assert not any(kind == "StatefulSet" for kind, _ in kinds), kinds
    document = job_document()
    document["spec"]["tenants"][0]["site"] = "hospital-a"
    # Only the operator runs: the worker would dial the central site, which is not here.
    only_operator = "app.kubernetes.io/component=operator"
    with PodRunner(
        api_client, namespace, tmp_path / "pods", label_selector=only_operator
    ) as runner:
        wait_for(
            lambda: lease_holder(control_plane, namespace).startswith("fedkube-operator-"),
            90,
            f"the site operator to take its Lease; runner errors: {runner.errors}",
        )
        apply(control_plane, namespace, document)
        # The tenant's Secret comes from the central cluster: copy it, as a user would
        # (its token and its signing key).
        private_key, _public_key = signing.generate_key()
        control_plane.kubectl(
            "create",
            "secret",
            "generic",
            "mnist-tenant-a",
            "-n",
            namespace,
            "--from-literal=token=from-central",
            f"--from-literal={SIGNING_KEY_KEY}={private_key}",
        )
        pod = wait_for(
            lambda: get_json(control_plane, namespace, "pods", "-l", "fedkube.io/role=worker")[
                "items"
            ],
            60,
            "the site tenant's worker pod",
        )
        operator_log = runner.log(lease_holder(control_plane, namespace))
    assert [p["metadata"]["name"] for p in pod] == ["mnist-a-0"]
    args = pod[0]["spec"]["containers"][0]["args"]
    assert CENTRAL.format(job="mnist", region="eu") in args
    assert "forbidden" not in operator_log.lower(), operator_log[-4000:]


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
