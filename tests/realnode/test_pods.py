"""End to end on a real node: fedkube's images in containerd, the chart's operator in a pod.

What a user does, and nothing else: ``helm install`` the chart (the operator runs in a pod
from the slim image, with leader election, logging in with its ServiceAccount; the bundled
Redis in a pod), ``kubectl apply`` the digits FederatedJob, and the operator's worker,
combiner and aggregator pods train it to ``Succeeded`` in containers (tests/node.py), the
workers with a training script of the Client API (``spec.task.script``) that exists only
in the user's own image, built ``FROM`` fedkube's and named in ``spec.image``.
Prometheus finds the operator through the chart's scrape annotations and scrapes it.
``kubectl delete`` leaves no pod, Secret or Redis key. A combiner pod deleted mid-round is
replaced by its Deployment and the round loses no update. A site namespace with its own
operator (the chart in site mode) runs its tenant's worker against the central combiner.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from fedkube.state.roundstate import job_prefix
from tests.node import CONTAINERS_CONF, VERSION, NodeCluster, run
from tests.prometheus import start_prometheus
from tests.support import ROOT, wait_for

CHART = ROOT / "charts" / "fedkube"
RELEASE = "fedkube"
CENTRAL = "fedkube"  # the release's namespace
JOBS = "hospitals"  # where the user applies the job
# What a user of `make cluster` installs the chart with (the project's Redis image, no
# volume provisioner, requests that fit a 2-core node), and status passes every second.
VALUES = [
    "-f",
    str(ROOT / "charts" / "values-local-node.yaml"),
    "--set",
    "operator.statusInterval=1",
    # The hospital's own code (its image's package) is admitted beside fedkube's examples.
    "--set",
    "operator.allowEntrypoints={fedkube.examples.,fedkube.datasets:,hospital.}",
]
# A user's image: fedkube's, plus a package of the hospital's own with its training script.
USER_IMAGE = "hospital-train:1"
USER_CONTAINERFILE = f"""FROM localhost/fedkube:{VERSION}
COPY hospital /opt/hospital/hospital
ENV PYTHONPATH=/opt/hospital
"""
POD_TIMEOUT_S = 300  # a pod's first start imports torch on a busy 2-core machine


def digits_job(name: str, rounds: int, epochs: int = 3) -> dict[str, Any]:
    """examples/digits.yaml as a user would adapt it to this node: no GPU, small requests."""
    document = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    document["metadata"] = {"name": name}
    spec = document["spec"]
    spec["rounds"] = rounds
    spec["training"]["epochs"] = epochs
    spec["participation"].update({"minFraction": 1.0, "roundTimeoutSeconds": 120})
    for tenant in spec["tenants"]:
        tenant["resources"] = {"cpu": "100m", "memory": "1Gi"}
    return document


def digits_script_job(name: str, rounds: int) -> dict[str, Any]:
    """The digits job, trained by the hospital's Client API script in every worker pod.

    The script (``hospital.train``, the Client API example as a site would keep it in
    its own package) is in the user's image only. Each pod's script first writes its
    site's partition as PNG files into its own scratch folder (``--prepare``), then
    reads them with its own DataLoader.
    """
    document = digits_job(name, rounds)
    document["spec"]["image"] = USER_IMAGE
    document["spec"]["task"] = {
        "script": "hospital.train",
        "args": ["--prepare", "--epochs", "3", "--hidden", "128"],
    }
    return document


def build_user_image(cluster: NodeCluster, context: Path) -> None:
    """The hospital's image, built FROM fedkube's as the README says, and loaded on the node."""
    package = context / "hospital"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A hospital\'s own training code."""\n')
    script = (ROOT / "core" / "examples" / "digits_script.py").read_text()
    (package / "train.py").write_text(script)
    (context / "Containerfile").write_text(USER_CONTAINERFILE)
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    run(
        "podman", "build", "--quiet", "--pull=never", "--network=none",
        "-t", f"localhost/{USER_IMAGE}", "-f", str(context / "Containerfile"), str(context),
        env=env,
    )  # fmt: skip
    cluster.load_images([USER_IMAGE])


def kubectl_json(cluster: NodeCluster, *args: str) -> Any:
    return json.loads(cluster.cp.kubectl(*args, "-o", "json").stdout)


def job_status(cluster: NodeCluster, namespace: str, name: str) -> dict[str, Any]:
    found = cluster.cp.kubectl("get", "fedjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout).get("status") or {} if found.returncode == 0 else {}


def finished(cluster: NodeCluster, namespace: str, name: str) -> dict[str, Any] | None:
    status = job_status(cluster, namespace, name)
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def lease_holder(cluster: NodeCluster, namespace: str) -> str:
    found = cluster.cp.kubectl(
        "get", "lease", "fedkube-operator", "-n", namespace, "-o", "json", check=False
    )
    if found.returncode != 0:
        return ""
    return str(json.loads(found.stdout)["spec"].get("holderIdentity") or "")


def redis_of(cluster: NodeCluster) -> Redis:
    """The bundled Redis, reached at its pod's address from the host (the node's bridge)."""
    secret = kubectl_json(cluster, "get", "secret", "fedkube-redis", "-n", CENTRAL)
    password = base64.b64decode(secret["data"]["password"]).decode()
    pod = kubectl_json(cluster, "get", "pod", "fedkube-redis-0", "-n", CENTRAL)
    return Redis(host=pod["status"]["podIP"], port=6379, password=password, decode_responses=True)


def pods(cluster: NodeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return kubectl_json(cluster, "get", "pods", "-n", namespace, "-l", selector)["items"]


def describe(cluster: NodeCluster, namespace: str) -> str:
    """What to show when a wait fails: the pods and the namespace's recent events."""
    got = cluster.cp.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.cp.kubectl(
        "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
    ).stdout
    return f"{got}\n{events[-3000:]}"


@pytest.fixture(scope="module")
def central(node_cluster: NodeCluster) -> Iterator[NodeCluster]:
    """The chart installed in central mode, its operator holding the Lease."""
    cp = node_cluster.cp
    cp.kubectl("create", "namespace", JOBS)
    # The operator watches the users' namespace only: the site's namespace stands for
    # another cluster, which the central operator must not see.
    cp.helm(
        "install", RELEASE, str(CHART), "-n", CENTRAL, "--create-namespace", *VALUES,
        "--set", f"operator.watchNamespaces={{{JOBS}}}",
        "--wait", "--timeout", f"{POD_TIMEOUT_S}s", timeout=POD_TIMEOUT_S + 60,
    )  # fmt: skip
    wait_for(
        lambda: lease_holder(node_cluster, CENTRAL).startswith("fedkube-operator-"),
        120,
        "the operator pod to take its Lease",
    )
    try:
        yield node_cluster
    finally:
        cp.kubectl("delete", "namespace", JOBS, "--wait=true", "--timeout=120s", check=False)
        cp.helm("uninstall", RELEASE, "-n", CENTRAL, "--wait", check=False)


def test_the_chart_runs_its_operator_in_a_pod_that_prometheus_scrapes(
    central: NodeCluster, tmp_path: Path
):
    (operator,) = pods(central, CENTRAL, "app.kubernetes.io/component=operator")
    container = operator["spec"]["containers"][0]
    assert container["image"] == f"fedkube-slim:{VERSION}"
    status = operator["status"]["containerStatuses"][0]
    assert status["ready"] and status["imageID"], status
    assert lease_holder(central, CENTRAL) == operator["metadata"]["name"]
    # The chart's Service says "scrape me" (no prometheus-operator here). Debian's Prometheus
    # has no Kubernetes service discovery, so the test reads the annotations as it would and
    # hands Prometheus the Service's address: scraped through kube-proxy, from the host.
    service = kubectl_json(central, "get", "service", "fedkube-operator", "-n", CENTRAL)
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    target = f"{service['spec']['clusterIP']}:{annotations['prometheus.io/port']}"
    with start_prometheus(tmp_path / "prometheus", {"fedkube-operator": [target]}) as prometheus:
        series = wait_for(
            lambda: prometheus.query("fedkube_operator_jobs"),
            90,
            f"the operator's metrics scraped; targets: {prometheus.active_targets()}",
        )
    assert series, series
    # Reached through the Service, the one replica that serves is the Lease holder.
    assert lease_holder(central, CENTRAL) == operator["metadata"]["name"]


def test_a_client_api_script_from_the_users_image_trains_in_real_pods_and_deletion_cleans(
    central: NodeCluster, tmp_path: Path
):
    cp = central.cp
    build_user_image(central, tmp_path / "image")
    document = digits_script_job("digits", rounds=3)
    cp.kubectl("apply", "-n", JOBS, "-f", "-", input=yaml.safe_dump(document))
    final = wait_for(
        lambda: finished(central, JOBS, "digits"),
        POD_TIMEOUT_S + 300,
        "the job to finish",
    )
    assert final["phase"] == "Succeeded", (final, describe(central, JOBS))
    assert final["progress"] == "3/3"
    assert final["participation"] == "6/6"
    assert final["lastAccuracy"] > 0.8, final
    # The pods ran the images the operator chose: workers and the global aggregator the
    # user's (spec.image), combiners the slim one, which runs none of the job's code.
    images = {
        p["metadata"]["labels"]["fedkube.io/role"]: p["spec"]["containers"][0]["image"]
        for p in pods(central, JOBS, "fedkube.io/job=digits")
    }
    assert images == {
        "worker": USER_IMAGE,
        "aggregator": USER_IMAGE,
        "combiner": f"fedkube-slim:{VERSION}",
    }, images
    # kubectl logs of a worker: its rounds, as structured lines.
    log = cp.kubectl("logs", "-n", JOBS, "digits-hospital-a-0").stdout
    rounds = {
        entry.get("round")
        for entry in map(json.loads, filter(str.strip, log.splitlines()))
        if entry.get("tenant") == "hospital-a"
    }
    assert {1, 2, 3} <= rounds, log[-3000:]
    assert "starting the training script hospital.train" in log, log[-3000:]
    listed = cp.kubectl("get", "fedjob", "digits", "-n", JOBS).stdout
    assert "Succeeded" in listed and "accuracy " in listed, listed  # the METRIC column

    redis = redis_of(central)
    assert redis.llen(job_prefix("digits") + "history") == 3
    cp.kubectl("delete", "fedjob", "digits", "-n", JOBS, "--timeout=120s")
    kinds = "pods,secrets,configmaps,services,deployments,replicasets,serviceaccounts"
    wait_for(
        lambda: (
            not kubectl_json(central, "get", kinds, "-n", JOBS)["items"]
            or [
                i
                for i in kubectl_json(central, "get", kinds, "-n", JOBS)["items"]
                if i["metadata"]["name"] not in ("default", "kube-root-ca.crt")
            ]
            == []
        ),
        120,
        "every child of the job gone",
    )
    assert list(redis.scan_iter(match=job_prefix("digits") + "*")) == []


def test_a_combiner_pod_deleted_mid_round_under_mutual_tls_is_replaced_and_no_update_is_lost(
    central: NodeCluster,
):
    cp = central.cp
    # Long enough local training that the kill lands while the round is collecting. Every
    # tier speaks mutual TLS, with the certificates the operator minted into Secrets.
    document = digits_job("chaos", rounds=4, epochs=40)
    document["spec"]["transport"] = {"tls": {"mode": "mutual"}}
    cp.kubectl("apply", "-n", JOBS, "-f", "-", input=yaml.safe_dump(document))
    prefix = job_prefix("chaos")
    wait_for(lambda: pods(central, JOBS, "fedkube.io/job=chaos"), 60, "the job's pods created")
    redis = wait_for(lambda: _redis_or_none(central), 60, "the bundled Redis")

    def eu_reported_mid_round_2() -> bool:
        state = redis.hgetall(prefix + "round:2")
        if state.get("state") != "collecting":
            return False
        reported = redis.hkeys(prefix + "round:2:reported")
        return any(client.startswith("hospital-") for client in reported) and len(reported) < 6

    wait_for(eu_reported_mid_round_2, POD_TIMEOUT_S + 120, "round 2 collecting, eu reporting")
    (combiner,) = pods(
        central, JOBS, "fedkube.io/job=chaos,fedkube.io/role=combiner,fedkube.io/region=eu"
    )
    cp.kubectl("delete", "pod", "-n", JOBS, combiner["metadata"]["name"], "--wait=false")

    final = wait_for(lambda: finished(central, JOBS, "chaos"), POD_TIMEOUT_S + 300, "the job")
    assert final["phase"] == "Succeeded", (final, describe(central, JOBS))
    history = [json.loads(r) for r in redis.lrange(prefix + "history", 0, -1)]
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    # Nothing lost: every round, the one with the kill included, has all six updates.
    assert [r["reported"] for r in history] == [6, 6, 6, 6], history
    replaced = pods(
        central, JOBS, "fedkube.io/job=chaos,fedkube.io/role=combiner,fedkube.io/region=eu"
    )
    assert combiner["metadata"]["name"] not in {p["metadata"]["name"] for p in replaced}
    # ... and the replacement served mutual TLS, its workers and the global tier dialling https.
    log = cp.kubectl("logs", "-n", JOBS, replaced[0]["metadata"]["name"]).stdout
    assert "(mutual TLS)" in log, log[-2000:]
    worker = kubectl_json(central, "get", "pod", "chaos-hospital-a-0", "-n", JOBS)
    args = worker["spec"]["containers"][0]["args"]
    assert args[args.index("--combiner-url") + 1].startswith("https://chaos-combiner-eu."), args
    cp.kubectl("delete", "fedjob", "chaos", "-n", JOBS, "--timeout=120s")
    wait_for(
        lambda: cp.kubectl("get", "secret", "chaos-tls-ca", "-n", JOBS, check=False).returncode,
        120,
        "the job's CA Secret deleted with the job",
    )


def _redis_or_none(cluster: NodeCluster) -> Redis | None:
    redis = redis_of(cluster)
    return redis if redis.ping() else None


def test_a_site_with_its_own_operator_trains_its_tenant_against_the_central_combiner(
    central: NodeCluster,
):
    cp = central.cp
    site = "site-c"
    cp.kubectl("create", "namespace", site)
    # The site's own install: the chart in site mode, pointed at the central combiners,
    # watching its own namespace only (the central one stands for another cluster).
    cp.helm(
        "install", "fedkube-site", str(CHART), "-n", site,
        "--set", "mode=site", "--set", "site.name=hospital-c",
        "--set", f"operator.watchNamespaces={{{site}}}",
        "--set", f"central.address=http://{{job}}-combiner-{{region}}.{JOBS}.svc:8080",
        "--set", "networkPolicy.enabled=false",
        "--wait", "--timeout", f"{POD_TIMEOUT_S}s", timeout=POD_TIMEOUT_S + 60,
    )  # fmt: skip
    try:
        central_job = digits_job("sited", rounds=2)
        for tenant in central_job["spec"]["tenants"]:
            if tenant["name"] == "hospital-c":
                tenant["site"] = "hospital-c"
        cp.kubectl("apply", "-n", JOBS, "-f", "-", input=yaml.safe_dump(central_job))
        # The site admin applies the same manifest and copies the tenant's credentials.
        cp.kubectl("apply", "-n", site, "-f", "-", input=yaml.safe_dump(copy.deepcopy(central_job)))
        secret = wait_for(
            lambda: _secret(central, JOBS, "sited-tenant-hospital-c"), 60, "the tenant Secret"
        )
        cp.kubectl(
            "create", "secret", "generic", "sited-tenant-hospital-c", "-n", site,
            *(
                f"--from-literal={key}={base64.b64decode(secret['data'][key]).decode()}"
                for key in ("token", "signing-key")
            ),
        )  # fmt: skip
        final = wait_for(lambda: finished(central, JOBS, "sited"), POD_TIMEOUT_S + 300, "the job")
        assert final["phase"] == "Succeeded", (
            final,
            describe(central, JOBS),
            describe(central, site),
        )
        assert final["participation"] == "6/6"
        central_workers = {
            p["metadata"]["name"] for p in pods(central, JOBS, "fedkube.io/role=worker")
        }
        site_workers = {
            p["metadata"]["name"] for p in pods(central, site, "fedkube.io/role=worker")
        }
        assert "sited-hospital-c-0" not in central_workers
        assert site_workers == {"sited-hospital-c-0"}
        log = cp.kubectl("logs", "-n", site, "sited-hospital-c-0").stdout
        assert '"tenant": "hospital-c"' in log, log[-2000:]
    finally:
        # Each side's job goes while its operator runs (it holds a finalizer).
        for namespace in (JOBS, site):
            cp.kubectl(
                "delete", "fedjob", "sited", "-n", namespace, "--ignore-not-found",
                "--timeout=120s", check=False, timeout=150,
            )  # fmt: skip
        cp.helm("uninstall", "fedkube-site", "-n", site, "--wait", check=False)
        cp.kubectl("delete", "namespace", site, "--wait=true", "--timeout=120s", check=False)


def _secret(cluster: NodeCluster, namespace: str, name: str) -> dict[str, Any] | None:
    found = cluster.cp.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None
