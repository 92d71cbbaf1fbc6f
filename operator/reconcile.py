"""Converge a job's children on what the builders say, with as few writes as possible.

:func:`plan_changes` is pure: desired objects and the existing ones in, the
writes out. An object is written only when it is missing or its
``fedkube.io/spec-hash`` differs, or when someone edited a field that the
operator sets (:mod:`fedkube.operator.drift`), so reconciling an unchanged job
lists each kind once and writes nothing. Pods cannot be updated in place: a pod whose
hash changed is deleted and created again on a later pass; a worker pod that
failed for good is replaced and counted against ``spec.backoffLimit``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fedkube.errors import FedkubeError, SigningKeyError
from fedkube.operator import naming
from fedkube.operator.builders import (
    CA_KEY_KEY,
    SIGNING_KEY_KEY,
    TOKEN_KEY,
    RunMode,
    Target,
    build_children,
    service_hosts,
)
from fedkube.operator.config import OperatorConfig
from fedkube.operator.drift import drift
from fedkube.operator.kube import CHILD_KINDS, Kube
from fedkube.operator.status import parse_time
from fedkube.policy import Refusal, check
from fedkube.service import certificates
from fedkube.service.certificates import CA_FILE, CERT_FILE, KEY_FILE, Issued
from fedkube.spec import FederatedJob, TlsMode
from fedkube.wire import signing

Key = tuple[str, str]  # (kind, name)
# Concurrent writes in one pass: a 100-tenant job has ~400 children, and one
# request at a time spends most of the pass waiting on round trips.
WRITERS = 8
FINISH_GRACE_S = 60.0
ENDED = ("Succeeded", "Failed")


class NotReady(FedkubeError):
    """Something the job needs is not there yet (retry later, do not fail the job)."""


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    failed_pods: list[str] = field(default_factory=list)  # deleted, count against backoffLimit
    drifted: dict[Key, list[str]] = field(default_factory=dict)  # edited by hand: re-applied

    @property
    def empty(self) -> bool:
        return not (self.apply or self.delete)


@dataclass(frozen=True)
class Outcome:
    """What one pass did and saw, for status, events and metrics."""

    applied: list[Key]
    deleted: list[Key]
    new_failures: int
    unschedulable: dict[str, str]
    restarts: int
    children: int
    drifted: dict[Key, list[str]] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)  # this site's policy (site mode)


def _key(obj: Mapping[str, Any]) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def _hash(obj: Mapping[str, Any]) -> str | None:
    annotations: Mapping[str, str] = obj["metadata"].get("annotations") or {}
    return annotations.get(naming.ANNOTATION_HASH)


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _phase(obj: Mapping[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase", ""))


def plan_changes(
    desired: Iterable[dict[str, Any]],
    existing: Iterable[dict[str, Any]],
    uid: str,
    mode: RunMode,
) -> Plan:
    """The writes that turn ``existing`` (all kinds, one job's label) into ``desired``.

    Only objects owned by the job (by uid) are touched: a Secret a user made
    for a site, or a namesake of a deleted job's child, is left alone.
    """
    have = {_key(obj): obj for obj in existing if owned_by(obj, uid)}
    plan = Plan()
    wanted: set[Key] = set()
    for obj in desired:
        key = _key(obj)
        wanted.add(key)
        current = have.get(key)
        if current is None:
            plan.apply.append(obj)
        elif current["metadata"].get("deletionTimestamp"):
            continue  # going away; created again on a later pass
        elif key[0] == "Pod" and _phase(current) == "Failed":
            plan.delete.append(current)
            plan.failed_pods.append(key[1])
        elif _hash(current) != _hash(obj):
            (plan.delete if key[0] == "Pod" else plan.apply).append(
                current if key[0] == "Pod" else obj
            )
        elif key[0] != "Pod" and (paths := drift(obj, current)):
            # Pods are left out: most of a pod's spec cannot change, and a
            # pod's own controller (here the operator) replaces it on a new hash.
            plan.apply.append(obj)
            plan.drifted[key] = paths
    for key, current in have.items():
        if key in wanted or current["metadata"].get("deletionTimestamp"):
            continue
        if key[0] == "Pod" and mode is RunMode.finishing:
            continue  # the last workers are told by their combiner that the job is over
        if key[0] == "Pod" and mode is RunMode.finished and _phase(current) in ENDED:
            continue  # keep completed workers (and their logs) after the job
        plan.delete.append(current)
    return plan


def run_mode(body: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], now: datetime) -> RunMode:
    """What the pods should do, from the job's status and its worker pods.

    After the job ends, workers get :data:`FINISH_GRACE_S` to hear it from
    their combiner and exit 0; those still running then are deleted.
    """
    status = body.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        ended = status.get("completionTime")
        still_running = any(_phase(pod) not in ENDED for pod in pods)
        if still_running and ended and (now - parse_time(ended)).total_seconds() < FINISH_GRACE_S:
            return RunMode.finishing
        return RunMode.finished
    if (body.get("spec") or {}).get("suspend"):
        return RunMode.suspended
    return RunMode.active


def unschedulable_tenants(pods: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Tenant -> the scheduler's message, for worker pods that cannot be placed."""
    found: dict[str, str] = {}
    for pod in pods:
        tenant = (pod["metadata"].get("labels") or {}).get(naming.LABEL_TENANT)
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                tenant
                and condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                found.setdefault(tenant, condition.get("message", "cannot be scheduled"))
    return found


def container_restarts(pods: Iterable[Mapping[str, Any]]) -> int:
    return sum(
        int(status.get("restartCount", 0))
        for pod in pods
        for status in (pod.get("status") or {}).get("containerStatuses") or []
    )


def _owned_secrets(secrets_seen: Iterable[Mapping[str, Any]], uid: str) -> dict[str, Any]:
    return {
        s["metadata"]["name"]: s
        for s in secrets_seen
        if s.get("kind") == "Secret" and owned_by(s, uid)
    }


def _secret_value(secret: Mapping[str, Any] | None, key: str) -> str | None:
    data = (secret or {}).get("data") or {}
    return base64.b64decode(data[key]).decode() if key in data else None


def read_tokens(
    secrets_seen: Iterable[Mapping[str, Any]], uid: str, job: FederatedJob
) -> tuple[dict[str, str], dict[str, str]]:
    """Reuse the credentials already issued; mint the missing ones: per region, per tenant.

    Tokens are minted once and then read back from their Secrets: minting
    again would lock out the workers (or the combiner) that hold the old one.
    """
    by_name = _owned_secrets(secrets_seen, uid)

    def token(name: str) -> str:
        return _secret_value(by_name.get(name), TOKEN_KEY) or secrets.token_urlsafe(32)

    return {r: token(naming.combiner_name(job.name, r)) for r in job.region_names()}, {
        t.name: token(naming.tenant_name(job.name, t.name)) for t in job.spec.tenants
    }


def read_signing_keys(
    secrets_seen: Iterable[Mapping[str, Any]], uid: str, job: FederatedJob
) -> tuple[dict[str, str], dict[str, str]]:
    """Each region's and each tenant's private signing key: read back, or minted once.

    As with tokens, a pass never rotates a key: a new one would make the
    combiner refuse every update the tenant's running workers sign (or the
    global tier every partial the running combiner signs). A key that is
    there but not a key (a hand edit) stops the pass, naming the Secret,
    rather than being replaced silently.
    """
    by_name = _owned_secrets(secrets_seen, uid)

    def key(name: str) -> str:
        text = _secret_value(by_name.get(name), SIGNING_KEY_KEY)
        if text is None:
            return signing.generate_key()[0]
        try:
            signing.load_signing_key(text, f"Secret {name} key {SIGNING_KEY_KEY}")
        except SigningKeyError as exc:
            raise NotReady(f"{exc}; delete that key (or the Secret) to mint a new one") from None
        return text

    return {r: key(naming.combiner_name(job.name, r)) for r in job.region_names()}, {
        t.name: key(naming.tenant_name(job.name, t.name)) for t in job.spec.tenants
    }


def read_tls(
    secrets_seen: Iterable[Mapping[str, Any]], uid: str, job: FederatedJob, namespace: str
) -> tuple[Issued | None, dict[str, Issued]]:
    """Under spec.transport.tls, the job's CA and every identity's certificate.

    Read back from the Secrets while still good (issued by the CA, for the
    names wanted now, more than 30 days from expiry), else minted: a pass
    renews a certificate a month ahead, and a changed ``serverNames`` reissues
    the tier's. The CA is minted once per job (``<job>-tls-ca``); one that no
    longer loads (a hand edit) stops the pass, naming the Secret.
    """
    if job.spec.transport.tls.mode is TlsMode.disabled:
        return None, {}
    by_name = _owned_secrets(secrets_seen, uid)
    ca_name = naming.tls_ca_name(job.name)
    held = by_name.get(ca_name)
    ca_pem, ca_key = _secret_value(held, CA_FILE), _secret_value(held, CA_KEY_KEY)
    if ca_pem and ca_key:
        ca = Issued(ca_pem.encode(), ca_key.encode())
        try:
            ca.certificate()
            ca.private_key()
        except ValueError as exc:
            raise NotReady(
                f"Secret {ca_name}: the CA does not load ({exc}); delete the Secret to mint "
                "a new CA (and new certificates for every service and tenant)"
            ) from None
    else:
        ca = certificates.mint_ca(job.name)
    extra = job.spec.transport.tls.server_names
    secret_of = {"global": naming.aggregator_name(job.name)}
    secret_of |= {f"region/{r}": naming.combiner_name(job.name, r) for r in job.region_names()}
    secret_of |= {
        f"tenant/{t.name}": naming.tenant_name(job.name, t.name) for t in job.spec.tenants
    }
    wanted = {
        who: (
            secret_of[who],
            uri,
            service_hosts(namespace, secret_of[who], extra) if serves else [],
        )
        for who, (uri, serves) in certificates.identities(job).items()
    }
    leaves: dict[str, Issued] = {}
    for who, (secret_name, uri, hosts) in wanted.items():
        secret = by_name.get(secret_name)
        cert, key = _secret_value(secret, CERT_FILE), _secret_value(secret, KEY_FILE)
        if cert and key and certificates.still_good(ca, cert.encode(), uri, hosts):
            leaves[who] = Issued(cert.encode(), key.encode())
        else:
            leaves[who] = certificates.mint_leaf(ca, uri, hosts)
    return ca, leaves


def _check_copied_secret(kube: Kube, namespace: str, job: FederatedJob, tenant: str) -> None:
    """Site mode: wait until the tenant's Secret, copied from the central cluster, is complete.

    Its workers read the token and the signing key from it (and, under
    spec.transport.tls, the tenant's certificate); a pod whose Secret lacks a
    key would not even start.
    """
    name = naming.tenant_name(job.name, tenant)
    secret = kube.get("Secret", namespace, name)
    data = (secret or {}).get("data") or {}
    wanted = [TOKEN_KEY, SIGNING_KEY_KEY]
    if job.spec.transport.tls.mode is not TlsMode.disabled:
        wanted += [CA_FILE, CERT_FILE, KEY_FILE]
    missing = [key for key in wanted if key not in data]
    if missing:
        raise NotReady(
            f"waiting for Secret {name!r} with the credentials of tenant {tenant!r} "
            f"(copy it from the central cluster; missing: {', '.join(missing)})"
        )


def reconcile(
    kube: Kube, job: FederatedJob, body: Mapping[str, Any], config: OperatorConfig
) -> Outcome:
    """One pass: list the children, build the desired ones, write the difference."""
    namespace = body["metadata"]["namespace"]
    uid = body["metadata"]["uid"]
    selector = f"{naming.LABEL_JOB}={job.name}"
    existing = [obj for kind in CHILD_KINDS for obj in kube.list(kind, namespace, selector)]
    # The job owns only its worker pods (the tier's pods belong to ReplicaSets).
    workers = [obj for obj in existing if obj["kind"] == "Pod" and owned_by(obj, uid)]
    mode = run_mode(body, workers, datetime.now(timezone.utc))
    # A site checks the job against its own policy before building anything
    # for its tenants: a refused tenant gets no pod, no binding, no identity.
    refusals = check(job, config.policy, config.site, config.image) if config.site else []
    refused = frozenset(r.tenant for r in refusals)
    if config.site is not None:
        for tenant in job.spec.tenants:
            if tenant.site == config.site and tenant.name not in refused:
                _check_copied_secret(kube, namespace, job, tenant.name)
    region_tokens, tenant_tokens = read_tokens(existing, uid, job)
    region_keys, tenant_keys = read_signing_keys(existing, uid, job)
    tls_ca, tls_leaves = (
        read_tls(existing, uid, job, namespace) if config.site is None else (None, {})
    )
    target = Target(
        job=job,
        namespace=namespace,
        uid=uid,
        config=config,
        mode=mode,
        region_tokens=region_tokens,
        region_signing_keys=region_keys,
        tenant_tokens=tenant_tokens,
        tenant_signing_keys=tenant_keys,
        refused=refused,
        tls_ca=tls_ca,
        tls_leaves=tls_leaves,
    )
    try:
        desired = build_children(target)
    except ValueError as exc:
        raise NotReady(str(exc)) from None
    plan = plan_changes(desired, existing, uid, mode)
    # Pods last: what they mount and the Secrets they read exist before them.
    first = [obj for obj in plan.apply if obj["kind"] != "Pod"]
    pods = [obj for obj in plan.apply if obj["kind"] == "Pod"]
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        list(pool.map(kube.apply, first))
        list(pool.map(kube.apply, pods))
        list(
            pool.map(
                lambda obj: kube.delete(
                    obj["kind"], namespace, obj["metadata"]["name"], obj["metadata"].get("uid")
                ),
                plan.delete,
            )
        )
    current_pods = [pod for pod in workers if _key(pod)[1] not in plan.failed_pods]
    return Outcome(
        applied=[_key(obj) for obj in plan.apply],
        deleted=[_key(obj) for obj in plan.delete],
        new_failures=len(plan.failed_pods),
        unschedulable=unschedulable_tenants(current_pods),
        restarts=container_restarts(current_pods),
        children=len(desired),
        drifted=plan.drifted,
        refusals=refusals,
    )
