"""Planning a reconcile pass: only what differs is written."""

from __future__ import annotations

import base64
import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fedkube.operator import naming
from fedkube.operator.builders import RunMode, build_children
from fedkube.operator.reconcile import (
    FINISH_GRACE_S,
    NotReady,
    container_restarts,
    plan_changes,
    read_signing_keys,
    read_tls,
    read_tokens,
    run_mode,
    unschedulable_tenants,
)
from fedkube.spec import parse_job
from fedkube.wire import signing
from tests.unit.test_builders import UID, target, three_tenants


def as_existing(children: list[dict[str, Any]], phase: str = "Running") -> list[dict[str, Any]]:
    """What the API server would list back: the same objects plus server fields."""
    existing = copy.deepcopy(children)
    for obj in existing:
        obj["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
        obj["metadata"]["resourceVersion"] = "7"
        if obj["kind"] == "Pod":
            obj["status"] = {"phase": phase}
    return existing


def names(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def test_an_unchanged_job_plans_no_write():
    desired = build_children(target())
    plan = plan_changes(desired, as_existing(desired), UID, RunMode.active)
    assert plan.empty


def test_a_fresh_job_applies_every_child():
    desired = build_children(target())
    plan = plan_changes(desired, [], UID, RunMode.active)
    assert names(plan.apply) == names(desired)
    assert plan.delete == []


def test_a_changed_deployment_is_applied_but_a_changed_pod_is_replaced():
    existing = as_existing(build_children(target()))
    document = three_tenants()
    document["spec"]["tenants"][2]["resources"]["gpu"] = 2
    document["spec"]["image"] = "fedkube:0.2.0"
    plan = plan_changes(build_children(target(document)), existing, UID, RunMode.active)
    applied = names(plan.apply)
    assert ("Deployment", "mnist-aggregator") in applied
    assert not any(kind == "Pod" for kind, _ in applied)
    assert ("Pod", "mnist-c-0") in names(plan.delete)


def test_a_removed_tenant_is_pruned_and_an_added_one_created():
    existing = as_existing(build_children(target()))
    document = three_tenants()
    document["spec"]["tenants"] = [
        document["spec"]["tenants"][0],
        {"name": "d", "region": "us"},
        document["spec"]["tenants"][2],
    ]
    plan = plan_changes(build_children(target(document)), existing, UID, RunMode.active)
    deleted = names(plan.delete)
    assert {("Pod", "mnist-b-0"), ("Pod", "mnist-b-1"), ("Secret", "mnist-tenant-b")} <= deleted
    assert {("ServiceAccount", "mnist-tenant-b"), ("NetworkPolicy", "mnist-tenant-b")} <= deleted
    assert {("Pod", "mnist-d-0"), ("Secret", "mnist-tenant-d")} <= names(plan.apply)


def test_a_failed_worker_pod_is_replaced_and_counted():
    desired = build_children(target())
    existing = as_existing(desired)
    next(o for o in existing if o["metadata"]["name"] == "mnist-a-0")["status"] = {
        "phase": "Failed"
    }
    plan = plan_changes(desired, existing, UID, RunMode.active)
    assert plan.failed_pods == ["mnist-a-0"]
    assert names(plan.delete) == {("Pod", "mnist-a-0")}


def test_a_finished_job_keeps_completed_pods_and_deletes_running_ones():
    running = build_children(target())
    existing = as_existing(running, phase="Succeeded")
    next(o for o in existing if o["metadata"]["name"] == "mnist-c-0")["status"] = {
        "phase": "Running"
    }
    plan = plan_changes(
        build_children(target(mode=RunMode.finished)), existing, UID, RunMode.finished
    )
    assert {n for k, n in names(plan.delete) if k == "Pod"} == {"mnist-c-0"}


def test_objects_of_another_owner_are_never_touched():
    desired = build_children(target())
    stranger = as_existing(desired)
    for obj in stranger:
        obj["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    plan = plan_changes([], stranger, UID, RunMode.active)
    assert plan.empty


def test_objects_being_deleted_are_waited_for():
    desired = build_children(target())
    existing = as_existing(desired)
    for obj in existing:
        obj["metadata"]["deletionTimestamp"] = "2026-11-23T10:00:00Z"
        obj["metadata"]["annotations"][naming.ANNOTATION_HASH] = "outdated"
    plan = plan_changes(desired, existing, UID, RunMode.active)
    assert plan.empty


def test_issued_tokens_are_read_back_and_only_missing_ones_minted():
    job = parse_job(three_tenants())
    existing = [
        tenant_secret("mnist-tenant-a", {"token": "issued-before"}),
        tenant_secret("mnist-combiner-eu", {"token": "eu-issued-before"}),
    ]
    regions, tenants = read_tokens(existing, UID, job)
    assert tenants["a"] == "issued-before" and regions["eu"] == "eu-issued-before"
    assert len(tenants["b"]) >= 32 and tenants["b"] != tenants["c"]
    assert len(regions["us"]) >= 32 and regions["us"] not in tenants.values()


def tenant_secret(name: str, data: dict[str, str], uid: str = UID) -> dict[str, Any]:
    return {
        "kind": "Secret",
        "metadata": {"name": name, "ownerReferences": [{"uid": uid}]},
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }


def test_signing_keys_are_read_back_and_only_missing_ones_minted():
    # prepare: a's Secret has a key; b's predates signing (a token only); c's is a stranger's
    job = parse_job(three_tenants())
    issued, _public = signing.generate_key()
    existing = [
        tenant_secret("mnist-tenant-a", {"token": "t", "signing-key": issued}),
        tenant_secret("mnist-tenant-b", {"token": "t"}),
        tenant_secret("mnist-tenant-c", {"token": "t", "signing-key": issued}, uid="another"),
    ]
    existing.append(tenant_secret("mnist-combiner-eu", {"token": "t", "signing-key": issued}))
    # execute
    regions, keys = read_signing_keys(existing, UID, job)
    regions_again, again = read_signing_keys(existing, UID, job)
    # assert: a's and eu's are kept on every pass; b, c and us get new ones, each its own
    assert keys["a"] == again["a"] == issued and regions["eu"] == regions_again["eu"] == issued
    assert len({keys["a"], keys["b"], keys["c"], regions["us"]}) == 4
    for name in ("b", "c"):
        signing.load_signing_key(keys[name], name)
    signing.load_signing_key(regions["us"], "us")


def test_a_hand_edited_signing_key_stops_the_pass_naming_the_secret():
    job = parse_job(three_tenants())
    existing = [tenant_secret("mnist-tenant-b", {"token": "t", "signing-key": "edited"})]
    with pytest.raises(NotReady) as caught:
        read_signing_keys(existing, UID, job)
    message = str(caught.value)
    assert "Secret mnist-tenant-b key signing-key: the private key is not base64" in message
    assert "delete that key (or the Secret) to mint a new one" in message


def test_unschedulable_pods_name_their_tenant_and_restarts_add_up():
    pods = [
        {
            "metadata": {"labels": {naming.LABEL_TENANT: "c"}},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                    }
                ]
            },
        },
        {
            "metadata": {"labels": {naming.LABEL_TENANT: "a"}},
            "status": {"containerStatuses": [{"restartCount": 2}]},
        },
    ]
    assert unschedulable_tenants(pods) == {
        "c": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    }
    assert container_restarts(pods) == 2


def test_while_finishing_workers_are_left_to_exit_and_only_combiners_keep_running():
    running = build_children(target())
    existing = as_existing(running)
    finishing = build_children(target(mode=RunMode.finishing))
    plan = plan_changes(finishing, existing, UID, RunMode.finishing)
    assert not [obj for obj in plan.delete if obj["kind"] == "Pod"]
    replicas = {
        obj["metadata"]["name"]: obj["spec"]["replicas"]
        for obj in finishing
        if obj["kind"] == "Deployment"
    }
    assert replicas == {"mnist-aggregator": 0, "mnist-combiner-eu": 1, "mnist-combiner-us": 1}


def test_the_run_mode_follows_suspend_the_phase_and_the_workers_left():
    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
    ended = {"phase": "Succeeded", "completionTime": "2026-11-23T11:59:50Z"}
    running_pod = [{"status": {"phase": "Running"}}]
    done_pod = [{"status": {"phase": "Succeeded"}}]
    assert run_mode({"spec": {}}, running_pod, now) is RunMode.active
    assert run_mode({"spec": {"suspend": True}}, running_pod, now) is RunMode.suspended
    assert run_mode({"spec": {}, "status": ended}, running_pod, now) is RunMode.finishing
    assert run_mode({"spec": {}, "status": ended}, done_pod, now) is RunMode.finished
    later = now + timedelta(seconds=FINISH_GRACE_S)
    assert run_mode({"spec": {}, "status": ended}, running_pod, later) is RunMode.finished


def test_tls_certificates_are_minted_once_read_back_and_reissued_when_their_names_change():
    # prepare: a first pass under TLS, then what the cluster lists back
    document = three_tenants()
    document["spec"]["transport"] = {"tls": {"mode": "server"}}
    job = parse_job(document)
    ca, leaves = read_tls([], UID, job, "team-a")
    existing = as_existing(
        build_children(target(document, tls_ca=ca, tls_leaves=leaves, mode=RunMode.active))
    )
    # execute: the next pass, and one after the tier gets another name
    ca_again, again = read_tls(existing, UID, job, "team-a")
    document["spec"]["transport"]["tls"]["serverNames"] = ["fl.example.org"]
    renamed_ca, renamed = read_tls(existing, UID, parse_job(document), "team-a")
    # assert: nothing re-minted; a new name reissues the tier's certificates only
    assert ca_again == ca and again == leaves
    assert renamed_ca == ca
    assert renamed["global"] != leaves["global"] and renamed["region/eu"] != leaves["region/eu"]
    assert renamed["tenant/a"] == leaves["tenant/a"]


def test_a_hand_edited_ca_stops_the_pass_naming_its_secret():
    document = three_tenants()
    document["spec"]["transport"] = {"tls": {"mode": "mutual"}}
    existing = [tenant_secret("mnist-tls-ca", {"ca.crt": "edited", "ca.key": "edited"})]
    with pytest.raises(NotReady, match="Secret mnist-tls-ca: the CA does not load"):
        read_tls(existing, UID, parse_job(document), "team-a")
