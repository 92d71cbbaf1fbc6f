"""The pure manifest builders: one FederatedJob in, its Kubernetes objects out."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography import x509

from fedkube.errors import ConfigError
from fedkube.operator import naming
from fedkube.operator.builders import RunMode, Target, build_children
from fedkube.operator.config import OperatorConfig
from fedkube.operator.reconcile import read_tls
from fedkube.service.web import digest
from fedkube.spec import parse_job
from fedkube.wire import signing
from tests.support import region_signing_key, small_job_dict, tenant_signing_key

UID = "0f5e2d6c-1111-2222-3333-444455556666"


def three_tenants(**tenant_extra: Any) -> dict[str, Any]:
    document = small_job_dict(
        tenants=[
            {"name": "a", "region": "eu", "resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"}},
            {"name": "b", "region": "eu", "replicas": 2, "resources": {"gpu": 1}},
            {"name": "c", "region": "us", "resources": {"gpu": 1}, **tenant_extra},
        ],
        state={"redisUrl": "redis://redis.fedkube.svc:6379/0"},
    )
    document["metadata"]["name"] = "mnist"
    return document


def target(document: dict[str, Any] | None = None, **overrides: Any) -> Target:
    job = parse_job(document or three_tenants())
    values: dict[str, Any] = {
        "job": job,
        "namespace": "team-a",
        "uid": UID,
        "config": OperatorConfig(),
        "region_tokens": {r: f"token-{r}" for r in job.region_names()},
        "region_signing_keys": {r: region_signing_key(r) for r in job.region_names()},
        "tenant_tokens": {t.name: f"token-{t.name}" for t in job.spec.tenants},
        "tenant_signing_keys": {t.name: tenant_signing_key(t.name) for t in job.spec.tenants},
    }
    values.update(overrides)
    return Target(**values)


def by_kind(children: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == kind}


def containers(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for child in children:
        if child["kind"] == "Pod":
            found += child["spec"]["containers"]
        elif child["kind"] == "Deployment":
            found += child["spec"]["template"]["spec"]["containers"]
    return found


def test_a_job_with_three_tenants_in_two_regions_gets_every_child_with_fixed_names():
    # prepare
    job_target = target()
    # execute
    children = build_children(job_target)
    # assert
    names = {(c["kind"], c["metadata"]["name"]) for c in children}
    assert names == {
        ("ConfigMap", "mnist-config"),
        ("Secret", "mnist-aggregator"),
        ("Secret", "mnist-tenant-a"),
        ("Secret", "mnist-tenant-b"),
        ("Secret", "mnist-tenant-c"),
        ("Secret", "mnist-combiner-eu"),
        ("Secret", "mnist-combiner-us"),
        ("ServiceAccount", "mnist-tenant-a"),
        ("ServiceAccount", "mnist-tenant-b"),
        ("ServiceAccount", "mnist-tenant-c"),
        ("NetworkPolicy", "mnist-tenant-a"),
        ("NetworkPolicy", "mnist-tenant-b"),
        ("NetworkPolicy", "mnist-tenant-c"),
        ("Service", "mnist-aggregator"),
        ("Deployment", "mnist-aggregator"),
        ("Service", "mnist-combiner-eu"),
        ("Deployment", "mnist-combiner-eu"),
        ("Service", "mnist-combiner-us"),
        ("Deployment", "mnist-combiner-us"),
        ("Pod", "mnist-a-0"),
        ("Pod", "mnist-b-0"),
        ("Pod", "mnist-b-1"),
        ("Pod", "mnist-c-0"),
    }
    assert len(names) == len(children)


def test_every_child_is_owned_by_the_job_labelled_and_hashed():
    children = build_children(target())
    for child in children:
        metadata = child["metadata"]
        assert metadata["namespace"] == "team-a"
        assert metadata["ownerReferences"] == [
            {
                "apiVersion": "fedkube.io/v1alpha1",
                "kind": "FederatedJob",
                "name": "mnist",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = metadata["labels"]
        assert labels["app.kubernetes.io/name"] == "fedkube"
        assert labels["app.kubernetes.io/instance"] == "mnist"
        assert labels["app.kubernetes.io/managed-by"] == "fedkube-operator"
        assert labels[naming.LABEL_JOB] == "mnist"
        assert labels[naming.LABEL_ROLE] == labels["app.kubernetes.io/component"]
        assert len(metadata["annotations"][naming.ANNOTATION_HASH]) == 16
    pods = by_kind(children, "Pod")
    assert (
        pods["mnist-b-1"]["metadata"]["labels"].items()
        >= {
            naming.LABEL_TENANT: "b",
            naming.LABEL_REGION: "eu",
            naming.LABEL_CLIENT: "b-1",
            naming.LABEL_ROLE: "worker",
        }.items()
    )


def test_worker_pods_ask_for_their_gpus_cpu_and_memory():
    pods = by_kind(build_children(target()), "Pod")
    assert pods["mnist-a-0"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": 1},
    }
    assert pods["mnist-c-0"]["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": 1}
    }


def test_the_gpu_resource_name_comes_from_the_operator_config():
    pods = by_kind(build_children(target(config=OperatorConfig(gpu_resource="amd.com/gpu"))), "Pod")
    assert pods["mnist-a-0"]["spec"]["containers"][0]["resources"]["limits"] == {
        "memory": "4Gi",
        "amd.com/gpu": 1,
    }


def test_combiners_run_the_slim_image_and_the_rest_the_full_one_or_the_jobs():
    # prepare
    config = OperatorConfig(image="reg/fedkube:2", slim_image="reg/fedkube-slim:2")
    custom = three_tenants()
    custom["spec"]["image"] = "hospital/xray:1"
    # execute
    plain = build_children(target(config=config))
    own = build_children(target(custom, config=config))

    # assert
    def images(children: list[dict[str, Any]]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for child in children:
            if child["kind"] in ("Pod", "Deployment"):
                spec = (
                    child["spec"] if child["kind"] == "Pod" else child["spec"]["template"]["spec"]
                )
                role = child["metadata"]["labels"][naming.LABEL_ROLE]
                found.setdefault(role, set()).add(spec["containers"][0]["image"])
        return found

    assert images(plain) == {
        "worker": {"reg/fedkube:2"},
        "aggregator": {"reg/fedkube:2"},
        "combiner": {"reg/fedkube-slim:2"},
    }
    # A job's own image runs its code (workers, the aggregator that evaluates its model);
    # combiners run none of it.
    assert images(own) == {
        "worker": {"hospital/xray:1"},
        "aggregator": {"hospital/xray:1"},
        "combiner": {"reg/fedkube-slim:2"},
    }


def test_placement_fields_of_a_tenant_reach_its_pods_only():
    document = three_tenants(
        nodeSelector={"gpu": "a100"},
        tolerations=[
            {"key": "dedicated", "operator": "Equal", "value": "fl", "effect": "NoSchedule"}
        ],
        priorityClassName="fl-high",
    )
    pods = by_kind(build_children(target(document)), "Pod")
    assert pods["mnist-c-0"]["spec"]["nodeSelector"] == {"gpu": "a100"}
    assert pods["mnist-c-0"]["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "fl", "effect": "NoSchedule"}
    ]
    assert pods["mnist-c-0"]["spec"]["priorityClassName"] == "fl-high"
    assert "nodeSelector" not in pods["mnist-a-0"]["spec"]


def test_every_container_runs_as_non_root_read_only_without_privilege_escalation():
    children = build_children(target())
    for child in children:
        if child["kind"] == "Pod":
            pod_spec = child["spec"]
        elif child["kind"] == "Deployment":
            pod_spec = child["spec"]["template"]["spec"]
        else:
            continue
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["automountServiceAccountToken"] is False
    for container in containers(children):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}


def test_every_file_a_container_reads_is_mounted():
    children = build_children(target())
    for container in containers(children):
        mounted = [m["mountPath"] for m in container["volumeMounts"]]
        for arg in container["args"]:
            if arg.startswith("/"):
                assert any(arg.startswith(path + "/") or arg == path for path in mounted), arg


def test_a_worker_talks_to_its_regions_combiner_with_its_tenants_token_and_signing_key():
    pods = by_kind(build_children(target()), "Pod")
    container = pods["mnist-c-0"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--combiner-url") + 1] == "http://mnist-combiner-us.team-a.svc:8080"
    assert args[args.index("--client") + 1] == "c-0"
    token = next(e for e in container["env"] if e["name"] == "FEDKUBE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "mnist-tenant-c", "key": "token"}
    key = next(e for e in container["env"] if e["name"] == "FEDKUBE_SIGNING_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "mnist-tenant-c", "key": "signing-key"}
    assert "value" not in key  # the key itself is never in the pod's spec
    assert pods["mnist-c-0"]["spec"]["serviceAccountName"] == "mnist-tenant-c"


def test_virtual_clients_run_as_one_pod_per_worker_group():
    # prepare: tenant b's 2,500 clients, 1,000 to a worker process
    document = three_tenants()
    document["spec"]["tenants"][1]["replicas"] = 2500
    document["spec"]["simulation"] = {"clientsPerWorker": 1000}
    # execute
    pods = by_kind(build_children(target(document)), "Pod")
    # assert: three pods for b (1,000 + 1,000 + 500 clients), one each for a and c
    assert sorted(pods) == ["mnist-a-v0", "mnist-b-v0", "mnist-b-v1", "mnist-b-v2", "mnist-c-v0"]
    args = pods["mnist-b-v2"]["spec"]["containers"][0]["args"]
    assert args[args.index("--group") + 1] == "b-v2" and "--client" not in args
    assert pods["mnist-b-v2"]["metadata"]["labels"][naming.LABEL_CLIENT] == "b-v2"
    # the pod asks for the tenant's resources once, not once per virtual client
    limits = pods["mnist-b-v2"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_combiners_hold_digests_of_their_regions_tokens_never_the_tokens():
    secrets = by_kind(build_children(target()), "Secret")
    eu = json.loads(base64.b64decode(secrets["mnist-combiner-eu"]["data"]["tokens.json"]))
    assert eu == {"a": digest("token-a"), "b": digest("token-b")}
    assert "token-a" not in json.dumps(secrets["mnist-combiner-eu"])


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def test_a_tenants_secret_holds_its_token_and_private_signing_key():
    # execute
    secrets = by_kind(build_children(target()), "Secret")
    # assert
    assert secret_data(secrets["mnist-tenant-c"]) == {
        "token": "token-c",
        "signing-key": tenant_signing_key("c"),
    }


def test_combiners_hold_only_the_public_keys_of_their_regions_tenants():
    # execute
    secrets = by_kind(build_children(target()), "Secret")
    # assert: region eu's tenants' public keys, nothing of us, no tenant's private key;
    # beside them the combiner's own credential to the global tier
    data = secret_data(secrets["mnist-combiner-eu"])
    assert set(data) == {"token", "signing-key", "tokens.json", "keys.json"}
    assert data["token"] == "token-eu" and data["signing-key"] == region_signing_key("eu")
    assert json.loads(data["keys.json"]) == {
        name: signing.public_key_of(tenant_signing_key(name), name) for name in ("a", "b")
    }
    for region in ("eu", "us"):
        text = json.dumps(secret_data(secrets[f"mnist-combiner-{region}"]))
        assert not any(tenant_signing_key(name) in text for name in ("a", "b", "c"))


CHECKS_ITEMS = [
    {"key": "tokens.json", "path": "tokens.json"},
    {"key": "keys.json", "path": "keys.json"},
]


def test_a_combiner_is_started_with_its_public_keys_file_and_its_own_credential():
    deployment = by_kind(build_children(target()), "Deployment")["mnist-combiner-us"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--tenant-keys") + 1] == "/etc/fedkube/tokens/keys.json"
    # the checks as files; its own token and key only in its environment
    checks = {"secretName": "mnist-combiner-us", "items": CHECKS_ITEMS}
    assert {"name": "checks", "secret": checks} in pod["volumes"]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    assert env["FEDKUBE_AGGREGATOR_TOKEN"] == {"name": "mnist-combiner-us", "key": "token"}
    assert env["FEDKUBE_SIGNING_KEY"] == {"name": "mnist-combiner-us", "key": "signing-key"}


def test_the_global_aggregator_holds_what_checks_each_region_never_a_combiners_credential():
    # execute
    children = build_children(target())
    secret = secret_data(by_kind(children, "Secret")["mnist-aggregator"])
    pod = by_kind(children, "Deployment")["mnist-aggregator"]["spec"]["template"]["spec"]
    # assert: per region, its token's digest and its public key; no token, no private key
    assert json.loads(secret["tokens.json"]) == {r: digest(f"token-{r}") for r in ("eu", "us")}
    assert json.loads(secret["keys.json"]) == {
        r: signing.public_key_of(region_signing_key(r), r) for r in ("eu", "us")
    }
    text = json.dumps(secret)
    assert not any(f'"token-{r}"' in text or region_signing_key(r) in text for r in ("eu", "us"))
    args = pod["containers"][0]["args"]
    assert args[args.index("--region-tokens") + 1] == "/etc/fedkube/tokens/tokens.json"
    assert args[args.index("--region-keys") + 1] == "/etc/fedkube/tokens/keys.json"
    assert {
        "name": "checks",
        "secret": {"secretName": "mnist-aggregator", "items": CHECKS_ITEMS},
    } in pod["volumes"]
    assert not [e for e in pod["containers"][0]["env"] if "secretKeyRef" in e.get("valueFrom", {})]


def test_a_tenants_network_policy_allows_its_combiner_and_dns_only():
    policies = by_kind(build_children(target()), "NetworkPolicy")
    spec = policies["mnist-tenant-a"]["spec"]
    assert spec["podSelector"]["matchLabels"] == {
        naming.LABEL_JOB: "mnist",
        naming.LABEL_ROLE: "worker",
        naming.LABEL_TENANT: "a",
    }
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    combiner, dns = spec["egress"]
    assert combiner["to"] == [
        {
            "podSelector": {
                "matchLabels": {
                    naming.LABEL_JOB: "mnist",
                    naming.LABEL_ROLE: "combiner",
                    naming.LABEL_REGION: "eu",
                }
            }
        }
    ]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert spec["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9090}]}]


def test_a_suspended_job_has_no_worker_pods_but_keeps_its_aggregator_tier():
    children = build_children(target(mode=RunMode.suspended))
    assert by_kind(children, "Pod") == {}
    assert {d["spec"]["replicas"] for d in by_kind(children, "Deployment").values()} == {1}


def test_a_finished_job_scales_its_aggregator_tier_to_zero():
    children = build_children(target(mode=RunMode.finished))
    assert by_kind(children, "Pod") == {}
    assert {d["spec"]["replicas"] for d in by_kind(children, "Deployment").values()} == {0}


def test_site_mode_builds_only_the_sites_tenants_pointed_at_the_central_address():
    document = three_tenants(site="hospital-c")
    config = OperatorConfig(
        site="hospital-c", central_address="https://fl.example.org:8443/{job}/{region}"
    )
    children = build_children(target(document, config=config))
    kinds = {(c["kind"], c["metadata"]["name"]) for c in children}
    assert kinds == {
        ("ConfigMap", "mnist-config"),
        ("ServiceAccount", "mnist-tenant-c"),
        ("NetworkPolicy", "mnist-tenant-c"),
        ("Pod", "mnist-c-0"),
    }
    container = by_kind(children, "Pod")["mnist-c-0"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--combiner-url") + 1] == "https://fl.example.org:8443/mnist/us"
    # token and signing key from the tenant's Secret as copied to the site
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs == {
        "FEDKUBE_TOKEN": {"name": "mnist-tenant-c", "key": "token"},
        "FEDKUBE_SIGNING_KEY": {"name": "mnist-tenant-c", "key": "signing-key"},
    }
    egress = by_kind(children, "NetworkPolicy")["mnist-tenant-c"]["spec"]["egress"][0]
    assert egress["ports"] == [{"protocol": "TCP", "port": 8443}]


def test_the_central_operator_leaves_site_tenants_workers_to_their_site():
    children = build_children(target(three_tenants(site="hospital-c")))
    assert "mnist-c-0" not in by_kind(children, "Pod")
    assert "mnist-tenant-c" in by_kind(children, "Secret")  # to be copied to the site


def test_the_config_map_holds_the_resolved_manifest_that_the_components_load(tmp_path):
    from fedkube.spec import load_job

    config_map = by_kind(build_children(target()), "ConfigMap")["mnist-config"]
    path = tmp_path / "job.yaml"
    path.write_text(config_map["data"]["job.yaml"])
    job = load_job(path)
    assert job.name == "mnist"
    assert job.spec.training.epochs == 1  # defaults are filled in


def test_building_is_deterministic_and_leaves_its_input_alone():
    job_target = target()
    snapshot = copy.deepcopy(job_target.job.model_dump())
    first = build_children(job_target)
    second = build_children(job_target)
    assert first == second
    assert job_target.job.model_dump() == snapshot


def test_a_changed_spec_changes_the_hash_of_what_it_affects_only():
    before = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["annotations"][naming.ANNOTATION_HASH]
        for c in build_children(target())
    }
    document = three_tenants()
    document["spec"]["tenants"][2]["resources"]["gpu"] = 2
    after = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["annotations"][naming.ANNOTATION_HASH]
        for c in build_children(target(document))
    }
    changed = {key for key in before if before[key] != after[key]}
    # The manifest in the ConfigMap changes, and the pod whose limits change.
    assert changed == {("ConfigMap", "mnist-config"), ("Pod", "mnist-c-0")}


def test_a_job_without_any_redis_is_not_built():
    document = three_tenants()
    del document["spec"]["state"]
    with pytest.raises(ValueError, match="redisUrl"):
        build_children(target(document))


def _password_env(container: dict[str, Any]) -> dict[str, Any] | None:
    found = [e for e in container.get("env", []) if e["name"] == "FEDKUBE_REDIS_PASSWORD"]
    return found[0]["valueFrom"]["secretKeyRef"] if found else None


def test_the_operators_redis_password_reaches_the_aggregator_tier_through_the_jobs_secret():
    # prepare: the operator has a password for its own Redis; the job names none
    document = three_tenants()
    document["spec"]["state"] = {}
    config = OperatorConfig(redis_url="redis://redis:6379/0", redis_password="s3cret")
    # execute
    children = build_children(target(document, config=config))
    # assert: a J-redis Secret holds it; the aggregator and combiners read it; workers do not
    secret = by_kind(children, "Secret")["mnist-redis"]
    assert base64.b64decode(secret["data"]["password"]) == b"s3cret"
    for name, deployment in by_kind(children, "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert _password_env(container) == {"name": "mnist-redis", "key": "password"}, name
        assert "s3cret" not in json.dumps(container), name
    for pod in by_kind(children, "Pod").values():
        assert _password_env(pod["spec"]["containers"][0]) is None


def test_a_job_on_its_own_redis_never_gets_the_operators_password():
    document = three_tenants()
    document["spec"]["state"] = {"redisUrl": "redis://elsewhere:6379/0"}
    config = OperatorConfig(redis_url="redis://redis:6379/0", redis_password="s3cret")
    children = build_children(target(document, config=config))
    assert "mnist-redis" not in by_kind(children, "Secret")
    assert "s3cret" not in json.dumps(children)


def test_a_jobs_own_password_secret_wins_over_the_operators():
    document = three_tenants()
    document["spec"]["state"] = {"redisPasswordSecret": {"name": "team-redis", "key": "pw"}}
    config = OperatorConfig(redis_url="redis://redis:6379/0", redis_password="s3cret")
    children = build_children(target(document, config=config))
    assert "mnist-redis" not in by_kind(children, "Secret")
    aggregator = by_kind(children, "Deployment")["mnist-aggregator"]
    container = aggregator["spec"]["template"]["spec"]["containers"][0]
    assert _password_env(container) == {"name": "team-redis", "key": "pw"}


def test_the_aggregator_tiers_resources_come_from_the_operator_config():
    config = OperatorConfig(aggregator_memory="4Gi", combiner_cpu="2")
    deployments = by_kind(build_children(target(config=config)), "Deployment")
    aggregator = deployments["mnist-aggregator"]["spec"]["template"]["spec"]["containers"][0]
    assert aggregator["resources"] == {
        "requests": {"cpu": "500m", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    combiner = deployments["mnist-combiner-eu"]["spec"]["template"]["spec"]["containers"][0]
    assert combiner["resources"]["requests"] == {"cpu": "2", "memory": "512Mi"}


def test_an_operator_flag_that_is_not_a_quantity_is_refused_by_name():
    with pytest.raises(ConfigError, match="--combiner-memory"):
        OperatorConfig(combiner_memory="lots")


def tls_target(mode: str = "mutual") -> Target:
    """A job under spec.transport.tls, with the CA and certificates a pass would hold."""
    document = three_tenants()
    document["spec"]["transport"] = {"tls": {"mode": mode}}
    job = parse_job(document)
    ca, leaves = read_tls([], UID, job, "team-a")
    return target(document, tls_ca=ca, tls_leaves=leaves)


def test_under_tls_each_pod_mounts_only_its_own_certificate_and_dials_https():
    # execute
    children = build_children(tls_target())
    secrets = by_kind(children, "Secret")
    # assert: the CA's key is in a Secret no pod mounts
    ca = secret_data(secrets["mnist-tls-ca"])
    assert set(ca) == {"ca.crt", "ca.key"}
    for child in children:
        if child["kind"] in ("Pod", "Deployment"):
            spec = child["spec"] if child["kind"] == "Pod" else child["spec"]["template"]["spec"]
            mounted = {v.get("secret", {}).get("secretName") for v in spec["volumes"]}
            assert "mnist-tls-ca" not in mounted, child["metadata"]["name"]
    # each Secret carries its owner's certificate, issued by the job's CA
    owners = {
        "mnist-aggregator": "fedkube://mnist/global",
        "mnist-combiner-eu": "fedkube://mnist/region/eu",
        "mnist-tenant-c": "fedkube://mnist/tenant/c",
    }
    for name, uri in owners.items():
        data = secret_data(secrets[name])
        assert data["ca.crt"] == ca["ca.crt"], name
        assert f"URI:{uri}" in x509_names(data["tls.crt"]), name
    # a worker mounts its tenant's certificate files (not its token or key) and dials https
    pod = by_kind(children, "Pod")["mnist-c-0"]["spec"]
    container = pod["containers"][0]
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "mnist-tenant-c"
    assert [i["key"] for i in tls_volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    args = container["args"]
    assert args[args.index("--tls-dir") + 1] == "/etc/fedkube/tls"
    assert args[args.index("--combiner-url") + 1] == "https://mnist-combiner-us.team-a.svc:8080"
    # the tier: probes over HTTPS, the combiner dials the global tier over https
    deployments = by_kind(children, "Deployment")
    combiner = deployments["mnist-combiner-eu"]["spec"]["template"]["spec"]["containers"][0]
    assert combiner["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert combiner["args"][combiner["args"].index("--global-url") + 1].startswith("https://")


def x509_names(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ", ".join(
        f"URI:{n.value}" if isinstance(n, x509.UniformResourceIdentifier) else str(n.value)
        for n in names
    )


def test_without_tls_no_pod_gets_a_certificate_and_every_url_is_http():
    children = build_children(target())
    assert "mnist-tls-ca" not in by_kind(children, "Secret")
    for container in containers(children):
        assert "--tls-dir" not in container["args"]
        assert not any(a.startswith("https://") for a in container["args"])
    assert "ca.crt" not in secret_data(by_kind(children, "Secret")["mnist-tenant-c"])
