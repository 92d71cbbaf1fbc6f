"""The objects the pods read: the job's ConfigMap, the credentials' Secrets (what the
global aggregator checks combiners with, each tenant's token and signing key, each
combiner's own credential and its checks, a site's data binding, the Redis password)
and each tenant's ServiceAccount."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from fedkube.operator import naming
from fedkube.operator.builders.common import (
    CA_KEY_KEY,
    DATA_BINDING_KEY,
    REDIS_PASSWORD_KEY,
    SIGNING_KEY_KEY,
    TOKEN_KEY,
    Target,
    YamlDumper,
    b64,
    object_metadata,
)
from fedkube.policy import DataBinding, data_binding_document
from fedkube.service import certificates
from fedkube.service.certificates import CA_FILE
from fedkube.service.credentials import credential_checks
from fedkube.spec import Tenant, dump_job


def build_config_map(target: Target) -> dict[str, Any]:
    """The resolved manifest (defaults filled in) that every component reads."""
    document = dump_job(target.job)
    document["metadata"] = {"name": target.name, "namespace": target.namespace}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(
            target, naming.config_map_name(target.name), naming.labels(target.name, "config")
        ),
        "data": {"job.yaml": yaml.dump(document, Dumper=YamlDumper, sort_keys=True)},
    }


def opaque_secret(
    target: Target, name: str, labels: dict[str, str], data: Mapping[str, str]
) -> dict[str, Any]:
    """An Opaque Secret of the job's credentials (values base64-encoded here)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": object_metadata(target, name, labels),
        "data": {key: b64(value) for key, value in data.items()},
    }


def tls_files(target: Target, who: str) -> dict[str, str]:
    """``who``'s ca.crt, tls.crt and tls.key under spec.transport.tls (else nothing).

    ``who`` is ``global``, ``region/<r>`` or ``tenant/<t>`` (see
    :func:`fedkube.operator.reconcile.read_tls`, which mints or reuses them).
    """
    if not target.tls or target.tls_ca is None:
        return {}
    leaf = target.tls_leaves[who]
    return {
        name: data.decode()
        for name, data in certificates.files(target.tls_ca.cert_pem, leaf).items()
    }


def build_tls_ca_secret(target: Target) -> dict[str, Any]:
    """The job's CA (spec.transport.tls): its certificate and key, which no pod mounts.

    The operator reads it back on every pass to check and issue the job's
    certificates; deleting it mints a new CA, and with it new certificates
    for every service and tenant.
    """
    assert target.tls_ca is not None  # build_children builds it only under TLS
    return opaque_secret(
        target,
        naming.tls_ca_name(target.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS),
        {CA_FILE: target.tls_ca.cert_pem.decode(), CA_KEY_KEY: target.tls_ca.key_pem.decode()},
    )


def build_aggregator_secret(target: Target) -> dict[str, Any]:
    """What checks each region's combiner: its token's digest and its public key.

    The global aggregator holds no combiner's token or private key, so it can
    pose as none of them; each region's credential is in its combiner's Secret.
    """
    regions = target.job.region_names()
    checks = credential_checks(
        regions,
        target.region_tokens,
        target.region_signing_keys,
        lambda region: f"Secret {naming.combiner_name(target.name, region)} key {SIGNING_KEY_KEY}",
    )
    return opaque_secret(
        target,
        naming.aggregator_name(target.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS),
        {
            "tokens.json": json.dumps(checks.token_digests, sort_keys=True),
            "keys.json": json.dumps(checks.public_keys, sort_keys=True),
            **tls_files(target, "global"),
        },
    )


def build_tenant_secret(target: Target, tenant: Tenant) -> dict[str, Any]:
    """The tenant's worker token and signing key (copy it to the tenant's site in site mode)."""
    return opaque_secret(
        target,
        naming.tenant_name(target.name, tenant.name),
        naming.labels(
            target.name, naming.ROLE_CREDENTIALS, tenant=tenant.name, region=tenant.region
        ),
        {
            TOKEN_KEY: target.tenant_tokens[tenant.name],
            SIGNING_KEY_KEY: target.tenant_signing_keys[tenant.name],
            **tls_files(target, f"tenant/{tenant.name}"),
        },
    )


def build_combiner_secret(target: Target, region: str) -> dict[str, Any]:
    """The region's own credential to the global tier (its token and the key that signs
    its partials), and what checks the region's tenants: their tokens' digests and their
    public keys.

    A combiner never holds a tenant's token or private key, so it can neither
    pose as a tenant nor sign an update for one.
    """
    checks = credential_checks(
        [t.name for t in target.job.spec.tenants if t.region == region],
        target.tenant_tokens,
        target.tenant_signing_keys,
        lambda name: f"Secret {naming.tenant_name(target.name, name)} key {SIGNING_KEY_KEY}",
    )
    return opaque_secret(
        target,
        naming.combiner_name(target.name, region),
        naming.labels(target.name, naming.ROLE_CREDENTIALS, region=region),
        {
            TOKEN_KEY: target.region_tokens[region],
            SIGNING_KEY_KEY: target.region_signing_keys[region],
            "tokens.json": json.dumps(checks.token_digests, sort_keys=True),
            "keys.json": json.dumps(checks.public_keys, sort_keys=True),
            **tls_files(target, f"region/{region}"),
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
    return opaque_secret(
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
        "metadata": object_metadata(
            target,
            naming.tenant_name(target.name, tenant.name),
            naming.labels(target.name, naming.ROLE_WORKER, tenant=tenant.name),
        ),
        "automountServiceAccountToken": False,
    }


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
    return opaque_secret(
        target,
        naming.redis_secret_name(target.name),
        naming.labels(target.name, naming.ROLE_CREDENTIALS),
        {REDIS_PASSWORD_KEY: target.config.redis_password or ""},
    )
