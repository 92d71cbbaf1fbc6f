"""The operator on a real control plane: kube-apiserver, controller-manager, scheduler, kwok.

Each test applies FederatedJobs with kubectl in its own namespace and
watches what ``fedkube operator`` (a real process) makes of them, with a
real redis-server for the round state.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from redis import Redis

from fedkube.service.web import digest
from fedkube.spec import load_job, parse_job
from fedkube.state.redis_server import RedisServer
from fedkube.state.roundstate import job_prefix
from fedkube.wire import signing
from tests.cluster.jobs import (
    apply,
    children,
    condition,
    expected_children,
    get_json,
    job_document,
    names,
    owned_children,
    status,
)
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.support import ROOT, small_job_dict, wait_for


def wait_for_every_child(cp: ControlPlane, namespace: str, job: str = "mnist") -> None:
    wait_for(
        lambda: expected_children(job) <= owned_children(children(cp, namespace, job)),
        30,
        "every child of the job",
    )


def test_applying_a_job_creates_every_child_with_gpu_limits_on_kwok_gpu_nodes(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    apply(control_plane, namespace, job_document())
    job = get_json(control_plane, namespace, "federatedjob", "mnist")
    expected = expected_children("mnist")
    wait_for(
        lambda: expected <= owned_children(children(control_plane, namespace, "mnist")),
        30,
        "every child of the job",
    )
    items = children(control_plane, namespace, "mnist")
    assert owned_children(items) == expected  # nothing more
    for item in items:
        if (item["kind"], item["metadata"]["name"]) not in expected:
            continue
        metadata = item["metadata"]
        assert metadata["ownerReferences"][0]["uid"] == job["metadata"]["uid"], metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "fedkube-operator"
        assert metadata["labels"]["fedkube.io/job"] == "mnist"

    def workers_running() -> list[dict[str, Any]] | None:
        pods = get_json(control_plane, namespace, "pods", "-l", "fedkube.io/role=worker")["items"]
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        return pods if len(running) == 3 else None

    pods = wait_for(workers_running, 60, "3 worker pods Running on kwok nodes")
    nodes = {n["metadata"]["name"]: n for n in get_json(control_plane, "", "nodes")["items"]}
    for pod in pods:
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}
        node = nodes[pod["spec"]["nodeName"]]
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        assert pod["metadata"]["labels"]["fedkube.io/tenant"] in {"a", "b", "c"}
    # Tokens are consistent: each combiner holds the digests of its tenants' tokens.
    secrets = {
        s["metadata"]["name"]: s for s in get_json(control_plane, namespace, "secrets")["items"]
    }
    eu = json.loads(base64.b64decode(secrets["mnist-combiner-eu"]["data"]["tokens.json"]))
    token_a = base64.b64decode(secrets["mnist-tenant-a"]["data"]["token"]).decode()
    assert eu["a"] == digest(token_a) and set(eu) == {"a", "b"}
    # ... and the public halves of its tenants' signing keys, never a private key.
    keys = json.loads(base64.b64decode(secrets["mnist-combiner-eu"]["data"]["keys.json"]))
    key_a = base64.b64decode(secrets["mnist-tenant-a"]["data"]["signing-key"]).decode()
    assert keys["a"] == signing.public_key_of(key_a, "a") and set(keys) == {"a", "b"}
    printed = control_plane.kubectl("get", "-n", namespace, "fedjob").stdout
    assert printed.split("\n")[0].split() == [
        "NAME",
        "STATE",
        "PHASE",
        "ROUND",
        "PARTICIPATION",
        "METRIC",
        "EPSILON",
        "AGE",
    ]


def test_a_tenant_asking_for_more_gpus_than_any_node_has_is_named_unschedulable(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    apply(control_plane, namespace, job_document(gpus={"c": 64}))

    def unschedulable() -> dict[str, Any] | None:
        found = condition(control_plane, namespace, "mnist", "Unschedulable")
        return found if found and found["status"] == "True" else None

    found = wait_for(unschedulable, 60, "the Unschedulable condition")
    assert "tenant c" in found["message"]
    assert "nvidia.com/gpu" in found["message"]
    assert "tenant a" not in found["message"]
    events = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=Unschedulable"
    ).stdout
    assert "tenant c" in events


INVALID = {
    "no tenants": (lambda spec: spec.update(tenants=[]), "spec.tenants"),
    "unknown region": (
        lambda spec: spec["tenants"][0].update(region="asia"),
        "spec.tenants",
    ),
    "negative rounds": (lambda spec: spec.update(rounds=-3), "spec.rounds"),
    "duplicate tenant": (
        lambda spec: spec["tenants"].append({"name": "a", "region": "us"}),
        "spec.tenants[4]",
    ),
    "malformed entrypoint": (
        lambda spec: spec["model"].update(entrypoint="not a module path"),
        "spec.model.entrypoint",
    ),
    "a sparse model": (
        lambda spec: spec.update(compression={"down": {"scheme": "topk"}}),
        "spec.compression.down.scheme",
    ),
    "more worker pods than a tenant may run": (
        lambda spec: spec["tenants"][0].update(replicas=1001),
        "spec.tenants",
    ),
    "privacy with neither noise nor a target epsilon": (
        lambda spec: spec.update(privacy={"dp": {"clipNorm": 1.0}}),
        "spec.privacy.dp",
    ),
    "an in-flight budget smaller than one update": (
        lambda spec: spec.update(
            transport={"maxUpdateBytes": 64 * 1024 * 1024, "maxInflightBytesPerTenant": 1024}
        ),
        "spec.transport.maxInflightBytesPerTenant",
    ),
    "too many virtual-client workers": (
        lambda spec: (
            spec["tenants"][0].update(replicas=5000),
            spec.update(simulation={"clientsPerWorker": 4}),
        ),
        "spec.simulation.clientsPerWorker",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_manifest_is_refused_by_the_api_server_naming_the_field(
    control_plane: ControlPlane, crd: None, namespace: str, case: str
):
    change, field = INVALID[case]
    document = small_job_dict()
    change(document["spec"])
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document), check=False
    )
    assert result.returncode != 0
    assert "is invalid" in result.stderr
    assert field in result.stderr, result.stderr
    # The local runtime refuses the same manifest, naming the same field.
    from fedkube.errors import SpecError

    with pytest.raises(SpecError) as refused:
        parse_job(document)
    local_fields = [path for path, _ in refused.value.problems]
    assert any(path.startswith(field.split("[")[0]) for path in local_fields), local_fields


def resource_versions(cp: ControlPlane, namespace: str, job: str) -> dict[tuple[str, str], str]:
    """What the operator wrote, by resourceVersion (pods: by uid, kwok updates their status)."""
    return {
        (item["kind"], item["metadata"]["name"]): (
            item["metadata"]["uid"]
            if item["kind"] == "Pod"
            else item["metadata"]["resourceVersion"]
        )
        for item in children(cp, namespace, job)
        if item["metadata"]["labels"].get("app.kubernetes.io/managed-by") == "fedkube-operator"
    }


def test_an_operator_killed_mid_reconcile_converges_without_duplicates_and_then_idles(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    document = job_document()
    document["spec"]["tenants"] = [
        {"name": f"t{i:02d}", "region": "eu" if i % 2 else "us"} for i in range(30)
    ]
    apply(control_plane, namespace, document)
    wait_for(
        lambda: len(children(control_plane, namespace, "mnist")) >= 5,
        30,
        "the first children",
    )
    operator.kill()
    partial = len(children(control_plane, namespace, "mnist"))
    operator.start()
    wanted = 1 + 1 + 30 * 4 + 2 * 3 + 2  # config, aggregator secret, per tenant, per region
    wait_for(
        lambda: len(owned_children(children(control_plane, namespace, "mnist"))) == wanted,
        60,
        f"all {wanted} children after the restart (had {partial})",
    )
    secrets = {
        s["metadata"]["name"]: s for s in get_json(control_plane, namespace, "secrets")["items"]
    }
    for region in ("eu", "us"):
        held = json.loads(
            base64.b64decode(secrets[f"mnist-combiner-{region}"]["data"]["tokens.json"])
        )
        public = json.loads(
            base64.b64decode(secrets[f"mnist-combiner-{region}"]["data"]["keys.json"])
        )
        assert set(public) == set(held)
        for tenant, expected in held.items():
            data = secrets[f"mnist-tenant-{tenant}"]["data"]
            token = base64.b64decode(data["token"]).decode()
            assert digest(token) == expected, f"combiner {region} and tenant {tenant} disagree"
            key = base64.b64decode(data["signing-key"]).decode()
            assert public[tenant] == signing.public_key_of(key, tenant), (region, tenant)
    # Converged: another restart (a resume pass and timer passes) writes nothing.
    before = resource_versions(control_plane, namespace, "mnist")
    operator.stop()
    operator.start()
    operator.wait_serving()
    wait_for(
        lambda: (
            'fedkube_operator_reconcile_duration_seconds_count{trigger="timer"} 2.0'
            in operator.metrics()
        ),
        30,
        "two timer passes after the restart",
    )
    assert resource_versions(control_plane, namespace, "mnist") == before
    assert 'fedkube_operator_writes_total{action="apply"' not in operator.metrics()


def test_under_tls_the_operator_mints_the_jobs_ca_and_each_owners_certificate_once(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    # prepare: a job under mutual TLS
    document = job_document()
    document["spec"]["transport"] = {"tls": {"mode": "mutual"}}
    # execute
    apply(control_plane, namespace, document)
    wait_for(
        lambda: ("Secret", "mnist-tls-ca") in names(children(control_plane, namespace, "mnist")),
        30,
        "the job's CA Secret",
    )
    wait_for_every_child(control_plane, namespace)
    secrets = {
        s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s["data"].items()}
        for s in get_json(control_plane, namespace, "secrets")["items"]
    }
    ca = x509.load_pem_x509_certificate(secrets["mnist-tls-ca"]["ca.crt"])
    # assert: each owner's Secret holds a certificate of that CA for its own identity
    owners = {
        "mnist-aggregator": "fedkube://mnist/global",
        "mnist-combiner-eu": "fedkube://mnist/region/eu",
        "mnist-combiner-us": "fedkube://mnist/region/us",
        "mnist-tenant-a": "fedkube://mnist/tenant/a",
        "mnist-tenant-c": "fedkube://mnist/tenant/c",
    }
    for name, uri in owners.items():
        data = secrets[name]
        assert data["ca.crt"] == secrets["mnist-tls-ca"]["ca.crt"], name
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri], name
    combiner_names = (
        x509.load_pem_x509_certificate(secrets["mnist-combiner-eu"]["tls.crt"])
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert f"mnist-combiner-eu.{namespace}.svc" in combiner_names.get_values_for_type(x509.DNSName)
    # ... and later passes read them back: the operator's restart rewrites nothing
    before = resource_versions(control_plane, namespace, "mnist")
    operator.stop()
    operator.start()
    operator.wait_serving()
    wait_for(
        lambda: (
            'fedkube_operator_reconcile_duration_seconds_count{trigger="timer"} 1.0'
            in operator.metrics()
        ),
        30,
        "a timer pass after the restart",
    )
    assert resource_versions(control_plane, namespace, "mnist") == before


def test_a_child_edited_by_hand_is_put_back_and_the_operator_then_idles(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    apply(control_plane, namespace, job_document())
    wait_for_every_child(control_plane, namespace)
    egress = get_json(control_plane, namespace, "networkpolicy", "mnist-tenant-a")["spec"]["egress"]
    # Someone scales the aggregator away and opens tenant a's egress to everything.
    control_plane.kubectl(
        "scale", "deployment", "mnist-aggregator", "--replicas=0", "-n", namespace
    )
    control_plane.kubectl(
        "patch",
        "networkpolicy",
        "mnist-tenant-a",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"egress": [{}]}}),
    )
    wait_for(
        lambda: (
            get_json(control_plane, namespace, "deployment", "mnist-aggregator")["spec"]["replicas"]
            == 1
            and get_json(control_plane, namespace, "networkpolicy", "mnist-tenant-a")["spec"][
                "egress"
            ]
            == egress
        ),
        30,
        "the operator to put the aggregator's replicas and tenant a's egress back",
    )
    text = operator.metrics()
    assert 'fedkube_operator_drift_corrections_total{kind="Deployment"} 1.0' in text
    assert 'fedkube_operator_drift_corrections_total{kind="NetworkPolicy"} 1.0' in text
    assert "mnist-aggregator was changed outside the operator (spec.replicas)" in operator.log()
    wait_for(
        lambda: any(
            e["reason"] == "ChildEdited" and "NetworkPolicy mnist-tenant-a" in e["message"]
            for e in get_json(
                control_plane,
                namespace,
                "events",
                "--field-selector",
                "involvedObject.kind=FederatedJob,involvedObject.name=mnist",
            )["items"]
        ),
        30,
        "a ChildEdited event on the job",
    )
    # Put back for good: the following passes write nothing (no tug of war). The
    # operator's own counters, since the Deployment's status still moves.
    writes = series(operator, "fedkube_operator_writes_total")
    passes = series(operator, "fedkube_operator_reconcile_duration_seconds_count")
    wait_for(
        lambda: (
            series(operator, "fedkube_operator_reconcile_duration_seconds_count")[
                '{trigger="timer"}'
            ]
            >= passes['{trigger="timer"}'] + 2
        ),
        30,
        "two more timer passes",
    )
    assert series(operator, "fedkube_operator_writes_total") == writes


def series(operator: OperatorProcess, name: str) -> dict[str, float]:
    """The samples of one metric, by their label set as written."""
    found = {}
    for line in operator.metrics().splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            found[labels] = float(value)
    return found


def test_deleting_the_job_removes_every_child_and_its_redis_keys(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    redis_server: RedisServer,
):
    apply(control_plane, namespace, job_document())
    wait_for(
        lambda: expected_children("mnist") <= names(children(control_plane, namespace, "mnist")),
        30,
        "every child",
    )
    client = Redis.from_url(redis_server.url, decode_responses=True)
    client.hset(job_prefix("mnist") + "job", mapping={"status": "running", "round": 1})
    client.rpush(job_prefix("mnist") + "history", json.dumps({"round": 1}))
    wait_for(
        lambda: status(control_plane, namespace, "mnist").get("phase") == "Running",
        30,
        "phase Running from the round state in Redis",
    )
    control_plane.kubectl("delete", "-n", namespace, "federatedjob", "mnist", "--wait=true")
    wait_for(
        lambda: not children(control_plane, namespace, "mnist"),
        60,
        "garbage collection of every child",
    )
    assert client.keys(job_prefix("mnist") + "*") == []


def test_spec_changes_converge_and_suspend_stops_the_workers(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    document = job_document()
    apply(control_plane, namespace, document)

    def pods() -> set[str]:
        return {
            p["metadata"]["name"]
            for p in get_json(control_plane, namespace, "pods", "-l", "fedkube.io/role=worker")[
                "items"
            ]
            if not p["metadata"].get("deletionTimestamp")
        }

    wait_for(lambda: pods() == {"mnist-a-0", "mnist-b-0", "mnist-c-0"}, 30, "3 workers")
    first_c = get_json(control_plane, namespace, "pod", "mnist-c-0")["metadata"]["uid"]
    # Remove tenant b, add tenant d with 2 replicas, give c 2 GPUs.
    document["spec"]["tenants"] = [
        {"name": "a", "region": "eu", "resources": {"gpu": 1}},
        {"name": "c", "region": "us", "resources": {"gpu": 2}},
        {"name": "d", "region": "us", "replicas": 2},
    ]
    apply(control_plane, namespace, document)
    wait_for(
        lambda: pods() == {"mnist-a-0", "mnist-c-0", "mnist-d-0", "mnist-d-1"},
        60,
        "the new set of workers",
    )

    def replaced_c() -> dict[str, Any] | None:
        pod = get_json(control_plane, namespace, "pod", "mnist-c-0")
        return pod if pod["metadata"]["uid"] != first_c else None

    pod_c = wait_for(replaced_c, 60, "pod mnist-c-0 replaced with 2 GPUs")
    assert pod_c["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    gone = get_json(control_plane, namespace, "secrets,serviceaccounts,networkpolicies")
    assert not [i for i in gone["items"] if i["metadata"]["name"] == "mnist-tenant-b"]

    document["spec"]["suspend"] = True
    apply(control_plane, namespace, document)
    wait_for(lambda: not pods(), 60, "no worker pod while suspended")

    items = get_json(control_plane, namespace, "deployments")["items"]
    assert {d["spec"]["replicas"] for d in items} == {1}  # the aggregator tier waits, paused
    wait_for(
        lambda: status(control_plane, namespace, "mnist").get("phase") == "Suspended",
        30,
        "phase Suspended",
    )
    document["spec"]["suspend"] = False
    apply(control_plane, namespace, document)
    wait_for(lambda: len(pods()) == 4, 60, "the workers back after resuming")
    wait_for(
        lambda: status(control_plane, namespace, "mnist").get("phase") != "Suspended",
        30,
        "the job no longer Suspended",
    )


def test_the_operator_serves_its_metrics(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    apply(control_plane, namespace, job_document())
    wait_for(
        lambda: 'fedkube_operator_jobs{phase="Pending"} 1.0' in operator.metrics(),
        30,
        "the job counted by phase",
    )
    text = operator.metrics()
    assert 'fedkube_operator_reconcile_duration_seconds_count{trigger="create"} 1.0' in text
    assert 'fedkube_operator_writes_total{action="apply",kind="Pod"} 3.0' in text
    assert "fedkube_operator_reconcile_errors_total" in text


def test_a_finished_job_is_deleted_after_its_ttl(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    redis_server: RedisServer,
):
    document = job_document()
    document["spec"]["ttlSecondsAfterFinished"] = 2
    apply(control_plane, namespace, document)
    # The global aggregator's last word, as it writes it when the rounds are done.
    client = Redis.from_url(redis_server.url, decode_responses=True)
    client.hset(
        job_prefix("mnist") + "job",
        mapping={"status": "succeeded", "message": "3 rounds completed", "round": 3},
    )
    wait_for(
        lambda: status(control_plane, namespace, "mnist").get("phase") == "Succeeded",
        30,
        "phase Succeeded",
    )

    def gone() -> bool:
        found = control_plane.kubectl("get", "-n", namespace, "federatedjob", "mnist", check=False)
        return found.returncode != 0

    wait_for(gone, 60, "the job deleted by its TTL")
    wait_for(lambda: not children(control_plane, namespace, "mnist"), 60, "its children gone")


def test_a_site_operator_runs_only_its_tenants_once_their_credentials_are_copied(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
    redis_server: RedisServer,
    tmp_path: Path,
):
    document = job_document()
    document["spec"]["tenants"][2]["site"] = "hospital-c"
    site = OperatorProcess(
        control_plane,
        namespace,
        redis_server.url,
        tmp_path,
        "--site",
        "hospital-c",
        "--central-address",
        "https://fl.example.org:8443/{job}/{region}",
    ).start()
    try:
        site.wait_serving()
        apply(control_plane, namespace, document)
        wait_for(
            lambda: "waiting for Secret 'mnist-tenant-c'" in site.log(),
            30,
            "the site operator to wait for the tenant's Secret",
        )
        assert not get_json(control_plane, namespace, "pods")["items"]
        # A copy that predates signed updates (a token only) is not enough ...
        control_plane.kubectl(
            "create",
            "secret",
            "generic",
            "-n",
            namespace,
            "mnist-tenant-c",
            "--from-literal=token=copied-from-central",
        )
        wait_for(
            lambda: "(copy it from the central cluster; missing: signing-key)" in site.log(),
            30,
            "the site operator to name the missing signing key",
        )
        assert not get_json(control_plane, namespace, "pods")["items"]
        # ... the worker starts once the tenant's signing key is there too.
        patch = {"stringData": {"signing-key": signing.generate_key()[0]}}
        control_plane.kubectl(
            "patch", "secret", "-n", namespace, "mnist-tenant-c", "-p", json.dumps(patch)
        )
        pod = wait_for(
            lambda: next(iter(get_json(control_plane, namespace, "pods")["items"]), None),
            30,
            "the site's worker pod",
        )
    finally:
        site.stop()
    assert pod["metadata"]["name"] == "mnist-c-0"
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--combiner-url") + 1] == "https://fl.example.org:8443/mnist/us"
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in pod["spec"]["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs == [
        {"name": "mnist-tenant-c", "key": "token"},
        {"name": "mnist-tenant-c", "key": "signing-key"},
    ]
    made = names(children(control_plane, namespace, "mnist"))
    assert not {kind for kind, _ in made} & {"Deployment", "Service"}  # no aggregator tier here
    # The copied Secret is the site admin's, not the job's: it is never adopted.
    secret = get_json(control_plane, namespace, "secret", "mnist-tenant-c")
    assert "ownerReferences" not in secret["metadata"]


def test_the_example_manifest_is_accepted_by_the_api_server_and_the_local_runtime(
    control_plane: ControlPlane, crd: None, namespace: str
):
    example = ROOT / "examples" / "federatedjob.yaml"
    result = control_plane.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", str(example))
    assert "digits-gpu created (server dry run)" in result.stdout
    assert load_job(example).spec.tenants[2].replicas == 2
