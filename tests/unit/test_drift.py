"""Drift: a child edited by hand is applied again; what the API server adds is not drift."""

from __future__ import annotations

import copy
from typing import Any

from fedkube.operator.builders import RunMode, build_children
from fedkube.operator.drift import drift
from fedkube.operator.reconcile import plan_changes
from tests.unit.test_builders import UID, target
from tests.unit.test_reconcile_plan import as_existing


def child(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(c for c in children if c["kind"] == kind and c["metadata"]["name"] == name)


def with_server_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns for a Deployment it stored: defaults and canonical forms."""
    live = copy.deepcopy(obj)
    live["metadata"]["managedFields"] = [{"manager": "fedkube-operator"}]
    live["metadata"]["ownerReferences"].append({"uid": "another-owner", "kind": "Thing"})
    spec = live["spec"]
    spec["revisionHistoryLimit"] = 10
    spec["progressDeadlineSeconds"] = 600
    pod = spec["template"]["spec"]
    pod["dnsPolicy"] = "ClusterFirst"
    pod.pop("nodeSelector", None)  # an empty map is dropped
    for container in pod["containers"]:
        container["terminationMessagePath"] = "/dev/termination-log"
        container.setdefault("env", []).append({"name": "INJECTED", "value": "by a webhook"})
        for port in container.get("ports", []):
            port["protocol"] = "TCP"
        limits = container.get("resources", {}).get("limits", {})
        if limits.get("memory") == "2Gi":
            limits["memory"] = "2048Mi"
    live["status"] = {"replicas": 1}
    return live


def test_what_the_api_server_and_other_controllers_add_is_not_drift():
    # prepare
    desired = child(build_children(target()), "Deployment", "mnist-aggregator")
    live = with_server_defaults(desired)
    # execute
    found = drift(desired, live)
    # assert
    assert found == []


def test_a_scaled_deployment_drifts_at_its_replicas():
    # prepare
    desired = child(build_children(target()), "Deployment", "mnist-aggregator")
    live = with_server_defaults(desired)
    live["spec"]["replicas"] = 0
    # execute
    found = drift(desired, live)
    # assert
    assert found == ["spec.replicas"]


def test_a_changed_argument_or_a_removed_label_is_drift():
    # prepare
    desired = child(build_children(target()), "Deployment", "mnist-aggregator")
    live = with_server_defaults(desired)
    live["spec"]["template"]["spec"]["containers"][0]["args"][-1] += "-edited"
    label = next(iter(desired["metadata"]["labels"]))
    del live["metadata"]["labels"][label]
    # execute
    found = drift(desired, live)
    # assert
    assert f"metadata.labels.{label}" in found
    assert "spec.template.spec.containers[0]" in found


def test_a_loosened_network_policy_drifts():
    # prepare
    desired = child(build_children(target()), "NetworkPolicy", "mnist-tenant-a")
    live = copy.deepcopy(desired)
    live["spec"]["egress"] = []
    # execute
    found = drift(desired, live)
    # assert
    assert found and all(path.startswith("spec.egress") for path in found)


def test_quantities_match_in_any_spelling_and_other_text_does_not():
    # prepare
    desired = {"spec": {"cpu": "0.5", "memory": "1Gi", "gpu": 1, "image": "fedkube:0.1"}}
    same = {"spec": {"cpu": "500m", "memory": "1024Mi", "gpu": "1", "image": "fedkube:0.1"}}
    other = {"spec": {"cpu": "500m", "memory": "1Gi", "gpu": 2, "image": "fedkube:0.2"}}
    # execute
    found_same, found_other = drift(desired, same), drift(desired, other)
    # assert
    assert found_same == []
    assert found_other == ["spec.gpu", "spec.image"]


def test_a_plan_reapplies_only_the_edited_child_and_says_where():
    # prepare
    desired = build_children(target())
    existing = as_existing(desired)
    child(existing, "Deployment", "mnist-combiner-eu")["spec"]["replicas"] = 3
    child(existing, "ConfigMap", "mnist-config")["data"]["job.yaml"] = "edited: true\n"
    child(existing, "Pod", "mnist-a-0")["spec"]["priorityClassName"] = "edited"
    # execute
    plan = plan_changes(desired, existing, UID, RunMode.active)
    # assert
    assert plan.drifted == {
        ("Deployment", "mnist-combiner-eu"): ["spec.replicas"],
        ("ConfigMap", "mnist-config"): ["data.job.yaml"],
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in plan.apply} == set(plan.drifted)
    assert plan.delete == []
