"""What every fedkube container has: the pod and container security settings,
the environment, the config volumes, the health probe and the Services' URLs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from fedkube.operator import naming
from fedkube.operator.builders.common import CONFIG_DIR, TLS_DIR, TOKEN_KEY, Target
from fedkube.operator.builders.configuration import redis_password_ref
from fedkube.operator.config import OperatorConfig
from fedkube.service.certificates import CA_FILE, CERT_FILE, KEY_FILE
from fedkube.state.roundstate import REDIS_PASSWORD_ENV


def pod_security(config: OperatorConfig) -> dict[str, Any]:
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


def base_env(target: Target) -> list[dict[str, Any]]:
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def redis_env(target: Target) -> list[dict[str, Any]]:
    ref = redis_password_ref(target)
    if ref is None:
        return []
    name, key = ref
    return [{"name": REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}]


def secret_env(name: str, secret: str, key: str = TOKEN_KEY) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def config_volumes(target: Target) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": naming.config_map_name(target.name)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    return volumes, mounts


def fedkube_container(
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


def with_tls(
    target: Target,
    secret: str,
    args: list[str],
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Under ``spec.transport.tls``: ``secret``'s certificate files at ``--tls-dir``.

    Only the three TLS keys of the Secret are mounted (a combiner's and a
    tenant's Secret hold their token and signing key too, which go to the
    environment), read-only and not world-readable.
    """
    if not target.tls:
        return args, volumes, mounts
    items = [{"key": name, "path": name} for name in (CA_FILE, CERT_FILE, KEY_FILE)]
    volume = {"name": "tls", "secret": {"secretName": secret, "items": items, "defaultMode": 0o440}}
    return (
        [*args, "--tls-dir", TLS_DIR],
        [*volumes, volume],
        [*mounts, {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}],
    )


def service_probe(port: int, tls: bool = False) -> dict[str, Any]:
    """The readiness probe: ``/healthz``, over HTTPS under TLS (a kubelet verifies no
    certificate and presents none; the route needs neither)."""
    get: dict[str, Any] = {"path": "/healthz", "port": port}
    if tls:
        get["scheme"] = "HTTPS"
    return {"httpGet": get, "periodSeconds": 5}


def service_url(target: Target, service: str) -> str:
    scheme = "https" if target.tls else "http"
    return f"{scheme}://{service}.{target.namespace}.svc:{target.config.service_port}"


def service_hosts(namespace: str, service: str, extra: Sequence[str] = ()) -> list[str]:
    """The names a Service is reached by, for its certificate (``extra``: the spec's
    serverNames, the names other sites use)."""
    short = f"{service}.{namespace}"
    return [service, short, f"{short}.svc", f"{short}.svc.cluster.local", *extra]


def combiner_url(target: Target, region: str) -> str:
    """Where a region's workers find their combiner (central, or across sites)."""
    if target.config.site is None:
        return service_url(target, naming.combiner_name(target.name, region))
    assert target.config.central_address is not None  # OperatorConfig checks it
    return target.config.central_address.format(
        job=target.name, namespace=target.namespace, region=region
    )


def central_port(target: Target) -> int:
    """The port of the central address (site mode), from its URL template."""
    assert target.config.central_address is not None
    parts = urlsplit(target.config.central_address.format(job="j", namespace="n", region="r"))
    if parts.port:
        return parts.port
    return 443 if parts.scheme == "https" else 80
