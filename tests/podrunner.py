"""Run the pods of a kwok cluster for real, as local processes (for tests).

kwok plays the kubelet but executes nothing: a pod bound to a kwok node is
marked Running and that is all. A test against such a cluster proves that the
operator *wrote* its objects, not that they *work*. ``PodRunner`` closes the
gap: it follows one namespace and runs every scheduled pod's containers on
this machine, close enough to a kubelet that what the operator writes
(commands, env, ConfigMap and Secret volumes, Service DNS names, restart
policies) is exercised end to end::

    with PodRunner(api_client, namespace, tmp_path / "pods") as runner:
        ...  # create objects; their pods now really run
        wait_for(lambda: "ready" in runner.log("web-abc12"))

How a pod maps onto this machine
--------------------------------
* Images are ignored: ``command + args`` run as a local process (an image's
  own entrypoint is unknown, so a container without ``command`` is an
  error); ``command[0]`` is looked up on ``path_dirs`` (the venv's ``bin``
  by default), then on PATH. An absolute ``command[0]`` that does not exist
  here (``/usr/local/bin/python``) is looked up by its basename.
* The environment is built only from the container's ``env`` and ``envFrom``,
  plus PATH, HOSTNAME (the pod's name, as a kubelet sets it) and
  ``extra_env`` (which wins), so nothing leaks in from the test process.
* Volumes are folders under ``workdir/<pod>/volumes``; a PersistentVolumeClaim
  is a folder ``workdir/claims/<claim>`` that outlives its pods, as a PV would.
  A mountPath means nothing here, so every occurrence of one in argv, env
  values and ``workingDir`` is rewritten to its folder (longest first). A
  program that opens a mount path nobody told it about (a compiled-in
  default) does not find the volume. The one exception is the service-account
  token's fixed path: where it is mounted, ``KUBECONFIG`` points at a file
  with that token, CA and namespace, so a client that falls back from
  in-cluster to ``$KUBECONFIG`` (kubectl, the kubernetes client, kopf) acts
  as the pod's ServiceAccount.

Networking
----------
Linux routes all of 127.0.0.0/8 to ``lo``, so every pod gets an address of
its own and servers that bind ``$(POD_IP)`` (as the operator's do) never
collide. Every Service gets an address in ``SERVICE_NETWORK`` and every pod
one in ``POD_NETWORK``, both hashed from the name (probing on a collision),
so they are stable from run to run. A pod that backs a Service (is matched by
its selector when the pod starts) takes *the Service's* address instead, so a
client reaches the server directly at the Service's name:

* of the Services selecting it (most specific selector first, then by name)
  it takes the first whose address is free;
* if a pod that is being deleted still holds that address (the old pod when
  a Deployment's pod is replaced), the new pod waits until the old one's
  processes are gone (at most MAX_GRACE_S), then takes the address over;
* if a live pod holds it (a second replica, or the new pod of a rolling
  update seen before the old one is deleted), it tries the next Service and
  otherwise gets an address of its own.

Where a Service's address and port are not served directly by a backend
(``port`` differs from ``targetPort``, a second Service selecting the same
pod, a Service created after its pod started, the other replicas once the
holder left), a small TCP proxy listens on ``service-IP:port`` and forwards
to the live backends' ``pod-IP:targetPort`` (round robin, TCP only). With
two replicas both alive, the Service reaches only the one holding its
address. That is also why servers must bind ``$(POD_IP)``: a wildcard
``0.0.0.0`` bind collides with every other pod and proxy on the same port.
A pod re-created under the name of one still stopping waits for it too
(they share ``workdir/<pod>``).

Service DNS names in argv and env values are rewritten to the Service's
address when the container starts (see ``rewrite_service_names``).
``NAME.NS.svc[.cluster.local]`` is rewritten even before the Service exists
(its address is reserved by name); ``NAME.NS`` and a bare ``NAME`` (only as
a URL host or ``NAME:PORT``) only for Services that exist at that moment.
Names inside files are not rewritten, nor those of other namespaces, except
the ``NAME.NS.svc[.cluster.local]`` names of a ``peers`` runner's namespace:
two runners, one per namespace, stand for two sites (clusters) that reach
each other's Services by address.

Pod status
----------
kwok still owns the pod's status while it runs (Running, Ready). When all of
a pod's containers are finished for good (``Never``, or ``OnFailure`` after
exit 0), the runner patches the status subresource to ``Succeeded`` or
``Failed`` with terminated container statuses. kwok (with the stages-fast
set) leaves that alone: its pod-ready stage only matches Pending pods and its
pod-complete stage only Job-owned Running ones. To be safe against a pod-ready
update still in flight, the patch waits until the pod has left Pending.
kwok's pod-complete stage marks a Job's pods Succeeded at once, without
waiting for anything; the runner runs Job-owned pods all the same, but the
Job controller has then already counted them as done.

Not modelled: probes (kwok reports Ready), resources and securityContext,
sidecar init containers (an error), ``resourceFieldRef`` (an error), the
``*_SERVICE_HOST`` env of enableServiceLinks, UDP Service ports, and the pod
IP in the API (``status.podIP`` there stays kwok's; only fieldRefs and the
runner see the loopback address). Connections leave from 127.0.0.1, not from
the client pod's address.

The pure functions below (env resolution, ``$(VAR)`` expansion, volume
materialization, path and DNS-name rewriting, argv construction, address
allocation) take plain manifest dicts and need no cluster.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

Manifest = dict[str, Any]
# fetch(kind, name) -> the object's data with values as bytes, or None if it does
# not exist; kind is "ConfigMap" or "Secret".
Fetch = Callable[[str, str], "dict[str, bytes] | None"]
# token(audience, expirationSeconds) -> a service-account token for the pod.
TokenSource = Callable[["str | None", int], str]

SERVICE_NETWORK = ipaddress.IPv4Network("127.64.0.0/10")
POD_NETWORK = ipaddress.IPv4Network("127.128.0.0/9")
HOST_IP = "127.0.0.1"  # what status.hostIP resolves to
POLL_INTERVAL_S = 0.1
MAX_GRACE_S = 3.0  # cap on terminationGracePeriodSeconds (default 30)
MAX_BACKOFF_S = 2.0  # cap on the restart back-off (a kubelet's is 5 minutes)
FIRST_BACKOFF_S = 0.1
CANNOT_RUN_EXIT_CODE = 127  # recorded when a command cannot be executed at all
PHASE_WAIT_S = 5.0  # how long a terminal status patch waits for kwok to leave Pending
TERMINAL_PHASES = ("Succeeded", "Failed")
DEFAULT_MODE = 0o644  # a volume file's mode without mode/defaultMode, as in Kubernetes
VOLUMES_DIR = "volumes"
CLAIMS_DIR = "claims"


class PodSpecError(Exception):
    """A pod the runner cannot run as written (unsupported volume, no command...)."""


class MissingReference(PodSpecError):
    """A ConfigMap, Secret or key the pod needs does not exist (yet).

    As a kubelet does, the runner retries such a pod until it appears: the
    operator may well create the ConfigMap after the Deployment.
    """


# -- $(VAR) expansion -------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion, as in command, args and env values.

    ``$(VAR)`` becomes the value of VAR if it is defined and stays as written
    otherwise; ``$$`` is an escaped ``$``; any other ``$`` is kept. A port of
    k8s.io/kubernetes third_party/forked/golang/expansion.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            following = text[cursor + 1]
            if following == "$":
                out.append("$")
                advance = 1
            elif following == "(":
                closer = text.find(")", cursor + 2)
                if closer == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : closer]
                    out.append(env.get(name, f"$({name})"))
                    advance = closer - cursor
            else:
                out.append("$" + following)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


# -- env ---------------------------------------------------------------------------------


def decode_data(obj: Manifest) -> dict[str, bytes]:
    """A ConfigMap's ``data``/``binaryData`` or a Secret's ``data`` as bytes (base64 decoded)."""
    values: dict[str, bytes] = {}
    if obj.get("kind") == "Secret":
        for key, value in (obj.get("data") or {}).items():
            values[key] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            values[key] = value.encode()
        return values
    for key, value in (obj.get("data") or {}).items():
        values[key] = value.encode()
    for key, value in (obj.get("binaryData") or {}).items():
        values[key] = base64.b64decode(value)
    return values


def _text(value: bytes) -> str:
    """Bytes as an env value; undecodable bytes survive (as os.fsencode reverses)."""
    return value.decode("utf-8", "surrogateescape")


def _format_map(values: Mapping[str, str]) -> str:
    """A label or annotation map as the downward API writes it: ``key="value"`` lines."""
    return "\n".join(f"{key}={json.dumps(values[key])}" for key in sorted(values))


def field_value(pod: Manifest, field_path: str, pod_ip: str) -> str:
    """The value of a downward-API ``fieldRef`` for ``pod`` running at ``pod_ip``."""
    metadata = pod.get("metadata", {})
    spec = pod.get("spec", {})
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.*)'\]", field_path)
    if match:
        return (metadata.get(match[1]) or {}).get(match[2], "")
    simple: dict[str, str] = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "metadata.labels": _format_map(metadata.get("labels") or {}),
        "metadata.annotations": _format_map(metadata.get("annotations") or {}),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if field_path not in simple:
        raise PodSpecError(f"fieldRef {field_path!r} is not supported by the pod runner")
    return simple[field_path]


def _key_ref(ref: Manifest, kind: str, fetch: Fetch) -> str | None:
    """A configMapKeyRef/secretKeyRef value; None when it is optional and missing."""
    data = fetch(kind, ref["name"])
    if data is not None and ref["key"] in data:
        return _text(data[ref["key"]])
    if ref.get("optional"):
        return None
    what = (
        f"{kind} {ref['name']}" if data is None else f"key {ref['key']!r} in {kind} {ref['name']}"
    )
    raise MissingReference(f"{what} not found")


def value_from(source: Manifest, pod: Manifest, pod_ip: str, fetch: Fetch) -> str | None:
    """An env entry's ``valueFrom``; None when an optional reference is missing."""
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"], pod_ip)
    if "configMapKeyRef" in source:
        return _key_ref(source["configMapKeyRef"], "ConfigMap", fetch)
    if "secretKeyRef" in source:
        return _key_ref(source["secretKeyRef"], "Secret", fetch)
    raise PodSpecError(f"valueFrom {sorted(source)} is not supported by the pod runner")


def resolve_env(container: Manifest, pod: Manifest, pod_ip: str, fetch: Fetch) -> dict[str, str]:
    """The container's own environment, as a kubelet builds it (no PATH, no extras).

    ``envFrom`` sources first (in order, each key with the source's prefix),
    then ``env`` entries, which override; a literal ``value`` may refer to
    anything defined before it with ``$(VAR)``.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else ("Secret", source["secretRef"])
        )
        data = fetch(kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise MissingReference(f"{kind} {ref['name']} (envFrom) not found")
        prefix = source.get("prefix", "")
        for key, value in data.items():
            env[prefix + key] = _text(value)
    for entry in container.get("env") or []:
        if "valueFrom" in entry:
            value = value_from(entry["valueFrom"], pod, pod_ip, fetch)
            if value is not None:
                env[entry["name"]] = value
        else:
            env[entry["name"]] = expand(entry.get("value", ""), env)
    return env


# -- rewriting paths and names ---------------------------------------------------------


SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def rewrite_mount_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Replace every mountPath in ``text`` by its local folder, longest mountPath first.

    A mountPath counts only as a whole path prefix: ``/data`` is rewritten in
    ``/data``, ``/data/x`` and ``--dir=/data``, not in ``/database`` or
    ``/srv/data``.
    """
    paths = sorted((p.rstrip("/") for p in mounts if p.rstrip("/")), key=len, reverse=True)
    if not paths:
        return text
    local = {p.rstrip("/"): str(path) for p, path in mounts.items()}
    pattern = r"(?<![\w.~/-])(" + "|".join(re.escape(p) for p in paths) + r")(?![\w.~-])"
    return re.sub(pattern, lambda m: local[m[1]], text)


_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"


def rewrite_service_names(
    text: str,
    namespace: str,
    services: Mapping[str, str],
    reserve: Callable[[str], str] | None = None,
) -> str:
    """Replace the DNS names of Services (``name -> IP``) in ``text`` by their IPs.

    Rewritten: ``NAME.NAMESPACE.svc.cluster.local``, ``NAME.NAMESPACE.svc``
    and ``NAME.NAMESPACE`` anywhere as a whole host name, and a bare ``NAME``
    where it is a URL's host (``//NAME:``, ``//NAME/``, ``//NAME`` at the end)
    or precedes a port (``NAME:8080``). The fully qualified ``.svc`` forms of
    a name not (yet) in ``services`` are rewritten to ``reserve(name)``.
    """
    ns = re.escape(namespace)
    qualified = (
        rf"(?<![\w.-])(?P<fq>{_DNS_LABEL})\.{ns}(?P<svc>\.svc(?:\.cluster\.local)?)?"
        r"(?![\w-]|\.[\w-])"
    )
    alternatives = [qualified]
    if services:
        names = "|".join(re.escape(n) for n in sorted(services, key=len, reverse=True))
        alternatives.append(rf"(?<=//)(?P<url>{names})(?=[:/?#]|$)")
        alternatives.append(rf"(?<![\w.-])(?P<hostport>{names})(?=:\d)")

    def replace(match: re.Match[str]) -> str:
        name = match["fq"] or match["url"] or match["hostport"]
        if name in services:
            return services[name]
        if match["svc"] and reserve is not None:
            return reserve(name)
        return match[0]

    return re.sub("|".join(alternatives), replace, text)


# -- argv --------------------------------------------------------------------------------


def search_path(path_dirs: Sequence[Path]) -> str:
    """PATH for the containers: ``path_dirs`` first, then this process's PATH."""
    return os.pathsep.join([*(str(d) for d in path_dirs), os.environ.get("PATH", os.defpath)])


def resolve_executable(name: str, path: str) -> str:
    """``command[0]`` as a local file: looked up on ``path`` unless it is a path here.

    An absolute path that does not exist here (an image's ``/usr/local/bin/x``)
    is looked up by its basename.
    """
    if "/" in name and os.access(name, os.X_OK) and not os.path.isdir(name):
        return name
    found = shutil.which(os.path.basename(name), path=path)
    if found is None:
        raise PodSpecError(f"command {name!r} not found on {path}")
    return found


def build_argv(
    container: Manifest, env: Mapping[str, str], rewrite: Callable[[str], str], path: str
) -> list[str]:
    """``command + args`` with ``$(VAR)`` expanded, then rewritten, ``command[0]`` resolved.

    Expansion uses the container's env *before* rewriting, so a rewritten
    path is never rewritten a second time.
    """
    command = container.get("command") or []
    if not command:
        raise PodSpecError(
            f"container {container['name']} has no command "
            "(an image's entrypoint is unknown to the pod runner)"
        )
    argv = [rewrite(expand(part, env)) for part in [*command, *(container.get("args") or [])]]
    argv[0] = resolve_executable(argv[0], path)
    return argv


# -- volumes ---------------------------------------------------------------------------


def _write_file(path: Path, content: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)


def _project_keys(
    folder: Path, kind: str, ref: Manifest, name: str, fetch: Fetch, what: str, mode: int
) -> None:
    """Write a ConfigMap's or Secret's keys (all, or ``items`` key -> path) as files.

    File modes follow ``mode``/``defaultMode`` (so a script can be executable).
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = fetch(kind, name)
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return
        raise MissingReference(f"{what}: {kind} {name} not found")
    items = ref.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise MissingReference(f"{what}: key {item['key']!r} not in {kind} {name}")
        _write_file(folder / item["path"], data[item["key"]], item.get("mode", mode))


def _project_downward(
    folder: Path, items: Iterable[Manifest], pod: Manifest, pod_ip: str, mode: int
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        if "fieldRef" not in item:
            raise PodSpecError(f"downwardAPI item {item.get('path')!r}: only fieldRef is supported")
        value = field_value(pod, item["fieldRef"]["fieldPath"], pod_ip)
        _write_file(folder / item["path"], value.encode(), item.get("mode", mode))


def _project_sources(
    folder: Path,
    sources: Iterable[Manifest],
    pod: Manifest,
    pod_ip: str,
    fetch: Fetch,
    token: TokenSource,
    what: str,
    mode: int,
) -> None:
    """A ``projected`` volume: ConfigMap, Secret, downward API and token sources in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if "configMap" in source:
            ref = source["configMap"]
            _project_keys(folder, "ConfigMap", ref, ref["name"], fetch, what, mode)
        elif "secret" in source:
            ref = source["secret"]
            _project_keys(folder, "Secret", ref, ref["name"], fetch, what, mode)
        elif "downwardAPI" in source:
            items = source["downwardAPI"].get("items") or []
            _project_downward(folder, items, pod, pod_ip, mode)
        elif "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            jwt = token(ref.get("audience"), int(ref.get("expirationSeconds", 3600)))
            _write_file(folder / ref["path"], jwt.encode(), mode)
        else:
            raise PodSpecError(f"{what}: projected source {sorted(source)} is not supported")


def materialize_volumes(
    pod: Manifest,
    root: Path,
    claims: Path,
    pod_ip: str,
    fetch: Fetch,
    token: TokenSource,
) -> dict[str, Path]:
    """Create the pod's volumes as local folders; return ``volume name -> folder``.

    Per-pod volumes go to ``root/<volume>``, emptied first (a new pod starts
    with empty emptyDirs); a PersistentVolumeClaim is ``claims/<claimName>``
    and is kept. Raises PodSpecError for a volume type the runner cannot
    provide (hostPath, nfs, ...), MissingReference for a missing ConfigMap or
    Secret that is not optional.
    """
    folders: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        what = f"volume {name}"
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        if "emptyDir" in volume or "ephemeral" in volume:
            folder.mkdir(parents=True)
        elif "configMap" in volume:
            ref = volume["configMap"]
            mode = ref.get("defaultMode", DEFAULT_MODE)
            _project_keys(folder, "ConfigMap", ref, ref["name"], fetch, what, mode)
        elif "secret" in volume:
            ref = volume["secret"]
            mode = ref.get("defaultMode", DEFAULT_MODE)
            _project_keys(folder, "Secret", ref, ref["secretName"], fetch, what, mode)
        elif "projected" in volume:
            sources = volume["projected"].get("sources") or []
            mode = volume["projected"].get("defaultMode", DEFAULT_MODE)
            _project_sources(folder, sources, pod, pod_ip, fetch, token, what, mode)
        elif "downwardAPI" in volume:
            items = volume["downwardAPI"].get("items") or []
            mode = volume["downwardAPI"].get("defaultMode", DEFAULT_MODE)
            _project_downward(folder, items, pod, pod_ip, mode)
        elif "persistentVolumeClaim" in volume:
            folder = claims / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodSpecError(f"{what}: type {', '.join(kinds)} is not supported")
        folders[name] = folder
    return folders


def mount_map(
    container: Manifest, volumes: Mapping[str, Path], env: Mapping[str, str]
) -> dict[str, Path]:
    """``mountPath -> local path`` for the container's ``volumeMounts`` (with subPath).

    A subPath that does not exist yet is created as a folder, as a kubelet does.
    """
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise PodSpecError(f"volumeMount {mount['mountPath']}: no volume {mount['name']!r}")
        local = volumes[mount["name"]]
        sub_path = mount.get("subPath") or expand(mount.get("subPathExpr", ""), env)
        if sub_path:
            local = local / sub_path
            if not local.exists():
                local.mkdir(parents=True)
        mounts[mount["mountPath"]] = local
    return mounts


# -- addresses and Services ---------------------------------------------------------------


def allocate_ip(key: str, network: ipaddress.IPv4Network, taken: Collection[str]) -> str:
    """A stable address for ``key`` in ``network``: its hash, then the next free one.

    Addresses ending in .0 or .255 are skipped (some tools treat them as special).
    """
    size = network.num_addresses
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size
    for offset in range(size):
        address = network.network_address + (start + offset) % size
        if address.packed[-1] in (0, 255):
            continue
        if str(address) not in taken:
            return str(address)
    raise RuntimeError(f"no free address left in {network}")


def selects(service: Manifest, pod: Manifest) -> bool:
    """Whether ``service``'s selector matches ``pod``'s labels (no selector: never)."""
    selector = service.get("spec", {}).get("selector") or {}
    labels = pod.get("metadata", {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def target_port(pod: Manifest, service_port: Manifest) -> int | None:
    """The container port a Service port forwards to on ``pod`` (a named port looked up)."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


def backed_services(services: Mapping[str, Manifest], pod: Manifest) -> list[str]:
    """The Services that select ``pod``, most specific selector first, then by name."""
    selecting = [name for name, service in services.items() if selects(service, pod)]
    return sorted(selecting, key=lambda n: (-len(services[n]["spec"]["selector"]), n))


def _job_owned(pod: Manifest) -> bool:
    owners = pod.get("metadata", {}).get("ownerReferences") or []
    return any(owner.get("kind") == "Job" for owner in owners)


# -- pod status --------------------------------------------------------------------------


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """How a container ended: its last exit code, restarts and when its last run ran."""

    exit_code: int
    restarts: int
    started: float
    finished: float


def terminal_status(pod: Manifest, outcomes: Mapping[str, Outcome]) -> Manifest:
    """The status patch for a pod whose containers are finished for good.

    Succeeded when every container (init containers included) last exited
    with 0, Failed otherwise. Containers that never ran (after a failed init
    container) are reported as waiting.
    """
    phase = "Succeeded" if all(o.exit_code == 0 for o in outcomes.values()) else "Failed"
    now = _timestamp(time.time())

    def statuses(containers: Iterable[Manifest]) -> list[Manifest]:
        result = []
        for container in containers:
            outcome = outcomes.get(container["name"])
            status: Manifest = {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": outcome.restarts if outcome else 0,
            }
            if outcome is None:
                status["state"] = {"waiting": {"reason": "PodInitializing"}}
            else:
                status["state"] = {
                    "terminated": {
                        "exitCode": outcome.exit_code,
                        "reason": "Completed" if outcome.exit_code == 0 else "Error",
                        "startedAt": _timestamp(outcome.started),
                        "finishedAt": _timestamp(outcome.finished),
                    }
                }
            result.append(status)
        return result

    spec = pod["spec"]
    not_ready = {"status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
    status: Manifest = {
        "phase": phase,
        "conditions": [
            {"type": "Ready", **not_ready},
            {"type": "ContainersReady", **not_ready},
        ],
        "containerStatuses": statuses(spec.get("containers") or []),
    }
    if spec.get("initContainers"):
        status["initContainerStatuses"] = statuses(spec["initContainers"])
    return {"status": status}


# -- processes ---------------------------------------------------------------------------

try:
    _prctl: Any = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:  # not glibc/Linux: children may then outlive a SIGKILLed runner
    _prctl = None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """``preexec_fn``: SIGKILL the child when the thread that started it dies.

    Like fedkube.service.process.die_with_parent, but with prctl looked up once in the
    parent: the runner forks from several threads, and loading a library in a
    child forked from a threaded parent can deadlock on the loader's lock.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the process's whole group (it leads one); quiet if it is gone."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Launch:
    """Everything needed to start one container's process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    policy: str  # restart policy: Always, OnFailure or Never


class ContainerRun:
    """One container: (re)starts its process under the restart policy, records exits."""

    def __init__(self, launch: Launch, pod: PodRun) -> None:
        self.launch = launch
        self.pod = pod
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self.restarts = 0
        self.started = 0.0
        self.finished = 0.0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def outcome(self) -> Outcome:
        return Outcome(self.exit_codes[-1], self.restarts, self.started, self.finished)

    def run(self) -> bool:
        """Run until finished for good or stopped; True if its last exit was 0.

        Called on the thread that then waits for the process, which must
        outlive it (PR_SET_PDEATHSIG is tied to the starting thread).
        """
        while True:
            with self.pod.lock:  # so that PodRun.stop never misses a process
                if self.pod.stopping.is_set():
                    return False
                process = self._spawn()
            if process is None:
                code = CANNOT_RUN_EXIT_CODE
            else:
                code = process.wait()
                _signal_group(process, signal.SIGKILL)  # leftovers, as a kubelet's cgroup kill
            self.finished = time.time()
            self.exit_codes.append(code)
            policy = self.launch.policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return code == 0
            backoff = min(FIRST_BACKOFF_S * 2**self.restarts, MAX_BACKOFF_S)
            if self.pod.stopping.wait(backoff):
                return False
            self.restarts += 1

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """Start the process, output appended to the log; None (and reported) if exec fails."""
        self.started = time.time()
        self.launch.log.parent.mkdir(parents=True, exist_ok=True)
        with self.launch.log.open("ab") as log:
            try:
                self.process = subprocess.Popen(
                    self.launch.argv,
                    env=self.launch.env,
                    cwd=self.launch.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                log.write(f"pod runner: cannot start {self.launch.argv}: {error}\n".encode())
                self.pod.runner.report(self.pod.name, f"container {self.launch.name}: {error}")
                return None
        return self.process


class PodRun:
    """One pod: init containers in turn, then its containers together, then its status."""

    def __init__(
        self,
        runner: PodRunner,
        pod: Manifest,
        ip: str,
        init: list[Launch],
        main: list[Launch],
    ) -> None:
        self.runner = runner
        self.pod = pod  # the latest version seen
        self.name: str = pod["metadata"]["name"]
        self.uid: str = pod["metadata"]["uid"]
        self.ip = ip
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.init = [ContainerRun(launch, self) for launch in init]
        self.main = [ContainerRun(launch, self) for launch in main]
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.done = threading.Event()

    @property
    def containers(self) -> list[ContainerRun]:
        return [*self.init, *self.main]

    def terminating(self) -> bool:
        return self.stopping.is_set() or bool(self.pod["metadata"].get("deletionTimestamp"))

    def alive(self) -> bool:
        """Whether it still holds its address: not finished, or a process still runs."""
        return not self.done.is_set() or any(c.alive() for c in self.containers)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            for container in self.init:
                if not container.run():
                    self._finish(stopped=self.stopping.is_set())
                    return
            threads = [self._in_thread(container) for container in self.main]
            for thread in threads:
                thread.join()
            self._finish(stopped=self.stopping.is_set())
        finally:
            self.done.set()

    def _in_thread(self, container: ContainerRun) -> threading.Thread:
        thread = threading.Thread(
            target=container.run, name=f"{self.name}/{container.launch.name}", daemon=True
        )
        thread.start()
        return thread

    def _finish(self, stopped: bool) -> None:
        if stopped:
            return
        ran = {c.launch.name: c.outcome() for c in self.containers if c.exit_codes}
        self.runner.patch_terminal_status(self, terminal_status(self.pod, ran))

    def stop(self, grace: float) -> None:
        """SIGTERM every process group; SIGKILL what is left after ``grace`` seconds.

        Blocks for up to ``grace``; the runner calls it on a thread of its own.
        """
        with self.lock:
            self.stopping.set()
            processes = [c.process for c in self.containers if c.alive()]
        for process in processes:
            assert process is not None
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            assert process is not None
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)


# -- the TCP proxy for Services ----------------------------------------------------------


class ServiceProxy:
    """Forward connections to ``ip:port`` to one of ``targets`` (round robin)."""

    def __init__(self, ip: str, port: int, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self._next = 0
        self._server = socket.create_server((ip, port))
        threading.Thread(target=self._accept, name=f"proxy-{ip}:{port}", daemon=True).start()

    def close(self) -> None:
        """Stop listening at once (shutdown wakes the blocked accept on Linux)."""
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        targets = list(self.targets)
        self._next += 1
        for index in range(len(targets)):
            target = targets[(self._next + index) % len(targets)]
            try:
                upstream = socket.create_connection(target, timeout=2)
                break
            except OSError:
                continue
        else:
            client.close()  # no live backend: the client sees the connection closed
            return
        upstream.settimeout(None)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes until ``source`` ends, then end ``sink``'s write side."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# -- the runner --------------------------------------------------------------------------


class PodRunner:
    """Run the pods of one namespace as local processes while the context is open.

    Polls pods and Services every POLL_INTERVAL_S on a background thread.
    A pod is run once it has ``spec.nodeName`` and no ``deletionTimestamp``
    (pods first seen in a terminal phase are left alone, except a Job's,
    which kwok marks Succeeded without running them). When a pod gets a
    deletionTimestamp or disappears, its processes get SIGTERM and, after its
    terminationGracePeriodSeconds (at most MAX_GRACE_S), SIGKILL. On exit all
    processes are killed. See the module docstring for how env, volumes,
    addresses and Services map onto this machine.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        namespace: str,
        workdir: Path,
        *,
        label_selector: str | None = None,
        path_dirs: Sequence[Path] = (Path(sys.executable).parent,),
        extra_env: Mapping[str, str] | None = None,
        peers: Sequence[PodRunner] = (),
    ) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.workdir = Path(workdir).resolve()
        self.label_selector = label_selector
        self.path = search_path(path_dirs)
        self.extra_env = dict(extra_env or {})
        self.peers = tuple(peers)
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._runs: dict[str, PodRun] = {}  # by uid, including finished ones
        self._latest: dict[str, PodRun] = {}  # by pod name: the newest run
        self._failed: set[str] = set()  # uids that cannot run (an error was reported)
        self._waiting: dict[str, tuple[str, str]] = {}  # uid -> (pod name, why)
        self.api_errors: list[str] = []  # transient list failures, retried
        self._services: dict[str, Manifest] = {}
        self._service_ips: dict[str, str] = {}  # reserved for the runner's lifetime
        self._pod_ips: dict[str, str] = {}  # pod name -> last address
        self._proxies: dict[tuple[str, int], ServiceProxy] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._failure: BaseException | None = None
        self._stoppers: list[threading.Thread] = []

    # -- context -----------------------------------------------------------------------

    def __enter__(self) -> PodRunner:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            runs = list(self._runs.values())
            proxies = list(self._proxies.values())
            self._proxies.clear()
        for run in runs:
            run.stop(grace=0)
        for run in runs:
            run.thread.join()
        for stopper in self._stoppers:
            stopper.join()
        for proxy in proxies:
            proxy.close()
        if self._failure is not None and exc_type is None:
            raise RuntimeError("the pod runner's poll loop failed") from self._failure

    # -- public helpers -----------------------------------------------------------------

    def log(self, pod: str, container: str | None = None) -> str:
        """A container's output (all runs); without ``container``, all of the pod's, in order."""
        folder = self.workdir / pod
        if container is not None:
            path = folder / f"{container}.log"
            return path.read_text(errors="replace") if path.exists() else ""
        with self._lock:
            run = self._latest.get(pod)
            names = [c.launch.name for c in run.containers] if run else []
        return "".join(self.log(pod, name) for name in names)

    def exit_codes(self, pod: str) -> list[int]:
        """Exit codes of every finished run, by container in spec order (init containers first)."""
        with self._lock:
            run = self._latest.get(pod)
            return [code for c in run.containers for code in c.exit_codes] if run else []

    def restarts(self, pod: str) -> int:
        """How often the pod's containers were restarted, in total."""
        with self._lock:
            run = self._latest.get(pod)
            return sum(c.restarts for c in run.containers) if run else 0

    def running(self) -> set[str]:
        """The names of the pods with a live process."""
        with self._lock:
            runs = list(self._runs.values())
        return {run.name for run in runs if any(c.alive() for c in run.containers)}

    def waiting(self) -> dict[str, str]:
        """Pods seen but not started yet, with the reason (for failure messages)."""
        with self._lock:
            return dict(self._waiting.values())

    def ip_of(self, name: str) -> str:
        """The loopback address of a pod (by name) or else of a Service."""
        with self._lock:
            if name in self._pod_ips:
                return self._pod_ips[name]
            if name in self._services:
                return self._service_ip(name)
        raise KeyError(f"no pod or Service {name!r} known to the pod runner")

    def report(self, pod: str, message: str) -> None:
        """Record an error for ``pod`` (shown in ``errors``)."""
        with self._lock:
            self.errors.append(f"{pod}: {message}")

    # -- the poll loop -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    pods = self._list("pods", self.label_selector)
                    services = self._list("services", None)
                except (ApiException, urllib3.exceptions.HTTPError) as error:
                    if self._stop.is_set():
                        return
                    self._transient(error)
                else:
                    self._reconcile(pods, services)
                self._stop.wait(POLL_INTERVAL_S)
        except BaseException as error:  # re-raised here and by __exit__
            self._failure = error
            raise

    def _transient(self, error: Exception) -> None:
        """A failed list (the apiserver restarting...): kept in ``api_errors``, retried."""
        with self._lock:
            self.api_errors.append(f"listing failed, retrying: {error}")

    def _list(self, kind: str, label_selector: str | None) -> list[Manifest]:
        if kind == "pods":
            response = self.core.list_namespaced_pod(
                self.namespace, label_selector=label_selector, _preload_content=False
            )
        else:
            response = self.core.list_namespaced_service(self.namespace, _preload_content=False)
        return list(json.loads(response.data)["items"])

    def _reconcile(self, pods: list[Manifest], services: list[Manifest]) -> None:
        with self._lock:
            self._services = {s["metadata"]["name"]: s for s in services}
            for service in self._services:
                self._service_ip(service)
            seen = {p["metadata"]["uid"]: p for p in pods}
            for uid, run in self._runs.items():
                pod = seen.get(uid)
                if pod is not None:
                    run.pod = pod
                if (pod is None or pod["metadata"].get("deletionTimestamp")) and (
                    not run.stopping.is_set()
                ):
                    self._stop_run(run)
            for uid in list(self._waiting):
                if uid not in seen or seen[uid]["metadata"].get("deletionTimestamp"):
                    del self._waiting[uid]
            for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
                uid = pod["metadata"]["uid"]
                if uid in self._runs or uid in self._failed or not self._runnable(pod):
                    continue
                self._try_start(pod)
            self._reconcile_proxies()

    @staticmethod
    def _runnable(pod: Manifest) -> bool:
        if not pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            return False
        return pod.get("status", {}).get("phase") not in TERMINAL_PHASES or _job_owned(pod)

    def _stop_run(self, run: PodRun) -> None:
        grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
        stopper = threading.Thread(
            target=run.stop, args=(min(float(grace), MAX_GRACE_S),), daemon=True
        )
        run.stopping.set()  # before the thread runs: no restart slips in meanwhile
        stopper.start()
        self._stoppers.append(stopper)

    # -- starting a pod ------------------------------------------------------------------

    def _try_start(self, pod: Manifest) -> None:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        ip, reason = self._address_for(pod)
        if ip is None:
            self._wait(pod, reason)
            return
        try:
            run = self._prepare(pod, ip)
        except MissingReference as missing:
            self._wait(pod, str(missing))
            return
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            self._wait(pod, f"API error, retrying: {error}")
            return
        except PodSpecError as error:
            self._waiting.pop(uid, None)
            self._failed.add(uid)
            self.report(name, str(error))
            return
        self._waiting.pop(uid, None)
        for key in [key for key in self._proxies if key[0] == ip]:
            self._proxies.pop(key).close()  # the pod serves this address itself now
        self._runs[uid] = run
        self._latest[name] = run
        self._pod_ips[name] = ip
        run.start()

    def _wait(self, pod: Manifest, reason: str) -> None:
        self._waiting[pod["metadata"]["uid"]] = (pod["metadata"]["name"], reason)

    def _live_runs(self) -> list[PodRun]:
        return [run for run in self._runs.values() if run.alive()]

    def _address_for(self, pod: Manifest) -> tuple[str | None, str]:
        """The pod's address, or None and why it has to wait (see the module docstring)."""
        live = self._live_runs()
        name = pod["metadata"]["name"]
        previous = self._latest.get(name)
        if previous is not None and previous.alive():
            # A re-created pod reuses the folder (logs, volumes): the old one goes first.
            return None, f"waiting for the previous pod named {name} to stop"
        holders = {run.ip: run for run in live}
        for service in backed_services(self._services, pod):
            address = self._service_ip(service)
            holder = holders.get(address)
            if holder is None:
                return address, ""
            if holder.terminating():
                return None, f"waiting for pod {holder.name} to release Service {service}'s address"
        taken = set(holders) | set(self._service_ips.values())
        return allocate_ip(f"{self.namespace}/{name}", POD_NETWORK, taken), ""

    def reserve_service_ip(self, name: str) -> str:
        """The address of this runner's Service ``name`` (reserved now if need be)."""
        with self._lock:
            return self._service_ip(name)

    def _service_ip(self, name: str) -> str:
        """The Service's address, reserved by name when first needed (even before it exists)."""
        if name not in self._service_ips:
            taken = set(self._service_ips.values())
            key = f"{self.namespace}/{name}"
            self._service_ips[name] = allocate_ip(key, SERVICE_NETWORK, taken)
        return self._service_ips[name]

    def _prepare(self, pod: Manifest, ip: str) -> PodRun:
        """Volumes, env and argv for every container; raises PodSpecError if it cannot run."""
        name = pod["metadata"]["name"]
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        volumes = materialize_volumes(
            pod,
            folder / VOLUMES_DIR,
            self.workdir / CLAIMS_DIR,
            ip,
            self._fetch,
            lambda audience, seconds: self._token(pod, audience, seconds),
        )
        services = {s: self._service_ip(s) for s in self._services}
        policy = pod["spec"].get("restartPolicy", "Always")

        def launch(container: Manifest, restart_policy: str) -> Launch:
            env = resolve_env(container, pod, ip, self._fetch)
            mounts = mount_map(container, volumes, env)

            def rewrite(text: str) -> str:
                renamed = rewrite_service_names(text, self.namespace, services, self._service_ip)
                for peer in self.peers:  # qualified names only: no bare names across sites
                    renamed = rewrite_service_names(
                        renamed, peer.namespace, {}, peer.reserve_service_ip
                    )
                return rewrite_mount_paths(renamed, mounts)

            argv = build_argv(container, env, rewrite, self.path)
            final_env = {key: rewrite(value) for key, value in env.items()}
            final_env.update({"PATH": self.path, "HOSTNAME": name, **self.extra_env})
            final_env.update(self._in_cluster_identity(mounts, folder, container["name"]))
            log = folder / f"{container['name']}.log"
            log.write_bytes(b"")  # a new pod (a new uid) starts with empty logs
            return Launch(
                name=container["name"],
                argv=argv,
                env=final_env,
                cwd=self._working_dir(container, rewrite, folder),
                log=log,
                policy=restart_policy,
            )

        init_policy = "Never" if policy == "Never" else "OnFailure"
        init = []
        for container in pod["spec"].get("initContainers") or []:
            if container.get("restartPolicy") == "Always":
                raise PodSpecError(
                    f"init container {container['name']}: sidecars (restartPolicy: Always) "
                    "are not supported by the pod runner"
                )
            init.append(launch(container, init_policy))
        main = [launch(c, policy) for c in pod["spec"]["containers"]]
        return PodRun(self, pod, ip, init, main)

    def _in_cluster_identity(
        self, mounts: Mapping[str, Path], folder: Path, container: str
    ) -> dict[str, str]:
        """``KUBECONFIG`` standing in for the kubelet's in-cluster service-account files.

        A client library reads the token and CA from the fixed path
        SERVICE_ACCOUNT_PATH, which the runner cannot put there; it writes a
        kubeconfig with the same token, CA and namespace instead, so a
        program that logs in "in-cluster, else $KUBECONFIG" (as the operator
        does) acts with exactly its ServiceAccount's RBAC.
        """
        account = mounts.get(SERVICE_ACCOUNT_PATH)
        if account is None or not (account / "token").exists():
            return {}
        server = self.core.api_client.configuration.host
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": server,
                        "certificate-authority": str(account / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": "pod", "user": {"token": (account / "token").read_text()}}],
            "contexts": [
                {
                    "name": "in-cluster",
                    "context": {
                        "cluster": "in-cluster",
                        "user": "pod",
                        "namespace": (account / "namespace").read_text().strip(),
                    },
                }
            ],
            "current-context": "in-cluster",
        }
        path = folder / f"{container}.kubeconfig"
        path.write_text(json.dumps(config))
        return {"KUBECONFIG": str(path)}

    @staticmethod
    def _working_dir(container: Manifest, rewrite: Callable[[str], str], folder: Path) -> Path:
        """``workingDir`` rewritten; an image folder that does not exist here goes under the pod.

        Without one the pod's folder is the working directory.
        """
        working_dir = container.get("workingDir")
        if not working_dir:
            return folder
        local = Path(rewrite(working_dir))
        if not local.is_dir():
            local = folder / "root" / working_dir.lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
        return local

    def _fetch(self, kind: str, name: str) -> dict[str, bytes] | None:
        read = (
            self.core.read_namespaced_config_map
            if kind == "ConfigMap"
            else self.core.read_namespaced_secret
        )
        try:
            response = read(name, self.namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return decode_data({"kind": kind, **json.loads(response.data)})

    def _token(self, pod: Manifest, audience: str | None, seconds: int) -> str:
        """A real token for the pod's ServiceAccount, bound to the pod (TokenRequest API)."""
        spec: Manifest = {
            "expirationSeconds": max(seconds, 600),
            "boundObjectRef": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        account = pod["spec"].get("serviceAccountName") or "default"
        try:
            response = self.core.create_namespaced_service_account_token(
                account, self.namespace, {"spec": spec}, _preload_content=False
            )
        except ApiException as error:
            raise PodSpecError(
                f"TokenRequest for ServiceAccount {account} failed: {error}"
            ) from error
        return str(json.loads(response.data)["status"]["token"])

    # -- status --------------------------------------------------------------------------

    def patch_terminal_status(self, run: PodRun, patch: Manifest) -> None:
        """Patch a finished pod's status, once kwok has moved it out of Pending.

        kwok's pod-ready stage (Pending -> Running) could otherwise land after
        our patch and undo it. A pod that is gone or going is left alone.
        """
        deadline = time.monotonic() + PHASE_WAIT_S
        while run.pod.get("status", {}).get("phase", "Pending") == "Pending":
            if time.monotonic() > deadline or run.stopping.wait(POLL_INTERVAL_S):
                break
        if run.terminating():
            return
        try:
            self.core.patch_namespaced_pod_status(
                run.name,
                self.namespace,
                patch,
                _content_type="application/strategic-merge-patch+json",
                _preload_content=False,
            )
        except ApiException as error:
            if error.status != 404:
                self.report(run.name, f"status patch failed: {error}")

    # -- Service proxies -----------------------------------------------------------------

    def _reconcile_proxies(self) -> None:
        """Listen on each Service address:port that no backend serves directly (see docstring)."""
        live = [run for run in self._live_runs() if not run.terminating()]
        wanted: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for name, service in self._services.items():
            address = self._service_ip(name)
            holder = next((run for run in self._live_runs() if run.ip == address), None)
            if holder is not None and holder.terminating():
                continue  # it may still listen there; its successor takes over the address
            backends = [run for run in live if selects(service, run.pod)]
            for port in service["spec"].get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                if holder is not None and target_port(holder.pod, port) == port["port"]:
                    continue
                targets = [
                    (run.ip, target)
                    for run in backends
                    if (target := target_port(run.pod, port)) is not None
                ]
                if targets:
                    wanted[(address, port["port"])] = targets
        for key in [key for key in self._proxies if key not in wanted]:
            self._proxies.pop(key).close()
        for key, targets in wanted.items():
            if key in self._proxies:
                self._proxies[key].targets = targets
                continue
            try:
                self._proxies[key] = ServiceProxy(key[0], key[1], targets)
            except OSError as error:
                message = f"cannot listen on {key[0]}:{key[1]}: {error}"
                if f"(proxy): {message}" not in self.errors:
                    self.errors.append(f"(proxy): {message}")
