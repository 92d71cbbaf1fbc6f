"""Site policy: one rule at a time, the refusals it names, and what the operator builds."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from fedkube.errors import ConfigError, PolicyError
from fedkube.operator import naming
from fedkube.operator.builders import Target, build_children
from fedkube.operator.config import DEFAULT_IMAGE, OperatorConfig
from fedkube.operator.status import (
    JobStatus,
    Observation,
    PodFacts,
    RoundFacts,
    next_status,
    refused_status,
)
from fedkube.policy import (
    DEFAULT_ENTRYPOINTS,
    DataBinding,
    SitePolicy,
    check,
    check_central,
    entrypoint_allowed,
    image_allowed,
    load_policy,
    parse_policy,
    refused_tenants,
)
from fedkube.spec import parse_job
from tests.support import fedkube_cli, small_job_dict

SITE = "hospital-c"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def site_job(**spec: Any) -> Any:
    """The small job with tenant c at SITE (and the spec keys replaced)."""
    document = small_job_dict(**spec)
    document["spec"]["tenants"][2]["site"] = SITE
    return document


def refusals_of(document: dict[str, Any], policy: dict[str, Any], image: str = DEFAULT_IMAGE):
    return check(parse_job(document), parse_policy(policy), SITE, image)


# -- the defaults -----------------------------------------------------------------------------


def test_the_default_policy_accepts_the_installed_examples_and_nothing_else():
    assert refusals_of(site_job(), {}) == []
    document = site_job()
    document["spec"]["data"]["entrypoint"] = "os:system"
    (refusal,) = refusals_of(document, {})
    assert (refusal.tenant, refusal.field, refusal.rule) == (
        "c",
        "spec.data.entrypoint",
        "entrypoints",
    )
    assert refusal.message.startswith(
        f"spec.data.entrypoint 'os:system' is not allowed at site {SITE} (allowed: "
    )
    assert refusal.describe().startswith("tenant c: spec.data.entrypoint 'os:system'")


def test_only_the_sites_own_tenants_are_checked():
    document = site_job()
    document["spec"]["model"]["entrypoint"] = "evil.module:make"
    refused = refusals_of(document, {})
    assert [r.tenant for r in refused] == ["c"]  # a, b, d run elsewhere
    # Without a site (fedkube run, fedkube validate without --site): every tenant.
    everyone = check(parse_job(document), SitePolicy(), None, DEFAULT_IMAGE)
    assert sorted(r.tenant for r in everyone) == ["a", "b", "c", "d"]
    assert "at site local" in everyone[0].message


# -- entrypoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "allowed", "expected"),
    [
        ("fedkube.examples.digits:make_data", ["fedkube.examples."], True),
        ("fedkube.examples_evil:make", ["fedkube.examples."], False),
        ("fedkube.datasets:load_npz", ["fedkube.datasets:"], True),
        ("fedkube.datasetsx:load", ["fedkube.datasets:"], False),
        ("hospital.loaders:scans", ["hospital.loaders:scans"], True),
        ("hospital.loaders:scans2", ["hospital.loaders:scans"], False),
        ("os:system", list(DEFAULT_ENTRYPOINTS), False),
    ],
)
def test_entrypoints_match_exactly_or_by_module_prefix(reference, allowed, expected):
    assert entrypoint_allowed(reference, allowed) is expected


def test_a_sites_policy_can_admit_a_client_api_script_by_its_file():
    # prepare: a job whose workers run the site's script from a file in its image
    document = site_job()
    document["spec"]["task"] = {"script": "/opt/hospital/train.py"}
    admitting = {"entrypoints": ["fedkube.examples.", "/opt/hospital/train.py"]}
    # execute / assert: listed, it runs; not listed, it is refused naming the field
    assert refusals_of(document, admitting) == []
    refused = refusals_of(document, {})
    assert refused and refused[0].field == "spec.task.script", refused
    with pytest.raises(PolicyError, match="nor a script's .py file"):
        parse_policy({"entrypoints": ["rm -rf /"]})


def test_the_model_entrypoint_is_checked_at_the_site_too():
    document = site_job()
    document["spec"]["model"]["entrypoint"] = "evil:make_model"
    (refusal,) = refusals_of(document, {})
    assert refusal.field == "spec.model.entrypoint"
    assert refusals_of(document, {"entrypoints": ["fedkube.examples.", "evil:make_model"]}) == []


def test_a_site_can_list_its_own_modules():
    document = site_job()
    document["spec"]["data"]["entrypoint"] = "hospital.loaders:scans"
    assert refusals_of(document, {"entrypoints": ["fedkube.examples.", "hospital."]}) == []


# -- images -----------------------------------------------------------------------------------


def test_images_default_to_the_operators_own_and_match_exactly_or_by_prefix():
    document = site_job(image="registry.evil.example/miner:1")
    (refusal,) = refusals_of(document, {})
    assert (refusal.field, refusal.rule) == ("spec.image", "images")
    assert f"(allowed: {DEFAULT_IMAGE})" in refusal.message
    assert refusals_of(document, {"images": ["registry.evil.example/"]}) == []
    assert image_allowed("reg.example/fedkube:0.2", ["reg.example/fedkube:"])
    assert not image_allowed("reg.example/fedkube-evil:0.2", ["reg.example/fedkube:"])
    assert refusals_of(site_job(), {"images": ["other.example/"]})[0].rule == "images"


# -- resources --------------------------------------------------------------------------------


def test_max_gpus_counts_every_worker_of_the_tenant():
    document = site_job()
    document["spec"]["tenants"][2].update(replicas=2, resources={"gpu": 1})
    assert refusals_of(document, {"maxGpus": 2}) == []
    (refusal,) = refusals_of(document, {"maxGpus": 1})
    assert (refusal.field, refusal.rule) == ("spec.tenants[2].resources.gpu", "maxGpus")
    assert "asks 2 GPUs (1 x 2 workers)" in refusal.message


def test_max_memory_compares_quantities_and_requires_a_limit():
    document = site_job()
    document["spec"]["tenants"][2]["resources"] = {"memory": "1536Mi"}
    assert refusals_of(document, {"maxMemory": "1.5Gi"}) == []
    (refusal,) = refusals_of(document, {"maxMemory": "1G"})
    assert (refusal.field, refusal.rule) == ("spec.tenants[2].resources.memory", "maxMemory")
    (unset,) = refusals_of(site_job(), {"maxMemory": "1Gi"})
    assert "is not set" in unset.message


# -- participation ----------------------------------------------------------------------------


def test_a_site_that_does_not_participate_refuses_every_job():
    (refusal,) = refusals_of(site_job(), {"participate": False})
    assert (refusal.tenant, refusal.field, refusal.rule) == (
        "c",
        "spec.tenants[2].site",
        "participate",
    )


# -- data bindings ----------------------------------------------------------------------------


def test_a_sites_data_binding_replaces_the_central_entrypoint_which_is_then_not_checked():
    document = site_job()
    document["spec"]["data"]["entrypoint"] = "os:system"
    policy = {
        "dataBindings": {"c": {"entrypoint": "hospital.loaders:scans", "kwargs": {"path": "/x"}}}
    }
    assert refusals_of(document, policy) == []
    # kwargs alone do not replace the entrypoint: it is still checked.
    assert refusals_of(document, {"dataBindings": {"c": {"kwargs": {"path": "/x"}}}})


def test_the_worker_loads_the_sites_binding_over_the_manifests_kwargs(tmp_path: Path):
    import numpy as np

    from fedkube.training.learning import load_data

    path = tmp_path / "c.npz"
    np.savez(path, x=np.ones((5, 3)), y=np.arange(5) % 2)
    job = parse_job(site_job())
    client = next(c for c in job.clients() if c.tenant == "c")
    binding = DataBinding(entrypoint="fedkube.datasets:load_npz", kwargs={"path": str(path)})
    data = load_data(job, "train", client, binding)
    assert data.x.shape == (5, 3)


def test_the_site_operator_builds_the_binding_secret_and_mounts_it_only_for_its_tenant():
    job = parse_job(site_job())
    policy = parse_policy({"dataBindings": {"c": {"kwargs": {"path": "/data/c.npz"}}}})
    config = OperatorConfig(
        site=SITE, central_address="http://{job}-combiner-{region}.central:8080", policy=policy
    )
    children = build_children(Target(job=job, namespace="site", uid="u", config=config))
    secret = next(
        c for c in children if c["metadata"]["name"] == naming.data_binding_name("small", "c")
    )
    assert json.loads(base64.b64decode(secret["data"]["binding.json"])) == {
        "kwargs": {"path": "/data/c.npz"}
    }
    (pod,) = [c for c in children if c["kind"] == "Pod"]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--data-binding") + 1] == "/etc/fedkube/data-binding/binding.json"
    # The site's paths are not in the manifest that every component reads.
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    assert "/data/c.npz" not in json.dumps(config_map)


def test_a_refused_tenant_gets_no_pod_no_identity_and_no_binding():
    job = parse_job(site_job())
    config = OperatorConfig(site=SITE, central_address="http://{job}-combiner-{region}.c:8080")
    target = Target(job=job, namespace="site", uid="u", config=config, refused=frozenset({"c"}))
    assert [c["kind"] for c in build_children(target)] == ["ConfigMap"]


# -- the policy file --------------------------------------------------------------------------


def test_a_bad_policy_file_names_its_fields(tmp_path: Path):
    with pytest.raises(PolicyError) as caught:
        parse_policy({"entrypoints": ["fedkube"], "maxGpus": -1, "colour": "red"})
    fields = {path for path, _ in caught.value.problems}
    assert fields == {"entrypoints", "maxGpus", "colour"}
    path = tmp_path / "policy.yaml"
    path.write_text("entrypoints: ['fedkube.examples.']\nmaxMemory: 8Gi\n")
    assert load_policy(path).max_memory == "8Gi"
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "missing.yaml")


# -- the central allowlist and the status -----------------------------------------------------


def test_the_central_allowlist_covers_the_model_and_the_evaluation_data():
    document = small_job_dict()
    document["spec"]["model"]["entrypoint"] = "os:system"
    (refusal,) = check_central(parse_job(document), DEFAULT_ENTRYPOINTS)
    assert refusal.field == "spec.model.entrypoint"
    assert "'os:system' is not allowed at this operator" in refusal.message
    assert check_central(parse_job(small_job_dict()), DEFAULT_ENTRYPOINTS) == []
    with pytest.raises(ConfigError, match="--allow-entrypoint"):
        OperatorConfig(allow_entrypoints=("fedkube",))


def test_refusals_become_a_condition_and_the_refused_tenants_in_the_status():
    seen = Observation(
        generation=1,
        rounds=2,
        clients=4,
        suspend=False,
        active_deadline_seconds=None,
        backoff_limit=6,
        now=NOW,
        rounds_facts=RoundFacts(job_status="running", refused={"c": "not allowed here"}),
        pods=PodFacts(),
    )
    status = next_status(JobStatus(), seen)
    assert status.refused_tenants == ["c"]
    refused = next(c for c in status.conditions if c.type.value == "Refused")
    assert (refused.status, refused.reason) == ("True", "PolicyRefused")
    assert refused.message == "tenant c: not allowed here"
    assert status.phase.value == "Running"  # the others go on


def test_a_job_outside_the_central_allowlist_is_failed_naming_the_field():
    status = refused_status(JobStatus(), "spec.model.entrypoint 'os:system' is not allowed", NOW)
    assert status.phase.value == "Failed"
    assert status.conditions[-1].reason == "EntrypointNotAllowed"
    assert refused_status(status, status.message, NOW) is status


def test_refused_tenants_joins_every_reason_of_a_tenant():
    document = site_job(image="elsewhere/x:1")
    document["spec"]["data"]["entrypoint"] = "os:system"
    joined = refused_tenants(refusals_of(document, {}))
    assert (
        list(joined) == ["c"]
        and "spec.data.entrypoint" in joined["c"]
        and "spec.image" in joined["c"]
    )


# -- fedkube validate --policy ----------------------------------------------------------------


def test_validate_with_a_policy_reports_the_refusals_offline(tmp_path: Path):
    import yaml

    document = site_job()
    document["spec"]["data"]["entrypoint"] = "os:system"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(document))
    policy = tmp_path / "policy.yaml"
    policy.write_text("entrypoints: ['fedkube.examples.']\n")
    result = fedkube_cli("validate", str(job), "--policy", str(policy), "--site", SITE, timeout=60)
    assert result.returncode == 2, result
    assert (
        f"tenant c: spec.data.entrypoint 'os:system' is not allowed at site {SITE}" in result.stderr
    )
    policy.write_text("entrypoints: ['fedkube.examples.', 'os:system']\n")
    result = fedkube_cli("validate", str(job), "--policy", str(policy), "--site", SITE, timeout=60)
    assert result.returncode == 0, result.stderr
    policy.write_text("maxGpus: lots\n")
    result = fedkube_cli("validate", str(job), "--policy", str(policy), timeout=60)
    assert result.returncode == 2 and "maxGpus" in result.stderr


def test_a_sites_own_storage_is_mounted_read_only_into_its_tenants_workers_only():
    # prepare: site c's scans on a PVC of its own, seen by its workers under /scans
    job = parse_job(site_job())
    binding = {
        "kwargs": {"path": "/scans/xray"},
        "volume": {"claim": "pacs-export", "mountPath": "/scans"},
    }
    policy = parse_policy({"dataBindings": {"c": binding}})
    config = OperatorConfig(
        site=SITE, central_address="http://{job}-combiner-{region}.central:8080", policy=policy
    )
    # execute
    children = build_children(Target(job=job, namespace="site", uid="u", config=config))
    # assert
    (pod,) = [c for c in children if c["kind"] == "Pod"]
    assert {
        "name": "site-data",
        "persistentVolumeClaim": {"claimName": "pacs-export", "readOnly": True},
    } in pod["spec"]["volumes"]
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "site-data", "mountPath": "/scans", "readOnly": True} in mounts
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    assert "pacs-export" not in json.dumps(config_map)


@pytest.mark.parametrize(
    ("volume", "problem"),
    [
        ({}, "give exactly one of claim and hostPath"),
        ({"claim": "a", "hostPath": "/b"}, "give exactly one of claim and hostPath"),
        ({"hostPath": "relative"}, "String should match pattern '^/'"),
        ({"claim": "a", "mountPath": "/etc/fedkube/x"}, "is taken by fedkube's own files"),
    ],
)
def test_a_bad_data_volume_is_refused_naming_the_field(volume, problem):
    with pytest.raises(PolicyError) as refused:
        parse_policy({"dataBindings": {"c": {"volume": volume}}})
    assert problem in str(refused.value) and "dataBindings.c.volume" in str(refused.value)
