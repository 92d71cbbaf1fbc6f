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
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import yaml

from fedkube import signing
from fedkube.credentials import combiner_checks
from fedkube.operator import naming
from fedkube.operator.config import OperatorConfig
from fedkube.policy import DataBinding, DataVolume, data_binding_document
from fedkube.roundstate import REDIS_PASSWORD_ENV
from fedkube.spec import API_VERSION, KIND, FederatedJob, Tenant, WorkerGroup, dump_job
from fedkube.web import AGGREGATOR_TOKEN_ENV, TOKEN_ENV

CONFIG_DIR = "/etc/fedkube/config"
DATA_BINDING_DIR = "/etc/fedkube/data-binding"
DATA_BINDING_KEY = "binding.json"
SITE_DATA_VOLUME = "site-data"  # a site's own storage, from its policy
ANNOTATION_DATA_BINDING = "fedkube.io/data-binding-hash"
TOKENS_DIR = "/etc/fedkube/tokens"
CHECKPOINT_DIR = "/var/lib/fedkube/checkpoints"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
TOKENS_FILE = f"{TOKENS_DIR}/tokens.json"
KEYS_FILE = f"{TOKENS_DIR}/keys.json"  # the combiner's: tenant -> public key
TOKEN_KEY = "token"
# The tenant Secret's Ed25519 private key, next to its token (fedkube.signing).
SIGNING_KEY_KEY = "signing-key"
REDIS_PASSWORD_KEY = "password"
# libyaml's emitter when present: the ConfigMap is rebuilt on every pass, and
# the pure-Python emitter took most of a no-op pass for a 100-tenant job.
_YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class RunMode(str, Enum):
    """What the job's pods should be doing."""

    active = "active"  # everything runs
    # spec.suspend: no worker pod; the aggregator tier stays (paused through
    # Redis) so that resuming continues the same round with what it holds.
    suspended = "suspended"
    # Succeeded/Failed, workers still finishing: the aggregator stops, the
    # combiners stay to tell the last workers that the job is over.
    finishing = "finishing"
    finished = "finished"  # every Deployment at 0, no worker pod created again


@dataclass(frozen=True)
class Target:
    """Everything the builders need that is not in the manifest itself."""

    job: FederatedJob
    namespace: str
    uid: str
    config: OperatorConfig
    mode: RunMode = RunMode.active
    aggregator_token: str = ""
    tenant_tokens: Mapping[str, str] = field(default_factory=dict)
    # Each tenant's base64 Ed25519 private key; combiners get the public halves.
    tenant_signing_keys: Mapping[str, str] = field(default_factory=dict)
    # Tenants this site's policy refuses: nothing of theirs is built here.
    refused: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.job.name

    def redis_url(self) -> str:
        url = self.job.spec.state.redis_url or self.config.redis_url
        if not url:
            raise ValueError("no Redis: set spec.state.redisUrl or the operator's --redis-url")
        return url

    def local_tenants(self) -> list[Tenant]:
        """The tenants whose workers this operator runs (its site's, or the unassigned),
        less those its policy refuses."""
        return [
            t
            for t in self.job.spec.tenants
            if t.site == self.config.site and t.name not in self.refused
        ]

    def data_binding(self, tenant: str) -> DataBinding | None:
        return self.config.policy.data_bindings.get(tenant)


def owner_reference(job: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_hash(obj: Mapping[str, Any]) -> str:
    """A short digest of a manifest without its own hash annotation."""
    metadata = dict(obj.get("metadata", {}))
    annotations = {
        k: v for k, v in metadata.get("annotations", {}).items() if k != naming.ANNOTATION_HASH
    }
    metadata["annotations"] = annotations
    canonical = json.dumps({**obj, "metadata": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` annotated with its :func:`spec_hash`."""
    metadata = dict(obj["metadata"])
    metadata["annotations"] = {
        **metadata.get("annotations", {}),
        naming.ANNOTATION_HASH: spec_hash(obj),
    }
    return {**obj, "metadata": metadata}


def _metadata(target: Target, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(target.name, target.uid)],
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- configuration and credentials ----------------------------------------------------------


def build_config_map(target: Target) -> dict[str, Any]:
    """The resolved manifest (defaults filled in) that every component reads."""
    document = dump_job(target.job)
    document["metadata"] = {"name": target.name, "namespace": target.namespace}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            target, naming.config_map_name(target.name), naming.labels(target.name, "config")
        ),
        "data": {"job.yaml": yaml.dump(document, Dumper=_YamlDumper, sort_keys=True)},
    }


def _secret(
    target: Target, name: str, labels: dict[str, str], data: Mapping[str, str]
) -> dict[str, Any]:
    """An Opaque Secret of the job's credentials (values base64-encoded here)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(target, name, labels),
        "data": {key: _b64(value) for key, value in data.items()},
    }


def build_aggregator_secret(target: Target) -> dict[str, Any]:
    """The token that combiners present to the global aggregator."""
    return _secret(
        target,
        naming.aggregator_name(target.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS),
        {TOKEN_KEY: target.aggregator_token},
    )


def build_tenant_secret(target: Target, tenant: Tenant) -> dict[str, Any]:
    """The tenant's worker token and signing key (copy it to the tenant's site in site mode)."""
    return _secret(
        target,
        naming.tenant_name(target.name, tenant.name),
        naming.labels(
            target.name, naming.ROLE_CREDENTIALS, tenant=tenant.name, region=tenant.region
        ),
        {
            TOKEN_KEY: target.tenant_tokens[tenant.name],
            SIGNING_KEY_KEY: target.tenant_signing_keys[tenant.name],
        },
    )


def build_combiner_secret(target: Target, region: str) -> dict[str, Any]:
    """What checks the region's tenants: their tokens' digests and their public keys.

    A combiner never holds a token or a private key itself, so it can neither
    pose as a tenant nor sign an update for one.
    """
    checks = combiner_checks(
        [t.name for t in target.job.spec.tenants if t.region == region],
        target.tenant_tokens,
        target.tenant_signing_keys,
        lambda name: f"Secret {naming.tenant_name(target.name, name)} key {SIGNING_KEY_KEY}",
    )
    return _secret(
        target,
        naming.combiner_name(target.name, region),
        naming.labels(target.name, naming.ROLE_CREDENTIALS, region=region),
        {
            "tokens.json": json.dumps(checks.token_digests, sort_keys=True),
            "keys.json": json.dumps(checks.public_keys, sort_keys=True),
        },
    )


def data_binding_text(binding: DataBinding) -> str:
    return json.dumps(data_binding_document(binding), sort_keys=True)


def build_data_binding_secret(target: Target, tenant: Tenant) -> dict[str, Any]:
    """The site's own data entrypoint and kwargs for a tenant's workers.

    A Secret (kwargs may hold credentials), built only by the operator that
    runs the tenant from its own policy: the central manifest never carries
    the site's paths, and the central side never sees this object.
    """
    binding = target.data_binding(tenant.name)
    assert binding is not None
    return _secret(
        target,
        naming.data_binding_name(target.name, tenant.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS, tenant=tenant.name),
        {DATA_BINDING_KEY: data_binding_text(binding)},
    )


def build_service_account(target: Target, tenant: Tenant) -> dict[str, Any]:
    """One identity per tenant, with no API token mounted (workers never call the API)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(
            target,
            naming.tenant_name(target.name, tenant.name),
            naming.labels(target.name, naming.ROLE_WORKER, tenant=tenant.name),
        ),
        "automountServiceAccountToken": False,
    }


# -- pods -----------------------------------------------------------------------------------


def _pod_security(config: OperatorConfig) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "fsGroup": config.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


def _base_env(target: Target) -> list[dict[str, Any]]:
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def redis_password_ref(target: Target) -> tuple[str, str] | None:
    """The Secret and key that hold the Redis password of the job's aggregator tier.

    The job's own ``state.redisPasswordSecret`` wins; a job on the operator's
    Redis (no ``state.redisUrl``) gets the operator's password, copied into
    the job's ``J-redis`` Secret, since a pod cannot read a Secret in the
    operator's namespace.
    """
    secret = target.job.spec.state.redis_password_secret
    if secret is not None:
        return secret.name, secret.key
    if target.job.spec.state.redis_url is None and target.config.redis_password:
        return naming.redis_secret_name(target.name), REDIS_PASSWORD_KEY
    return None


def build_redis_secret(target: Target) -> dict[str, Any]:
    """The operator's Redis password, for the job's aggregator and combiners."""
    return _secret(
        target,
        naming.redis_secret_name(target.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS),
        {REDIS_PASSWORD_KEY: target.config.redis_password or ""},
    )


def _redis_env(target: Target) -> list[dict[str, Any]]:
    ref = redis_password_ref(target)
    if ref is None:
        return []
    name, key = ref
    return [{"name": REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}]


def _secret_env(name: str, secret: str, key: str = TOKEN_KEY) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _config_volumes(target: Target) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": naming.config_map_name(target.name)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    return volumes, mounts


def _container(
    target: Target,
    name: str,
    args: list[str],
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    resources: dict[str, Any],
    *,
    image: str | None = None,
) -> dict[str, Any]:
    """One fedkube container; ``image`` defaults to the job's image, else the operator's."""
    return {
        "name": name,
        "image": image or target.job.spec.image or target.config.image,
        "imagePullPolicy": target.config.image_pull_policy,
        "command": ["fedkube"],
        "args": args,
        "env": env,
        "ports": ports,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
    }


def _service_probe(port: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 5}


def _service_url(target: Target, service: str) -> str:
    return f"http://{service}.{target.namespace}.svc:{target.config.service_port}"


def combiner_url(target: Target, region: str) -> str:
    """Where a region's workers find their combiner (central, or across sites)."""
    if target.config.site is None:
        return _service_url(target, naming.combiner_name(target.name, region))
    assert target.config.central_address is not None  # OperatorConfig checks it
    return target.config.central_address.format(
        job=target.name, namespace=target.namespace, region=region
    )


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
    volumes, mounts = _config_volumes(target)
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
    env = [
        *_base_env(target),
        _secret_env(TOKEN_ENV, credentials),
        # In site mode from the Secret copied from the central cluster, like the token.
        _secret_env(signing.SIGNING_KEY_ENV, credentials, SIGNING_KEY_KEY),
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
    container = _container(
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
        "securityContext": _pod_security(target.config),
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
            **_metadata(target, naming.worker_pod_name(target.name, group), pod_labels),
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
        "metadata": _metadata(
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


def central_port(target: Target) -> int:
    """The port of the central address (site mode), from its URL template."""
    assert target.config.central_address is not None
    parts = urlsplit(target.config.central_address.format(job="j", namespace="n", region="r"))
    if parts.port:
        return parts.port
    return 443 if parts.scheme == "https" else 80


# -- the aggregator tier --------------------------------------------------------------------


def _deployment(
    target: Target,
    name: str,
    role: str,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    **label_extra: str,
) -> dict[str, Any]:
    pod_labels = naming.labels(target.name, role, **label_extra)
    port = target.config.service_port
    running = {RunMode.active, RunMode.suspended}
    if role == naming.ROLE_COMBINER:
        running.add(RunMode.finishing)
    replicas = 1 if target.mode in running else 0
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(target, name, pod_labels),
        "spec": {
            "replicas": replicas,
            # One writer per role: never two aggregators side by side (a lease
            # in Redis guards that too, Recreate avoids the fight).
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": naming.selector(target.name, role, **label_extra)},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": _pod_security(target.config),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _service(target: Target, name: str, role: str, **label_extra: str) -> dict[str, Any]:
    port = target.config.service_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target, name, naming.labels(target.name, role, **label_extra)),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector(target.name, role, **label_extra),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _tier_deployment(
    target: Target,
    name: str,
    role: str,
    args: list[str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    requests: dict[str, str],
    *,
    image: str | None = None,
    **label_extra: str,
) -> dict[str, Any]:
    """A service of the aggregator tier: it holds the aggregator token and serves HTTP."""
    port = target.config.service_port
    env = [
        *_base_env(target),
        *_redis_env(target),
        _secret_env(AGGREGATOR_TOKEN_ENV, naming.aggregator_name(target.name)),
    ]
    container = _container(
        target,
        role,
        args,
        env,
        mounts,
        [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        {"requests": requests, "limits": {"memory": requests["memory"]}},
        image=image,
    )
    container["readinessProbe"] = _service_probe(port)
    return _deployment(target, name, role, container, volumes, **label_extra)


def build_aggregator_deployment(target: Target) -> dict[str, Any]:
    """The global aggregator; always started with ``--resume`` (a restart is a resume)."""
    volumes, mounts = _config_volumes(target)
    claim = target.job.spec.state.checkpoint_claim
    volumes.append(
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": "checkpoints", "emptyDir": {}}
    )
    mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_DIR})
    port = target.config.service_port
    args = [
        "aggregator",
        "--job",
        JOB_FILE,
        "--redis-url",
        target.redis_url(),
        "--checkpoint-dir",
        CHECKPOINT_DIR,
        "--host",
        "$(POD_IP)",
        "--port",
        str(port),
        "--resume",
    ]
    return _tier_deployment(
        target,
        naming.aggregator_name(target.name),
        naming.ROLE_AGGREGATOR,
        args,
        volumes,
        mounts,
        {"cpu": target.config.aggregator_cpu, "memory": target.config.aggregator_memory},
    )


def build_aggregator_service(target: Target) -> dict[str, Any]:
    return _service(target, naming.aggregator_name(target.name), naming.ROLE_AGGREGATOR)


def build_combiner_deployment(target: Target, region: str) -> dict[str, Any]:
    """A region's combiner: validates and folds its workers' updates.

    It runs the slim image whatever the job's ``spec.image``: a combiner imports none of the
    job's code (no model, no data), only fedkube's, and needs no torch.
    """
    volumes, mounts = _config_volumes(target)
    volumes.append(
        {"name": "tokens", "secret": {"secretName": naming.combiner_name(target.name, region)}}
    )
    mounts.append({"name": "tokens", "mountPath": TOKENS_DIR, "readOnly": True})
    port = target.config.service_port
    args = [
        "combiner",
        "--job",
        JOB_FILE,
        "--region",
        region,
        "--redis-url",
        target.redis_url(),
        "--global-url",
        _service_url(target, naming.aggregator_name(target.name)),
        "--tenant-tokens",
        TOKENS_FILE,
        "--tenant-keys",
        KEYS_FILE,
        "--host",
        "$(POD_IP)",
        "--port",
        str(port),
    ]
    return _tier_deployment(
        target,
        naming.combiner_name(target.name, region),
        naming.ROLE_COMBINER,
        args,
        volumes,
        mounts,
        {"cpu": target.config.combiner_cpu, "memory": target.config.combiner_memory},
        image=target.config.slim_image,
        region=region,
    )


def build_combiner_service(target: Target, region: str) -> dict[str, Any]:
    return _service(
        target, naming.combiner_name(target.name, region), naming.ROLE_COMBINER, region=region
    )


# -- all of it --------------------------------------------------------------------------------


def build_children(target: Target) -> list[dict[str, Any]]:
    """Every object the job needs from this operator, hashed, in apply order.

    Central mode: the configuration, credentials, the aggregator tier and the
    workers of tenants without a site. Site mode: the configuration and the
    site's own tenants (their Secrets are copied from the central cluster, so
    they are not built here). Worker pods exist only while the job is active.
    """
    children: list[dict[str, Any]] = [build_config_map(target)]
    tenants = target.local_tenants()
    if target.config.site is None:
        children.append(build_aggregator_secret(target))
        if redis_password_ref(target) == (
            naming.redis_secret_name(target.name),
            REDIS_PASSWORD_KEY,
        ):
            children.append(build_redis_secret(target))
        children += [build_tenant_secret(target, t) for t in target.job.spec.tenants]
        for region in target.job.region_names():
            children.append(build_combiner_secret(target, region))
    children += [
        build_data_binding_secret(target, t) for t in tenants if target.data_binding(t.name)
    ]
    children += [build_service_account(target, t) for t in tenants]
    children += [build_network_policy(target, t) for t in tenants]
    if target.config.site is None:
        children.append(build_aggregator_service(target))
        children.append(build_aggregator_deployment(target))
        for region in target.job.region_names():
            children.append(build_combiner_service(target, region))
            children.append(build_combiner_deployment(target, region))
    if target.mode is RunMode.active:
        by_name = {t.name: t for t in tenants}
        children += [
            build_worker_pod(target, by_name[g.tenant], g)
            for g in target.job.worker_groups()
            if g.tenant in by_name
        ]
    return [with_hash(child) for child in children]
