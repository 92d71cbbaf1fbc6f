"""Fixed names and labels of a job's children.

Names are a pure function of the job, so a restarted operator finds the
objects it created instead of making duplicates; labels let it list them in
one request per kind.
"""

from __future__ import annotations

from fedkube.spec import WorkerGroup

LABEL_JOB = "fedkube.io/job"
LABEL_ROLE = "fedkube.io/role"
LABEL_TENANT = "fedkube.io/tenant"
LABEL_REGION = "fedkube.io/region"
LABEL_CLIENT = "fedkube.io/client"
ANNOTATION_HASH = "fedkube.io/spec-hash"
MANAGED_BY = "fedkube-operator"
FIELD_MANAGER = "fedkube-operator"

ROLE_AGGREGATOR = "aggregator"
ROLE_COMBINER = "combiner"
ROLE_WORKER = "worker"
ROLE_CONFIG = "config"
ROLE_CREDENTIALS = "credentials"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def aggregator_name(job: str) -> str:
    return f"{job}-aggregator"


def combiner_name(job: str, region: str) -> str:
    return f"{job}-combiner-{region}"


def redis_secret_name(job: str) -> str:
    """The operator's Redis password, copied for the job's aggregator tier."""
    return f"{job}-redis"


def tls_ca_name(job: str) -> str:
    """The job's certificate authority (spec.transport.tls): read by the operator only."""
    return f"{job}-tls-ca"


def tenant_name(job: str, tenant: str) -> str:
    """The tenant's Secret, ServiceAccount and NetworkPolicy."""
    return f"{job}-tenant-{tenant}"


def data_binding_name(job: str, tenant: str) -> str:
    """The site's data binding of a tenant (site mode; never leaves the site)."""
    return f"{job}-data-{tenant}"


def worker_pod_name(job: str, group: WorkerGroup) -> str:
    """``<job>-<client>``, or ``<job>-<tenant>-v<k>`` for a group of virtual clients."""
    return f"{job}-{group.name}"


def labels(
    job: str,
    role: str,
    *,
    tenant: str | None = None,
    region: str | None = None,
    client: str | None = None,
) -> dict[str, str]:
    """The labels every child carries (``app.kubernetes.io/*`` plus fedkube's own)."""
    result = {
        "app.kubernetes.io/name": "fedkube",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "fedkube",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job,
        LABEL_ROLE: role,
    }
    if tenant is not None:
        result[LABEL_TENANT] = tenant
    if region is not None:
        result[LABEL_REGION] = region
    if client is not None:
        result[LABEL_CLIENT] = client
    return result


def selector(job: str, role: str, **extra: str) -> dict[str, str]:
    """The smallest label set that picks a role's pods (Services, NetworkPolicies)."""
    chosen = {LABEL_JOB: job, LABEL_ROLE: role}
    for key, value in extra.items():
        chosen[f"fedkube.io/{key}"] = value
    return chosen
