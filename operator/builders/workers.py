"""A tenant's worker pods and the NetworkPolicy that fences them in."""

from __future__ import annotations

import hashlib
from typing import Any

from fedkube.operator import naming
from fedkube.operator.builders.common import (
    ANNOTATION_DATA_BINDING,
    DATA_BINDING_DIR,
    DATA_BINDING_KEY,
    JOB_FILE,
    SIGNING_KEY_KEY,
    SITE_DATA_VOLUME,
    Target,
    object_metadata,
)
from fedkube.operator.builders.configuration import data_binding_text
from fedkube.operator.builders.containers import (
    base_env,
    central_port,
    combiner_url,
    config_volumes,
    fedkube_container,
    pod_security,
    secret_env,
    with_tls,
)
from fedkube.policy import DataVolume
from fedkube.service.web import TOKEN_ENV
from fedkube.spec import Tenant, WorkerGroup
from fedkube.wire import signing


def worker_resources(tenant: Tenant, gpu_resource: str) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if tenant.resources.cpu:
        requests["cpu"] = tenant.resources.cpu
    if tenant.resources.memory:
        requests["memory"] = limits["memory"] = tenant.resources.memory
    if tenant.resources.gpu:
        limits[gpu_resource] = tenant.resources.gpu
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def site_data_volume(volume: DataVolume) -> dict[str, Any]:
    """The pod volume of a site's own storage (its policy's ``dataBindings[].volume``)."""
    if volume.claim is not None:
        source = {
            "persistentVolumeClaim": {"claimName": volume.claim, "readOnly": volume.read_only}
        }
    else:
        source = {"hostPath": {"path": volume.host_path, "type": "Directory"}}
    return {"name": SITE_DATA_VOLUME, **source}


def build_worker_pod(target: Target, tenant: Tenant, group: WorkerGroup) -> dict[str, Any]:
    """One worker of a tenant: a bare Pod with a fixed name, like Kubeflow's.

    It hosts one client, or under ``spec.simulation`` a group of virtual
    clients (label ``fedkube.io/client`` then names the group).

    ``restartPolicy: OnFailure`` lets the kubelet retry a crashed worker in
    place; a pod that fails for good is replaced by the operator and counted
    against ``spec.backoffLimit``.
    """
    volumes, mounts = config_volumes(target)
    port = target.config.metrics_port
    args = [
        "worker",
        "--job",
        JOB_FILE,
        *group.worker_args(target.job.spec.simulation is not None),
        "--combiner-url",
        combiner_url(target, tenant.region),
        "--host",
        "$(POD_IP)",
        "--metrics-port",
        str(port),
    ]
    credentials = naming.tenant_name(target.name, tenant.name)
    args, volumes, mounts = with_tls(target, credentials, args, volumes, mounts)
    env = [
        *base_env(target),
        secret_env(TOKEN_ENV, credentials),
        # In site mode from the Secret copied from the central cluster, like the token.
        secret_env(signing.SIGNING_KEY_ENV, credentials, SIGNING_KEY_KEY),
    ]
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
    binding = target.data_binding(tenant.name)
    if binding is not None:
        volumes = [
            *volumes,
            {
                "name": "data-binding",
                "secret": {"secretName": naming.data_binding_name(target.name, tenant.name)},
            },
        ]
        mounts = [
            *mounts,
            {"name": "data-binding", "mountPath": DATA_BINDING_DIR, "readOnly": True},
        ]
        args += ["--data-binding", f"{DATA_BINDING_DIR}/{DATA_BINDING_KEY}"]
        if binding.volume is not None:
            volumes = [*volumes, site_data_volume(binding.volume)]
            mounts = [
                *mounts,
                {
                    "name": SITE_DATA_VOLUME,
                    "mountPath": binding.volume.mount_path,
                    "readOnly": binding.volume.read_only,
                },
            ]
        # A changed binding changes the pod's hash, so its workers are replaced.
        annotations[ANNOTATION_DATA_BINDING] = hashlib.sha256(
            data_binding_text(binding).encode()
        ).hexdigest()[:16]
    container = fedkube_container(
        target,
        naming.ROLE_WORKER,
        args,
        env,
        mounts,
        [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        worker_resources(tenant, target.config.gpu_resource),
    )
    spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "serviceAccountName": naming.tenant_name(target.name, tenant.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": pod_security(target.config),
        "containers": [container],
        "volumes": volumes,
    }
    if tenant.node_selector:
        spec["nodeSelector"] = dict(tenant.node_selector)
    if tenant.tolerations:
        spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tenant.tolerations
        ]
    if tenant.priority_class_name:
        spec["priorityClassName"] = tenant.priority_class_name
    pod_labels = naming.labels(
        target.name,
        naming.ROLE_WORKER,
        tenant=tenant.name,
        region=tenant.region,
        client=group.name,
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **object_metadata(target, naming.worker_pod_name(target.name, group), pod_labels),
            "annotations": annotations,
        },
        "spec": spec,
    }


def build_network_policy(target: Target, tenant: Tenant) -> dict[str, Any]:
    """A tenant's workers reach their region's combiner and DNS, nothing else.

    Ingress is open only on the metrics port (for Prometheus), so no other
    tenant's pod can reach them either. In site mode the combiner is outside
    the cluster: egress to the central address's port is allowed to any IP.
    """
    port = target.config.service_port
    dns = {
        "to": [
            {
                "namespaceSelector": {},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    if target.config.site is None:
        combiner: dict[str, Any] = {
            "to": [
                {
                    "podSelector": {
                        "matchLabels": naming.selector(
                            target.name, naming.ROLE_COMBINER, region=tenant.region
                        )
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": port}],
        }
    else:
        combiner = {
            "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
            "ports": [{"protocol": "TCP", "port": central_port(target)}],
        }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(
            target,
            naming.tenant_name(target.name, tenant.name),
            naming.labels(target.name, naming.ROLE_WORKER, tenant=tenant.name),
        ),
        "spec": {
            "podSelector": {
                "matchLabels": naming.selector(target.name, naming.ROLE_WORKER, tenant=tenant.name)
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"ports": [{"protocol": "TCP", "port": target.config.metrics_port}]},
            ],
            "egress": [combiner, dns],
        },
    }
