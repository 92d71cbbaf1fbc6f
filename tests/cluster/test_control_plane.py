"""The loopback control plane behaves like a real cluster where fedkube relies on it.

GPU pods are placed by the real scheduler on kwok nodes and run; pods asking
for more GPUs than a node has stay Pending with the scheduler's reason; the
controller-manager's garbage collector removes owned objects; CRDs become
Established.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.controlplane import GPU_RESOURCE, ControlPlane
from tests.support import wait_for


def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    """A pod that asks for ``gpus`` GPUs the way a device-plugin user does (limits only)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "image": "fedkube/worker:test",
                    "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                }
            ]
        },
    }


@pytest.fixture
def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client)


def test_a_gpu_pod_is_scheduled_onto_a_kwok_node_and_runs(
    core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_pod(namespace, gpu_pod("one-gpu", 1))

    def running() -> Any:
        pod = core.read_namespaced_pod("one-gpu", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, 30, "the GPU pod to run")

    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["type"] == "kwok"
    assert node.metadata.labels["fedkube.io/accelerator"] == "nvidia"
    assert int(node.status.allocatable[GPU_RESOURCE]) >= 1
    assert pod.status.pod_ip


def test_a_pod_wanting_more_gpus_than_any_node_has_stays_pending_as_unschedulable(
    core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    most = max(int(n.status.allocatable.get(GPU_RESOURCE, 0)) for n in core.list_node().items)
    core.create_namespaced_pod(namespace, gpu_pod("too-many-gpus", most + 1))

    def scheduled_condition() -> Any:
        pod = core.read_namespaced_pod("too-many-gpus", namespace)
        return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)

    condition = wait_for(scheduled_condition, 30, "the scheduler's verdict")
    assert condition.status == "False"
    assert condition.reason == "Unschedulable"
    assert GPU_RESOURCE in condition.message
    pod = core.read_namespaced_pod("too-many-gpus", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


def test_deleting_a_deployment_in_the_background_garbage_collects_its_pods(
    api_client: kubernetes.client.ApiClient, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    apps = kubernetes.client.AppsV1Api(api_client)
    labels = {"app": "gc-probe"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gc-probe"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "fedkube/worker:test"}]},
                },
            },
        },
    )
    wait_for(
        lambda: apps.read_namespaced_deployment("gc-probe", namespace).status.ready_replicas == 3,
        60,
        "3 ready replicas",
    )

    def pods() -> list[Any]:
        return core.list_namespaced_pod(namespace, label_selector="app=gc-probe").items

    def replica_sets() -> list[Any]:
        return apps.list_namespaced_replica_set(namespace, label_selector="app=gc-probe").items

    assert len(pods()) == 3 and len(replica_sets()) == 1

    apps.delete_namespaced_deployment(
        "gc-probe", namespace, body={"propagationPolicy": "Background"}
    )

    wait_for(lambda: not replica_sets() and not pods(), 60, "the ReplicaSet and pods to be gone")


WIDGET_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.fedkube.io
spec:
  group: test.fedkube.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"""


@pytest.fixture
def widget_crd(control_plane: ControlPlane) -> Iterator[str]:
    """Apply the throwaway Widget CRD with kubectl; delete it afterwards (it is cluster-wide)."""
    control_plane.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    name: str = yaml.safe_load(WIDGET_CRD)["metadata"]["name"]
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "crd", name, "--wait=false", "--ignore-not-found")


def test_a_crd_applied_with_kubectl_becomes_established_and_serves_its_kind(
    api_client: kubernetes.client.ApiClient,
    control_plane: ControlPlane,
    widget_crd: str,
    namespace: str,
) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        crd = extensions.read_custom_resource_definition(widget_crd)
        conditions = crd.status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, 30, f"{widget_crd} to be Established")

    custom = kubernetes.client.CustomObjectsApi(api_client)
    widget = {"apiVersion": "test.fedkube.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
    custom.create_namespaced_custom_object(
        "test.fedkube.io", "v1", namespace, "widgets", {**widget, "spec": {"size": 2}}
    )
    listed = control_plane.kubectl("get", "widgets", "-n", namespace, "-o", "name").stdout
    assert listed.split() == ["widget.test.fedkube.io/w"]
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(
            "test.fedkube.io",
            "v1",
            namespace,
            "widgets",
            {**widget, "metadata": {"name": "zero"}, "spec": {"size": 0}},
        )
    assert refused.value.status == 422
