"""FederatedJobs for the cluster tests, and reading what became of them with kubectl."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.controlplane import ControlPlane
from tests.support import small_job_dict

CHILD_KINDS = "configmaps,secrets,serviceaccounts,services,deployments,networkpolicies,pods"


def job_document(name: str = "mnist", gpus: dict[str, int] | None = None) -> dict[str, Any]:
    """3 tenants in 2 regions, 1 GPU per worker unless ``gpus`` says otherwise."""
    gpus = gpus or {}
    document = small_job_dict(
        tenants=[
            {"name": "a", "region": "eu", "resources": {"gpu": gpus.get("a", 1)}},
            {"name": "b", "region": "eu", "resources": {"gpu": gpus.get("b", 1)}},
            {"name": "c", "region": "us", "resources": {"gpu": gpus.get("c", 1)}},
        ]
    )
    document["metadata"]["name"] = name
    return document


def apply(cp: ControlPlane, namespace: str, document: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document))


def get_json(cp: ControlPlane, namespace: str, *args: str) -> Any:
    return json.loads(cp.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)


def children(cp: ControlPlane, namespace: str, job: str) -> list[dict[str, Any]]:
    return get_json(cp, namespace, CHILD_KINDS, "-l", f"fedkube.io/job={job}")["items"]


def names(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(item["kind"], item["metadata"]["name"]) for item in items}


def expected_children(job: str) -> set[tuple[str, str]]:
    tenants, regions = ("a", "b", "c"), ("eu", "us")
    found = {("ConfigMap", f"{job}-config"), ("Secret", f"{job}-aggregator")}
    for t in tenants:
        found |= {
            ("Secret", f"{job}-tenant-{t}"),
            ("ServiceAccount", f"{job}-tenant-{t}"),
            ("NetworkPolicy", f"{job}-tenant-{t}"),
            ("Pod", f"{job}-{t}-0"),
        }
    for r in regions:
        found |= {
            ("Secret", f"{job}-combiner-{r}"),
            ("Service", f"{job}-combiner-{r}"),
            ("Deployment", f"{job}-combiner-{r}"),
        }
    return found | {("Service", f"{job}-aggregator"), ("Deployment", f"{job}-aggregator")}


def owned_children(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Children without the pods that Deployments own (ReplicaSets name those)."""
    return {
        (item["kind"], item["metadata"]["name"])
        for item in items
        if not any(
            ref["kind"] == "ReplicaSet" for ref in item["metadata"].get("ownerReferences", [])
        )
    }


def status(cp: ControlPlane, namespace: str, job: str) -> dict[str, Any]:
    return get_json(cp, namespace, "federatedjob", job).get("status") or {}


def condition(cp: ControlPlane, namespace: str, job: str, kind: str) -> dict[str, Any] | None:
    for entry in status(cp, namespace, job).get("conditions", []):
        if entry["type"] == kind:
            return entry
    return None
