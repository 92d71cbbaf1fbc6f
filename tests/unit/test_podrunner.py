"""The pod runner's pure parts: env, $(VAR) expansion, rewriting, argv, volumes, addresses."""

from __future__ import annotations

import base64
import ipaddress
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.podrunner import (
    POD_NETWORK,
    MissingReference,
    Outcome,
    PodSpecError,
    allocate_ip,
    backed_services,
    build_argv,
    decode_data,
    expand,
    field_value,
    materialize_volumes,
    mount_map,
    resolve_env,
    resolve_executable,
    rewrite_mount_paths,
    rewrite_service_names,
    search_path,
    selects,
    target_port,
    terminal_status,
)

POD: dict[str, Any] = {
    "metadata": {
        "name": "web-1",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "web", "tier": "front"},
        "annotations": {"note": 'say "hi"'},
    },
    "spec": {
        "nodeName": "kwok-node-0",
        "serviceAccountName": "default",
        "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
    },
}
OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ConfigMap", "settings"): {
        "kind": "ConfigMap",
        "data": {"mode": "fast", "greeting.txt": "hello"},
        "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()},
    },
    ("Secret", "creds"): {
        "kind": "Secret",
        "data": {"token": base64.b64encode(b"s3cr3t").decode()},
    },
}


def fetch(kind: str, name: str) -> dict[str, bytes] | None:
    """The runner's ConfigMap/Secret lookup, served from OBJECTS."""
    obj = OBJECTS.get((kind, name))
    return None if obj is None else decode_data(obj)


def no_token(audience: str | None, seconds: int) -> str:
    raise AssertionError("no token expected")


# -- $(VAR) expansion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x-$(A)-$(B)-y", "x-1-two-y"),
        ("$(MISSING)", "$(MISSING)"),  # undefined: kept as written
        ("$$(A)", "$(A)"),  # escaped
        ("$$", "$"),
        ("cost: $5", "cost: $5"),
        ("$(A", "$(A"),  # unterminated
        ("trailing $", "trailing $"),
        ("", ""),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "two"}) == expected


# -- env --------------------------------------------------------------------------------


def test_env_from_sources_with_prefix_then_env_entries_which_override() -> None:
    container = {
        "envFrom": [
            {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
            {"secretRef": {"name": "creds"}},
        ],
        "env": [
            {"name": "CFG_mode", "value": "slow"},
            {"name": "DERIVED", "value": "$(CFG_mode)/$(token)/$(LATER)"},
            {"name": "LATER", "value": "late"},
        ],
    }
    env = resolve_env(container, POD, "127.128.0.7", fetch)
    assert env["CFG_mode"] == "slow"
    assert env["CFG_greeting.txt"] == "hello"
    assert env["token"] == "s3cr3t"  # base64-decoded
    # A value sees only what was defined before it.
    assert env["DERIVED"] == "slow/s3cr3t/$(LATER)"


def test_env_value_from_field_refs_and_key_refs() -> None:
    def ref(field_path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": field_path}}

    container = {
        "env": [
            {"name": "NAME", "valueFrom": ref("metadata.name")},
            {"name": "NS", "valueFrom": ref("metadata.namespace")},
            {"name": "APP", "valueFrom": ref("metadata.labels['app']")},
            {"name": "NOTE", "valueFrom": ref("metadata.annotations['note']")},
            {"name": "IP", "valueFrom": ref("status.podIP")},
            {"name": "NODE", "valueFrom": ref("spec.nodeName")},
            {"name": "SA", "valueFrom": ref("spec.serviceAccountName")},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {
                "name": "GONE",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ]
    }
    env = resolve_env(container, POD, "127.128.0.7", fetch)
    assert env == {
        "NAME": "web-1",
        "NS": "ns",
        "APP": "web",
        "NOTE": 'say "hi"',
        "IP": "127.128.0.7",
        "NODE": "kwok-node-0",
        "SA": "default",
        "TOKEN": "s3cr3t",
        "MODE": "fast",
    }


@pytest.mark.parametrize(
    "value_from",
    [
        {"configMapKeyRef": {"name": "nope", "key": "k"}},
        {"configMapKeyRef": {"name": "settings", "key": "nope"}},
        {"secretKeyRef": {"name": "creds", "key": "nope"}},
    ],
)
def test_a_missing_required_reference_is_retryable(value_from: dict[str, Any]) -> None:
    with pytest.raises(MissingReference, match="not found"):
        resolve_env({"env": [{"name": "X", "valueFrom": value_from}]}, POD, "ip", fetch)


def test_a_missing_required_env_from_source_is_retryable_an_optional_one_skipped() -> None:
    with pytest.raises(MissingReference, match="ConfigMap nope"):
        resolve_env({"envFrom": [{"configMapRef": {"name": "nope"}}]}, POD, "ip", fetch)
    optional = {"envFrom": [{"secretRef": {"name": "nope", "optional": True}}]}
    assert resolve_env(optional, POD, "ip", fetch) == {}


def test_resource_field_refs_and_unknown_field_paths_are_clear_errors() -> None:
    resource = {"resourceFieldRef": {"resource": "limits.cpu"}}
    with pytest.raises(PodSpecError, match="resourceFieldRef"):
        resolve_env({"env": [{"name": "CPU", "valueFrom": resource}]}, POD, "ip", fetch)
    with pytest.raises(PodSpecError, match="status.phase"):
        field_value(POD, "status.phase", "ip")


# -- rewriting --------------------------------------------------------------------------


def test_mount_paths_are_rewritten_as_whole_path_prefixes_longest_first() -> None:
    mounts = {"/data": Path("/w/data"), "/data/cache/": Path("/w/cache"), "/tmp": Path("/w/tmp")}
    assert rewrite_mount_paths("/data", mounts) == "/w/data"
    assert rewrite_mount_paths("/data/x.bin", mounts) == "/w/data/x.bin"
    assert rewrite_mount_paths("/data/cache/y", mounts) == "/w/cache/y"
    assert rewrite_mount_paths("--dir=/data/a,/tmp", mounts) == "--dir=/w/data/a,/w/tmp"
    assert rewrite_mount_paths("/tmp:/data", mounts) == "/w/tmp:/w/data"
    for untouched in ("/database", "/srv/data", "/data.txt", "data", "file:///data"):
        assert rewrite_mount_paths(untouched, mounts) == untouched
    assert rewrite_mount_paths("/data", {}) == "/data"


def test_a_rewritten_path_is_not_rewritten_again_by_a_mount_it_contains() -> None:
    mounts = {"/tmp": Path("/tmp/pods/web/volumes/tmp")}
    assert rewrite_mount_paths("/tmp/x", mounts) == "/tmp/pods/web/volumes/tmp/x"


SERVICES = {"web": "127.64.0.9", "redis": "127.64.0.10"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://web.ns.svc.cluster.local:8080/x", "http://127.64.0.9:8080/x"),
        ("http://web.ns.svc:8080/", "http://127.64.0.9:8080/"),
        ("web.ns.svc", "127.64.0.9"),
        ("web.ns", "127.64.0.9"),
        ("http://web.ns/", "http://127.64.0.9/"),
        ("http://web:8080/", "http://127.64.0.9:8080/"),
        ("http://web/", "http://127.64.0.9/"),
        ("http://web", "http://127.64.0.9"),
        ("redis://:pw@redis:6379/0", "redis://:pw@127.64.0.10:6379/0"),
        ("web:8080", "127.64.0.9:8080"),
        ("--peers=web:1,redis:2", "--peers=127.64.0.9:1,127.64.0.10:2"),
        # Not Service names here:
        ("web", "web"),
        ("webby:8080", "webby:8080"),
        ("my-web:8080", "my-web:8080"),
        ("web.other.svc", "web.other.svc"),
        ("web.ns.svcx", "web.ns.svcx"),
        ("web.nsx", "web.nsx"),
        ("a.web.ns.svc", "a.web.ns.svc"),
        ("/srv/web/index.html", "/srv/web/index.html"),
        ("unknown.ns:80", "unknown.ns:80"),
    ],
)
def test_service_names_are_rewritten_to_their_addresses(text: str, expected: str) -> None:
    assert rewrite_service_names(text, "ns", SERVICES) == expected


def test_qualified_names_of_services_not_created_yet_get_a_reserved_address() -> None:
    reserved: list[str] = []

    def reserve(name: str) -> str:
        reserved.append(name)
        return "127.64.0.99"

    text = "http://later.ns.svc:80 later.ns.svc.cluster.local later.ns later:80"
    rewritten = rewrite_service_names(text, "ns", SERVICES, reserve)
    assert rewritten == "http://127.64.0.99:80 127.64.0.99 later.ns later:80"
    assert reserved == ["later", "later"]


# -- argv ---------------------------------------------------------------------------------


def test_argv_is_command_plus_args_expanded_then_rewritten_with_command_resolved() -> None:
    container = {
        "name": "c",
        "command": ["python", "-m", "http.server"],
        "args": ["--bind", "$(POD_IP)", "--directory", "$(SITE)", "$(UNSET)", "$$(POD_IP)"],
    }
    env = {"POD_IP": "127.128.0.7", "SITE": "/srv"}

    def rewrite(text: str) -> str:
        return rewrite_mount_paths(text, {"/srv": Path("/w/site")})

    path = search_path([Path(sys.executable).parent])
    argv = build_argv(container, env, rewrite, path)
    assert Path(argv[0]).parent == Path(sys.executable).parent
    assert argv[1:] == [
        "-m",
        "http.server",
        "--bind",
        "127.128.0.7",
        "--directory",
        "/w/site",
        "$(UNSET)",
        "$(POD_IP)",
    ]


def test_a_container_without_command_or_with_an_unknown_one_is_an_error() -> None:
    path = search_path([])
    with pytest.raises(PodSpecError, match="no command"):
        build_argv({"name": "c", "args": ["x"]}, {}, str, path)
    with pytest.raises(PodSpecError, match="not found"):
        build_argv({"name": "c", "command": ["no-such-binary-here"]}, {}, str, path)


def test_an_image_path_that_does_not_exist_here_is_looked_up_by_basename() -> None:
    venv_bin = Path(sys.executable).parent
    path = search_path([venv_bin])
    found = resolve_executable("/usr/local/bin/python-not-here/python", path)
    assert Path(found).parent == venv_bin
    assert resolve_executable("/bin/sh", path) == "/bin/sh"


# -- volumes ------------------------------------------------------------------------------


def pod_with_volumes(*volumes: dict[str, Any]) -> dict[str, Any]:
    return {**POD, "spec": {**POD["spec"], "volumes": list(volumes)}}


def test_config_map_secret_empty_dir_and_claim_volumes_become_folders(tmp_path: Path) -> None:
    pod = pod_with_volumes(
        {"name": "all", "configMap": {"name": "settings"}},
        {
            "name": "some",
            "configMap": {
                "name": "settings",
                "items": [{"key": "mode", "path": "conf/mode.txt", "mode": 0o755}],
            },
        },
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {"name": "maybe", "secret": {"secretName": "nope", "optional": True}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "state", "persistentVolumeClaim": {"claimName": "ckpt"}},
    )
    root, claims = tmp_path / "pod", tmp_path / "claims"
    (claims / "ckpt").mkdir(parents=True)
    (claims / "ckpt" / "kept").write_text("from an earlier pod")
    (root / "scratch").mkdir(parents=True)
    (root / "scratch" / "stale").write_text("from an earlier pod")

    folders = materialize_volumes(pod, root, claims, "127.128.0.7", fetch, no_token)

    assert folders["all"] == root / "all"
    assert (root / "all" / "greeting.txt").read_text() == "hello"
    assert (root / "all" / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (root / "some").rglob("*")) == ["conf", "mode.txt"]
    assert stat.S_IMODE((root / "some" / "conf" / "mode.txt").stat().st_mode) == 0o755
    assert (root / "creds" / "token").read_bytes() == b"s3cr3t"
    assert stat.S_IMODE((root / "creds" / "token").stat().st_mode) == 0o400
    assert list((root / "maybe").iterdir()) == []
    assert list((root / "scratch").iterdir()) == []  # a new pod's emptyDir is empty
    assert folders["state"] == claims / "ckpt"
    assert (claims / "ckpt" / "kept").read_text() == "from an earlier pod"


def field_item(path: str, field_path: str) -> dict[str, Any]:
    return {"path": path, "fieldRef": {"fieldPath": field_path}}


def test_the_service_account_projection_is_materialized(tmp_path: Path) -> None:
    pod = pod_with_volumes(
        {
            "name": "kube-api-access",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "settings", "items": [{"key": "mode", "path": "m"}]}},
                    {"downwardAPI": {"items": [field_item("namespace", "metadata.namespace")]}},
                    {"downwardAPI": {"items": [field_item("labels", "metadata.labels")]}},
                ]
            },
        }
    )
    requested: list[tuple[str | None, int]] = []

    def token(audience: str | None, seconds: int) -> str:
        requested.append((audience, seconds))
        return "jwt"

    folders = materialize_volumes(pod, tmp_path / "pod", tmp_path / "claims", "ip", fetch, token)
    folder = folders["kube-api-access"]
    assert (folder / "token").read_text() == "jwt"
    assert requested == [(None, 3607)]
    assert (folder / "m").read_text() == "fast"
    assert (folder / "namespace").read_text() == "ns"
    assert (folder / "labels").read_text() == 'app="web"\ntier="front"'


@pytest.mark.parametrize(
    ("volume", "error", "message"),
    [
        ({"hostPath": {"path": "/etc"}}, PodSpecError, "hostPath is not supported"),
        ({"nfs": {"server": "x", "path": "/"}}, PodSpecError, "nfs is not supported"),
        ({"configMap": {"name": "nope"}}, MissingReference, "ConfigMap nope not found"),
        (
            {"secret": {"secretName": "creds", "items": [{"key": "nope", "path": "p"}]}},
            MissingReference,
            "key 'nope' not in Secret creds",
        ),
    ],
)
def test_unsupported_or_missing_volumes_are_clear_errors(
    tmp_path: Path, volume: dict[str, Any], error: type[Exception], message: str
) -> None:
    pod = pod_with_volumes({"name": "v", **volume})
    with pytest.raises(error, match=message):
        materialize_volumes(pod, tmp_path / "pod", tmp_path / "claims", "ip", fetch, no_token)


def test_mounts_map_mount_paths_to_folders_with_sub_paths(tmp_path: Path) -> None:
    volumes = {"config": tmp_path / "config", "scratch": tmp_path / "scratch"}
    container = {
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {"name": "scratch", "mountPath": "/cache", "subPath": "cache"},
            {"name": "scratch", "mountPath": "/logs", "subPathExpr": "logs/$(POD_NAME)"},
        ]
    }
    mounts = mount_map(container, volumes, {"POD_NAME": "web-1"})
    assert mounts == {
        "/etc/app": tmp_path / "config",
        "/cache": tmp_path / "scratch" / "cache",
        "/logs": tmp_path / "scratch" / "logs" / "web-1",
    }
    assert (tmp_path / "scratch" / "logs" / "web-1").is_dir()
    with pytest.raises(PodSpecError, match="no volume 'other'"):
        mount_map({"volumeMounts": [{"name": "other", "mountPath": "/x"}]}, volumes, {})


# -- addresses, Services, status --------------------------------------------------------


def test_addresses_are_stable_unique_and_in_the_network() -> None:
    first = allocate_ip("ns/web-1", POD_NETWORK, set())
    assert first == allocate_ip("ns/web-1", POD_NETWORK, set())
    assert ipaddress.IPv4Address(first) in POD_NETWORK
    assert allocate_ip("ns/web-1", POD_NETWORK, {first}) != first
    tiny = ipaddress.IPv4Network("127.9.9.0/30")  # .0 is skipped: .1, .2 and .3 are left
    taken: set[str] = set()
    for index in range(3):
        taken.add(allocate_ip(f"k{index}", tiny, taken))
    assert taken == {"127.9.9.1", "127.9.9.2", "127.9.9.3"}
    with pytest.raises(RuntimeError, match="no free address"):
        allocate_ip("k9", tiny, taken)


def test_service_selectors_and_target_ports() -> None:
    assert selects({"spec": {"selector": {"app": "web"}}}, POD)
    assert not selects({"spec": {"selector": {"app": "web", "tier": "back"}}}, POD)
    assert not selects({"spec": {}}, POD)  # no selector: endpoints are managed by hand
    assert target_port(POD, {"port": 80}) == 80
    assert target_port(POD, {"port": 80, "targetPort": 8080}) == 8080
    assert target_port(POD, {"port": 80, "targetPort": "http"}) == 8080
    assert target_port(POD, {"port": 80, "targetPort": "grpc"}) is None


def test_a_pod_prefers_the_service_with_the_most_specific_selector() -> None:
    services = {
        "all": {"spec": {"selector": {"app": "web"}}},
        "front": {"spec": {"selector": {"app": "web", "tier": "front"}}},
        "aaa": {"spec": {"selector": {"tier": "front"}}},
        "back": {"spec": {"selector": {"app": "web", "tier": "back"}}},
        "manual": {"spec": {}},
    }
    assert backed_services(services, POD) == ["front", "aaa", "all"]


def test_terminal_status_is_succeeded_only_when_every_container_exited_zero() -> None:
    pod = {"spec": {"initContainers": [{"name": "init"}], "containers": [{"name": "c"}]}}
    ok = Outcome(exit_code=0, restarts=2, started=0.0, finished=1.0)
    done = terminal_status(pod, {"init": ok, "c": ok})["status"]
    assert done["phase"] == "Succeeded"
    terminated = done["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert done["containerStatuses"][0]["restartCount"] == 2
    assert {c["type"]: c["status"] for c in done["conditions"]} == {
        "Ready": "False",
        "ContainersReady": "False",
    }

    failed_init = Outcome(exit_code=3, restarts=0, started=0.0, finished=1.0)
    failed = terminal_status(pod, {"init": failed_init})["status"]
    assert failed["phase"] == "Failed"
    assert failed["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Error"
    assert failed["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
