"""``helm template`` of charts/fedkube, checked object by object (no cluster needed).

Each test renders one combination of values the way a user would pass them
and asserts on the objects Helm would send to the API server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from typing import Any

import pytest
import yaml

from fedkube.operator.config import OperatorConfig
from fedkube.operator.crd import build_crd
from fedkube.policy import DEFAULT_ENTRYPOINTS, ENTRYPOINT_RULE, SitePolicy, parse_policy
from tests.controlplane import DEFAULT_BIN_DIR
from tests.support import ROOT

CHART = ROOT / "charts" / "fedkube"
HELM = DEFAULT_BIN_DIR / "helm"
MONITORING = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
SITE = (
    "mode=site",
    "site.name=hospital-a",
    "central.address=https://central.fedkube.invalid/{job}/{region}",
)
Objects = dict[tuple[str, str], dict[str, Any]]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run ./scripts/build-control-plane.sh (make test does)")
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=120, check=False
    )


def render_all(
    *values: str, api_versions: Iterable[str] = (), crds: bool = False
) -> list[dict[str, Any]]:
    """The chart's objects, as `helm template -n fedkube` renders them."""
    args = ["template", "fedkube", str(CHART), "-n", "fedkube"]
    for value in values:
        args += ["--set", value]
    for api in api_versions:
        args += ["--api-versions", api]
    if crds:
        args.append("--include-crds")
    done = helm(*args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def render(*values: str, api_versions: Iterable[str] = (), crds: bool = False) -> Objects:
    """The chart's objects by (kind, name)."""
    documents = render_all(*values, api_versions=api_versions, crds=crds)
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def refused(*values: str) -> str:
    """The error `helm template` gives for these values (it must fail)."""
    args = ["template", "fedkube", str(CHART), "-n", "fedkube"]
    for value in values:
        args += ["--set", value]
    done = helm(*args)
    assert done.returncode != 0, f"{values} rendered:\n{done.stdout[:500]}"
    return done.stderr


def kinds(objects: Objects) -> set[str]:
    return {kind for kind, _ in objects}


def operator_container(objects: Objects) -> dict[str, Any]:
    deployment = objects[("Deployment", "fedkube-operator")]
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def pod_specs(objects: Objects) -> list[dict[str, Any]]:
    return [
        o["spec"]["template"]["spec"]
        for o in objects.values()
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


def test_the_charts_crd_is_the_one_the_spec_model_generates():
    objects = render(crds=True)
    assert objects[("CustomResourceDefinition", "federatedjobs.fedkube.io")] == build_crd()
    assert (CHART / "crds").resolve() == (ROOT / "crds").resolve()


def test_the_values_schema_checks_entrypoints_with_the_operators_own_rule():
    schema = json.loads((CHART / "values.schema.json").read_text())
    central = schema["properties"]["operator"]["properties"]["allowEntrypoints"]
    site = schema["properties"]["site"]["properties"]["policy"]["properties"]["entrypoints"]
    assert central["items"]["pattern"] == site["items"]["pattern"] == ENTRYPOINT_RULE


def test_a_central_install_has_the_operator_rbac_and_a_bundled_redis():
    objects = render()
    assert kinds(objects) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "StatefulSet",
        "Secret",
        "NetworkPolicy",
        "ConfigMap",
    }
    args = operator_container(objects)["args"]
    assert args[0] == "operator"
    assert "--redis-url=redis://fedkube-redis.fedkube.svc.cluster.local:6379/0" in args
    assert "--leader-election" in args
    assert "--aggregator-memory=2Gi" in args and "--combiner-cpu=250m" in args
    assert not any(a.startswith("--site") for a in args)
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert env["FEDKUBE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fedkube-redis",
        "key": "password",
    }
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Probes ask the event loop's heartbeat on the metrics port, not kopf's endpoint.
    container = operator_container(objects)
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "--health-port=0" in args


def test_the_bundled_redis_keeps_an_append_only_file_on_a_claim_behind_a_password():
    objects = render()
    redis = objects[("StatefulSet", "fedkube-redis")]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--dir") + 1] == "/data"
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert len(objects[("Secret", "fedkube-redis")]["data"]["password"]) > 32


def test_redis_without_persistence_uses_an_empty_dir_and_an_existing_secret_is_used_as_is():
    objects = render("redis.persistence.enabled=false", "redis.auth.existingSecret=my-redis")
    redis = objects[("StatefulSet", "fedkube-redis")]
    assert "volumeClaimTemplates" not in redis["spec"]
    assert redis["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert ("Secret", "fedkube-redis") not in objects
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert env["FEDKUBE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "my-redis"


def test_an_external_redis_replaces_the_bundled_one():
    objects = render("redis.bundled=false", "redis.url=redis://redis.data.svc:6379/2")
    assert "StatefulSet" not in kinds(objects)
    assert "--redis-url=redis://redis.data.svc:6379/2" in operator_container(objects)["args"]
    assert "FEDKUBE_REDIS_PASSWORD" not in {e["name"] for e in operator_container(objects)["env"]}


def test_a_site_install_runs_only_the_site_operator_pointed_at_the_central_site():
    objects = render(*SITE)
    assert "StatefulSet" not in kinds(objects)
    args = operator_container(objects)["args"]
    assert "--site=hospital-a" in args
    assert "--central-address=https://central.fedkube.invalid/{job}/{region}" in args
    assert not any(a.startswith("--redis-url") for a in args)


def test_a_site_install_renders_its_policy_into_a_secret_the_operator_reads():
    objects = render(
        *SITE,
        "site.policy.entrypoints={fedkube.examples.,hospital.loaders:scans}",
        "site.policy.maxGpus=2",
        "site.policy.dataBindings.c.kwargs.path=/data/c.npz",
    )
    secret = objects[("Secret", "fedkube-operator-site-policy")]
    policy = parse_policy(yaml.safe_load(secret["stringData"]["policy.yaml"]))
    assert policy.entrypoints == ["fedkube.examples.", "hospital.loaders:scans"]
    assert policy.max_gpus == 2 and policy.max_memory is None
    assert policy.data_bindings["c"].kwargs == {"path": "/data/c.npz"}
    container = operator_container(objects)
    assert "--policy=/etc/fedkube/policy/policy.yaml" in container["args"]
    assert {"name": "site-policy", "mountPath": "/etc/fedkube/policy", "readOnly": True} in (
        container["volumeMounts"]
    )
    template = objects[("Deployment", "fedkube-operator")]["spec"]["template"]
    assert "checksum/site-policy" in template["metadata"]["annotations"]
    # The defaults are the safe ones that the operator itself defaults to.
    default = render(*SITE)[("Secret", "fedkube-operator-site-policy")]
    assert parse_policy(yaml.safe_load(default["stringData"]["policy.yaml"])) == SitePolicy()
    # Central mode has no site policy, but an allowlist for the aggregator tier.
    central = render()
    assert ("Secret", "fedkube-operator-site-policy") not in central
    assert [a for a in operator_container(central)["args"] if a.startswith("--allow")] == [
        f"--allow-entrypoint={e}" for e in DEFAULT_ENTRYPOINTS
    ]


def test_watch_namespaces_grant_roles_there_and_only_read_only_discovery_cluster_wide():
    documents = render_all("operator.watchNamespaces={team-a,team-b}")
    roles = [
        d["metadata"]["namespace"]
        for d in documents
        if d["kind"] == "Role" and d["metadata"]["name"] == "fedkube-operator"
    ]
    assert sorted(roles) == ["team-a", "team-b"]
    cluster_roles = [d for d in documents if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["fedkube-operator-discovery-fedkube"]
    for rule in cluster_roles[0]["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_redis_admits_the_aggregator_tier_only_from_the_watched_namespaces():
    def aggregator_tier_peer(objects: Objects) -> dict[str, Any]:
        peers = objects[("NetworkPolicy", "fedkube-redis")]["spec"]["ingress"][0]["from"]
        return next(p for p in peers if "namespaceSelector" in p)

    everywhere = aggregator_tier_peer(render())
    assert everywhere["namespaceSelector"] == {}
    watched = aggregator_tier_peer(render("operator.watchNamespaces={team-a,team-b}"))
    assert watched["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
    ]
    role = watched["podSelector"]["matchExpressions"][0]
    assert role == {
        "key": "fedkube.io/role",
        "operator": "In",
        "values": ["aggregator", "combiner"],
    }


def test_the_operators_rbac_grants_exactly_what_it_uses():
    objects = render()
    rules = objects[("ClusterRole", "fedkube-operator-fedkube")]["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert not any("*" in entry for entry in granted)
    # Server-side apply needs create and patch; pruning, delete; diffing, list.
    for kind in ("pods", "services", "configmaps", "secrets", "serviceaccounts"):
        assert {("", kind, v) for v in ("get", "list", "create", "patch", "delete")} <= granted
    assert ("", "pods", "update") not in granted
    assert ("", "secrets", "watch") not in granted
    assert ("fedkube.io", "federatedjobs/status", "patch") in granted
    assert ("fedkube.io", "federatedjobs", "update") not in granted
    lease = objects[("Role", "fedkube-operator-leader-election")]["rules"]
    assert {"resourceNames": ["fedkube-operator"], "verbs": ["get", "update"]}.items() <= lease[
        1
    ].items()


def test_every_pod_runs_as_non_root_on_a_read_only_root_filesystem():
    for spec in pod_specs(render()):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]


def test_monitoring_objects_appear_only_where_the_prometheus_operator_crds_exist():
    plain = render()
    assert not kinds(plain) & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    annotations = plain[("Deployment", "fedkube-operator")]["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    monitored = render(api_versions=MONITORING)
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds(monitored)
    pod_monitor = monitored[("PodMonitor", "fedkube-jobs")]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "fedkube-operator"
    }
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    # The series' own `job` label (the FederatedJob) must survive the scrape.
    assert all(e["honorLabels"] for e in pod_monitor["spec"]["podMetricsEndpoints"])
    template = monitored[("Deployment", "fedkube-operator")]["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in (template.get("annotations") or {})


def test_a_participation_threshold_passed_with_set_is_accepted():
    rule = render("alerts.participationBelow=0.3", api_versions=MONITORING)[
        ("PrometheusRule", "fedkube")
    ]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("fedkube_participation_ratio) < 0.3" in e for e in exprs)


def test_dashboards_are_config_maps_with_the_grafana_sidecar_label():
    objects = render()
    dashboards = [o for (kind, _), o in objects.items() if kind == "ConfigMap"]
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json")))
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "ConfigMap" not in kinds(render("dashboards.enabled=false"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("mode=hub",), "/mode"),
        (("mode=site",), "/site/name"),
        (("mode=site", "site.name=h", "central.address=https://c/x"), "/central/address"),
        (("operator.replicas=two",), "/operator/replicas"),
        (("operatr.replicas=2",), "'operatr' not allowed"),
        (("operator.logLevel=chatty",), "/operator/logLevel"),
        (("redis.url=redis://:pw@redis:6379",), "/redis/url"),
        (("alerts.participationBelow=2",), "/alerts/participationBelow"),
        (("alerts.participationBelow=0.3x",), "/alerts/participationBelow"),
        (("aggregator.memory=lots",), "/aggregator/memory"),
        ((*SITE, "site.policy.entrypoints={fedkube}"), "/site/policy/entrypoints/0"),
        ((*SITE, "site.policy.maxMemory=lots"), "/site/policy/maxMemory"),
        ((*SITE, "site.policy.allowAll=true"), "'allowAll' not allowed"),
        (("operator.allowEntrypoints={os}",), "/operator/allowEntrypoints/0"),
        (
            ("operator.replicas=2", "operator.leaderElection.enabled=false"),
            "needs operator.leaderElection.enabled=true",
        ),
        (("redis.bundled=false",), "redis.url: mode central without the bundled Redis"),
    ],
)
def test_bad_values_fail_with_the_field_named(values: tuple[str, ...], message: str):
    assert message in refused(*values)


def test_the_operator_runs_the_slim_image_and_hands_both_images_to_the_jobs_pods():
    """What tests/images/test_image.py builds is what the chart runs: the operator from the
    slim image, as UID 10001 through the image's entrypoint; the jobs' pods get the full
    image (workers, global aggregator) and the slim one (combiners) from its flags."""
    spec = render("image.tag=1.2.3")[("Deployment", "fedkube-operator")]["spec"]["template"]
    container = spec["spec"]["containers"][0]
    assert container["image"] == "fedkube-slim:1.2.3"
    assert "--image=fedkube:1.2.3" in container["args"]
    assert "--slim-image=fedkube-slim:1.2.3" in container["args"]
    user = OperatorConfig().run_as_user
    assert spec["spec"]["securityContext"]["runAsUser"] == user
    assert container["command"] == ["fedkube"]
