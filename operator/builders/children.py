"""Every child of a job, in the order they are applied."""

from __future__ import annotations

from typing import Any

from fedkube.operator import naming
from fedkube.operator.builders.common import REDIS_PASSWORD_KEY, RunMode, Target, with_hash
from fedkube.operator.builders.configuration import (
    build_aggregator_secret,
    build_combiner_secret,
    build_config_map,
    build_data_binding_secret,
    build_redis_secret,
    build_service_account,
    build_tenant_secret,
    build_tls_ca_secret,
    redis_password_ref,
)
from fedkube.operator.builders.tier import (
    build_aggregator_deployment,
    build_aggregator_service,
    build_combiner_deployment,
    build_combiner_service,
)
from fedkube.operator.builders.workers import build_network_policy, build_worker_pod


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
        if target.tls:
            children.append(build_tls_ca_secret(target))
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
