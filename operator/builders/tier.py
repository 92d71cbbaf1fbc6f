"""The aggregator tier: the global aggregator's and each region's combiner's
Deployment and Service."""

from __future__ import annotations

from typing import Any

from fedkube.operator import naming
from fedkube.operator.builders.common import (
    CHECKPOINT_DIR,
    JOB_FILE,
    KEYS_FILE,
    SIGNING_KEY_KEY,
    TOKEN_KEY,
    TOKENS_DIR,
    TOKENS_FILE,
    RunMode,
    Target,
    object_metadata,
)
from fedkube.operator.builders.containers import (
    base_env,
    config_volumes,
    fedkube_container,
    pod_security,
    redis_env,
    secret_env,
    service_probe,
    service_url,
    with_tls,
)
from fedkube.service.web import AGGREGATOR_TOKEN_ENV
from fedkube.wire.signing import SIGNING_KEY_ENV


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
        "metadata": object_metadata(target, name, pod_labels),
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
                        # /metrics needs no client certificate, but under TLS it is HTTPS.
                        "prometheus.io/scheme": "https" if target.tls else "http",
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": pod_security(target.config),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def checks_volume(secret: str) -> dict[str, Any]:
    """The token digests and public keys of a Secret, as files: never its own credential."""
    items = [{"key": name, "path": name} for name in ("tokens.json", "keys.json")]
    return {"name": "checks", "secret": {"secretName": secret, "items": items}}


def _service(target: Target, name: str, role: str, **label_extra: str) -> dict[str, Any]:
    port = target.config.service_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(target, name, naming.labels(target.name, role, **label_extra)),
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
    credentials: list[dict[str, Any]] | None = None,
    **label_extra: str,
) -> dict[str, Any]:
    """A service of the aggregator tier: it serves HTTP, with ``credentials`` in its env."""
    port = target.config.service_port
    env = [*base_env(target), *redis_env(target), *(credentials or [])]
    container = fedkube_container(
        target,
        role,
        args,
        env,
        mounts,
        [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        {"requests": requests, "limits": {"memory": requests["memory"]}},
        image=image,
    )
    container["readinessProbe"] = service_probe(port, target.tls)
    return _deployment(target, name, role, container, volumes, **label_extra)


def build_aggregator_deployment(target: Target) -> dict[str, Any]:
    """The global aggregator; always started with ``--resume`` (a restart is a resume)."""
    volumes, mounts = config_volumes(target)
    claim = target.job.spec.state.checkpoint_claim
    volumes.append(
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": "checkpoints", "emptyDir": {}}
    )
    mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_DIR})
    volumes.append(checks_volume(naming.aggregator_name(target.name)))
    mounts.append({"name": "checks", "mountPath": TOKENS_DIR, "readOnly": True})
    port = target.config.service_port
    args = [
        "aggregator",
        "--job",
        JOB_FILE,
        "--redis-url",
        target.redis_url(),
        "--checkpoint-dir",
        CHECKPOINT_DIR,
        "--region-tokens",
        TOKENS_FILE,
        "--region-keys",
        KEYS_FILE,
        "--host",
        "$(POD_IP)",
        "--port",
        str(port),
        "--resume",
    ]
    args, volumes, mounts = with_tls(
        target, naming.aggregator_name(target.name), args, volumes, mounts
    )
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
    volumes, mounts = config_volumes(target)
    secret = naming.combiner_name(target.name, region)
    volumes.append(checks_volume(secret))
    mounts.append({"name": "checks", "mountPath": TOKENS_DIR, "readOnly": True})
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
        service_url(target, naming.aggregator_name(target.name)),
        "--tenant-tokens",
        TOKENS_FILE,
        "--tenant-keys",
        KEYS_FILE,
        "--host",
        "$(POD_IP)",
        "--port",
        str(port),
    ]
    args, volumes, mounts = with_tls(target, secret, args, volumes, mounts)
    return _tier_deployment(
        target,
        naming.combiner_name(target.name, region),
        naming.ROLE_COMBINER,
        args,
        volumes,
        mounts,
        {"cpu": target.config.combiner_cpu, "memory": target.config.combiner_memory},
        image=target.config.slim_image,
        credentials=[
            secret_env(AGGREGATOR_TOKEN_ENV, secret, TOKEN_KEY),
            secret_env(SIGNING_KEY_ENV, secret, SIGNING_KEY_KEY),
        ],
        region=region,
    )


def build_combiner_service(target: Target, region: str) -> dict[str, Any]:
    return _service(
        target, naming.combiner_name(target.name, region), naming.ROLE_COMBINER, region=region
    )
