"""A real Kubernetes control plane on 127.0.0.1 for tests and for people.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as
child processes, built from source by ``scripts/build-control-plane.sh``.
Nothing is faked above the kubelet: admission, RBAC, garbage collection,
scheduling (including extended resources such as ``nvidia.com/gpu``) and CRDs
behave as on a real cluster. kwok plays the kubelets: it keeps fake nodes
Ready and moves pods bound to them to Running within moments.

Why processes rather than a mocked API: the operator's behaviour depends on
what the real scheduler, garbage collector and API validation do, and a mock
would only repeat our own assumptions back to us.

From Python::

    with start_control_plane(tmp_path / "cp") as cp:
        cp.kubectl("get", "nodes")

From a shell (``make cluster``)::

    .venv/bin/python -m tests.controlplane [--dir DIR] [--nodes N]

which prints ``export KUBECONFIG=...`` and keeps the cluster up until Ctrl-C.

The fake nodes carry NO taint, so plain pods schedule onto them without
tolerations; they are labelled ``type: kwok`` (and, with GPUs,
``fedkube.io/accelerator: nvidia``) for node selectors.

Every child is started with ``PR_SET_PDEATHSIG`` (it is SIGKILLed when its
parent dies). Linux ties that signal to the *thread* that started the child,
so start the control plane from a thread that outlives it (the main thread,
as pytest fixtures and ``__main__`` do).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from types import FrameType
from typing import IO, Any

import kubernetes.client
import kubernetes.config
import yaml
from kubernetes.client.exceptions import ApiException

from fedkube.service.process import die_with_parent
from fedkube.state.redis_server import free_port
from tests.support import ROOT

K8S_VERSION = "v1.35.4"
DEFAULT_BIN_DIR = ROOT / ".cache" / "k8s" / K8S_VERSION / "bin"
BIN_ENV = "FEDKUBE_K8S_BIN"
BUILD_SCRIPT = ROOT / "scripts" / "build-control-plane.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
# Started in this order, stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "fedkube.io/accelerator"
# kwok manages the nodes that carry this annotation (and only those).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# Pod IPs come from POD_CIDR (room for 65k pods); every fake node reports
# NODE_IP, which lies outside it so no pod ever shares the node's address.
# Service IPs come from a third, disjoint range.
POD_CIDR = "10.0.0.0/16"
NODE_IP = "10.1.0.1"
SERVICE_CIDR = "10.96.0.0/16"
# What start_control_plane leaves in a work directory; removed before a start
# so a reused directory (`.cache/cluster`) never resurrects an old cluster.
STATE_PATHS = ("etcd", "certs", "kubeconfig", "tokens.csv", "sa.key", "sa.pub", "helm")
LOCK_FILE = ".lock"
# A port picked by free_port() can be taken by another process before the component binds
# it; the start is then tried again with new ports, this many times in all.
PORT_ATTEMPTS = 3
ADDRESS_IN_USE = "address already in use"
# Shutdown grace before SIGKILL: kube-apiserver can hang on SIGTERM (seen when
# etcd went away at the same moment), so a stop never waits unbounded.
STOP_GRACE_S = 10.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; unlike its base class, ``str()`` shows stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr or ''}".rstrip()


@dataclass
class Component:
    """One child process of the control plane and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)
    # Stopped on purpose (``ControlPlane.stop_apiserver``): not a failure to report.
    stopped: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The end of this component's log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL once ``grace_s`` has passed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ControlPlane:
    """A running loopback control plane; ``stop()`` it (or use it as a context manager)."""

    workdir: Path
    kubeconfig: Path
    server: str
    token: str
    bin_dir: Path
    # Where kube-apiserver listens and what it advertises: loopback, or an address that pods
    # reach too (tests/node.py: the real node's bridge).
    address: str = "127.0.0.1"
    components: list[Component] = field(default_factory=list, repr=False)
    startup_s: float = 0.0
    _lock: IO[str] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """``os.environ`` pointed at this cluster: KUBECONFIG, and the binaries first on PATH.

        For subprocesses that should talk to the cluster as a user would
        (kubectl, helm, the operator); helm keeps its caches in the workdir.
        """
        helm_home = self.workdir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with ``check``, raise KubectlError on failure."""
        return self._run("kubectl", args, input=input, check=check, timeout=timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster; with ``check``, raise KubectlError on failure."""
        return self._run("helm", args, input=input, check=check, timeout=timeout)

    def _run(
        self, tool: str, args: Sequence[str], *, input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), f"--kubeconfig={self.kubeconfig}", *args]
        done = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
        )
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, command, done.stdout, done.stderr)
        return done

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new client configured from the kubeconfig; close it (or use ``with``)."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def add_node(
        self,
        name: str,
        *,
        gpus: int = 4,
        gpu_resource: str = GPU_RESOURCE,
        cpu: str = "32",
        memory: str = "256Gi",
        pods: int = 250,
        labels: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        """Add a kwok fake node and wait until it is Ready and schedulable.

        The node reports ``gpus`` of ``gpu_resource`` in capacity and
        allocatable (what a device plugin would do), so the real scheduler
        counts them. It has no taint; labels: ``type: kwok``,
        ``kubernetes.io/hostname``, ``kubernetes.io/os``, with GPUs
        ``fedkube.io/accelerator: nvidia``, then ``labels``.
        """
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            core.create_node(
                node_manifest(
                    name,
                    gpus=gpus,
                    gpu_resource=gpu_resource,
                    cpu=cpu,
                    memory=memory,
                    pods=pods,
                    labels=labels,
                )
            )
            self.wait(
                lambda: node_schedulable(core, name),
                timeout,
                f"node {name} Ready without taints",
                blame="kwok",
            )

    def wait(
        self,
        condition: Callable[[], Any],
        timeout: float = 60,
        what: str = "condition",
        *,
        blame: str = "kube-apiserver",
    ) -> Any:
        """Poll ``condition`` until truthy, failing early if a component exits.

        On a timeout the error carries the log tail of ``blame`` (the
        component that should have made the condition true).
        """
        deadline = time.monotonic() + timeout
        while True:
            for component in self.components:
                if not component.stopped and not component.alive():
                    raise ControlPlaneError(
                        f"{component.name} exited (code {component.process.returncode}) "
                        f"while waiting for {what}; {component.log}:\n{component.tail()}"
                    )
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out after {timeout}s waiting for {what}; {self._log_tail(blame)}"
                )
            time.sleep(0.1)

    def _log_tail(self, name: str) -> str:
        for component in self.components:
            if component.name == name:
                return f"{component.log}:\n{component.tail()}"
        return f"({name} not started)"

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise ControlPlaneError(f"{name} is not part of this control plane")

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (SIGTERM, as a control-plane upgrade does).

        etcd keeps the data and the other components keep running, retrying
        their connections, as they do on a real cluster while its API server
        restarts. ``start_apiserver`` brings it back. With clients' watches
        open it stops listening at once but tends not to exit; it is then
        SIGKILLed after ``STOP_GRACE_S``, which closes those watches.
        """
        component = self.component("kube-apiserver")
        component.stopped = True
        component.stop()

    def start_apiserver(self, timeout: float = 60) -> None:
        """Start kube-apiserver again with the flags it first had, and wait for /readyz.

        Same port, same etcd, same token file and the same serving
        certificate: ``--cert-dir`` still holds the self-signed pair it made
        on the first start, so the kubeconfig's CA stays valid. Its log goes
        on after the first run's, in the same file. Call it from a thread
        that outlives the cluster (see the module's note on PR_SET_PDEATHSIG).
        """
        old = self.component("kube-apiserver")
        if not old.stopped:
            raise ControlPlaneError("kube-apiserver is running; stop_apiserver() first")
        self.components[self.components.index(old)] = _launch(
            self.workdir, self.bin_dir, old.name, old.args, append=True
        )
        self._wait_ready(timeout)

    def restart_apiserver(self, timeout: float = 60) -> float:
        """``stop_apiserver`` then ``start_apiserver``; returns how long the API was down (s)."""
        down = time.monotonic()
        self.stop_apiserver()
        self.start_apiserver(timeout)
        return time.monotonic() - down

    def _wait_ready(self, timeout: float) -> None:
        self.wait(
            lambda: _http_ok(f"{self.server}/readyz", token=self.token, expect="ok"),
            timeout,
            "kube-apiserver /readyz",
            blame="kube-apiserver",
        )

    def stop(self) -> None:
        """Stop every component in reverse start order (clients first, etcd last). Idempotent."""
        while self.components:
            self.components.pop().stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def node_manifest(
    name: str,
    *,
    gpus: int = 4,
    gpu_resource: str = GPU_RESOURCE,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: int = 250,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node that kwok manages, with its resources already in ``status``.

    The status is sent on create (as a kubelet does when it registers);
    kwok's node-initialize stage keeps capacity/allocatable that are present.
    """
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods)}
    all_labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    if gpus > 0:
        resources[gpu_resource] = str(gpus)
        all_labels[ACCELERATOR_LABEL] = "nvidia"
    all_labels.update(labels or {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def node_schedulable(core: kubernetes.client.CoreV1Api, name: str) -> bool:
    """Ready, and the node-lifecycle taints (``node.kubernetes.io/not-ready``...) are gone.

    A new node gets the not-ready taint at admission; the controller-manager
    lifts it once kwok reports Ready. Until then the scheduler skips the node.
    """
    try:
        node = core.read_node(name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    conditions = node.status.conditions or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    taints = node.spec.taints or []
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in taints)


def resolve_bin_dir() -> Path:
    """The binaries' folder: ``$FEDKUBE_K8S_BIN``, else the build script's output (built if needed).

    An explicit ``FEDKUBE_K8S_BIN`` is never built into: missing binaries there
    are an error, since the build script only writes to its default place.
    """
    override = os.environ.get(BIN_ENV)
    bin_dir = Path(override) if override else DEFAULT_BIN_DIR
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if not kwok_stages(bin_dir).is_file():
        missing.append(str(kwok_stages(bin_dir)))
    if missing and override:
        raise ControlPlaneError(f"{BIN_ENV}={override} lacks: {', '.join(missing)}")
    if missing:
        print(
            f"controlplane: missing {', '.join(missing)}; running {BUILD_SCRIPT} "
            "(a cold build takes about 16 minutes)",
            file=sys.stderr,
            flush=True,
        )
        done = subprocess.run([str(BUILD_SCRIPT)], cwd=ROOT)
        if done.returncode != 0:
            raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {done.returncode}")
    return bin_dir


def kwok_stages(bin_dir: Path) -> Path:
    """The kwok Stage set (``--config``) the build script puts beside the binaries."""
    return bin_dir.parent / "share" / "kwok" / "stages-fast.yaml"


def _lock_workdir(workdir: Path) -> IO[str]:
    """Hold an exclusive lock on the workdir while a cluster runs in it.

    Starting a second cluster in the same directory would delete the first
    one's etcd data under it; the lock turns that into a clear error. The
    kernel drops it when the holder dies, so a crash never leaves it stale.
    """
    lock = (workdir / LOCK_FILE).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ControlPlaneError(f"a control plane is already running in {workdir}") from None
    return lock


def _clear_state(workdir: Path) -> None:
    for name in STATE_PATHS:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name in COMPONENTS:
        (workdir / f"{name}.log").unlink(missing_ok=True)


def _spawn(cp: ControlPlane, name: str, args: list[str]) -> None:
    """Start one component and add it to the control plane (see ``_launch``)."""
    cp.components.append(_launch(cp.workdir, cp.bin_dir, name, args))


def _launch(
    workdir: Path, bin_dir: Path, name: str, args: list[str], *, append: bool = False
) -> Component:
    """Start one component with its output in ``<workdir>/<name>.log``.

    Its own session keeps a terminal's Ctrl-C away from it, so ``stop()``
    decides the order; PR_SET_PDEATHSIG kills it if we die first.
    """
    log = workdir / f"{name}.log"
    with log.open("ab" if append else "wb") as out:
        process = subprocess.Popen(
            [str(bin_dir / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
    return Component(name, process, log, list(args))


def _http_ok(url: str, *, token: str | None = None, expect: str) -> bool:
    """True when GET ``url`` answers 200 with ``expect`` in the body (TLS unverified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200 and expect in response.read().decode()
    except (urllib.error.URLError, OSError):
        return False


def _make_service_account_keys(workdir: Path) -> None:
    """The key pair the apiserver signs (and checks) service-account tokens with."""
    if shutil.which("openssl") is None:
        raise ControlPlaneError("openssl is needed for the service-account keys (apt openssl)")
    for args in (
        ["genrsa", "-out", "sa.key", "2048"],
        ["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    ):
        done = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True)
        if done.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {done.stderr}")


def _write_kubeconfig(cp: ControlPlane) -> None:
    """A token-auth admin kubeconfig that verifies the apiserver's self-signed cert.

    ``certs/apiserver.crt`` holds the serving cert and the throwaway CA that
    signed it (both made by kube-apiserver for ``--cert-dir``); trusting it
    keeps TLS verification on, so clients need no insecure-skip-tls-verify
    (and urllib3 emits no InsecureRequestWarning).
    """
    ca = (cp.workdir / "certs" / "apiserver.crt").read_bytes()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fedkube-test",
                "cluster": {
                    "server": cp.server,
                    "certificate-authority-data": base64.b64encode(ca).decode(),
                },
            }
        ],
        "users": [{"name": "admin", "user": {"token": cp.token}}],
        "contexts": [
            {
                "name": "fedkube-test",
                "context": {"cluster": "fedkube-test", "user": "admin", "namespace": "default"},
            }
        ],
        "current-context": "fedkube-test",
    }
    cp.kubeconfig.write_text(yaml.safe_dump(config))
    cp.kubeconfig.chmod(0o600)


def start_control_plane(
    workdir: Path, *, nodes: int = 2, timeout: float = 120, address: str = "127.0.0.1"
) -> ControlPlane:
    """Start a control plane in ``workdir`` with ``nodes`` GPU nodes; return it once usable.

    Usable means: /readyz is ok, the ``default`` ServiceAccount exists in
    namespace ``default`` (the controller-manager runs; pods can be created)
    and every node is Ready without taints. Nodes are named
    ``kwok-node-0``... with the defaults of ``ControlPlane.add_node``.
    kube-apiserver listens on ``address`` (etcd and the rest on loopback).
    Earlier state in ``workdir`` is deleted. On failure everything started
    is stopped again and the error shows the failing component's log tail;
    a component that lost its port to another process ("address already in
    use") is not a failure: the start is tried again with new ports.
    """
    started = time.monotonic()
    bin_dir = resolve_bin_dir()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock_workdir(workdir)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        cp = ControlPlane(
            workdir=workdir,
            kubeconfig=workdir / "kubeconfig",
            server=f"https://{address}:{free_port(address)}",
            token=token_hex(16),
            bin_dir=bin_dir,
            address=address,
        )
        try:
            _clear_state(workdir)
            _start(cp, nodes, timeout)
        except ControlPlaneError as error:
            cp.stop()
            if ADDRESS_IN_USE in str(error) and attempt < PORT_ATTEMPTS:
                print(f"controlplane: a port was taken ({error}); starting again", file=sys.stderr)
                continue
            lock.close()
            raise
        except BaseException:
            cp.stop()
            lock.close()
            raise
        break
    cp._lock = lock
    cp.startup_s = time.monotonic() - started
    return cp


def _start(cp: ControlPlane, nodes: int, timeout: float) -> None:
    workdir = cp.workdir
    etcd_url = f"http://127.0.0.1:{free_port()}"
    peer_url = f"http://127.0.0.1:{free_port()}"
    _spawn(
        cp,
        "etcd",
        [
            "--name=fedkube",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=fedkube={peer_url}",
            # Throwaway data: durability buys nothing and fsync costs seconds.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    _make_service_account_keys(workdir)  # while etcd starts
    (workdir / "tokens.csv").write_text(f"{cp.token},admin,admin,system:masters\n")
    cp.wait(lambda: _http_ok(f"{etcd_url}/health", expect="true"), timeout, "etcd", blame="etcd")

    _spawn(
        cp,
        "kube-apiserver",
        [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={cp.address}",
            f"--advertise-address={cp.address}",
            f"--secure-port={cp.server.rsplit(':', 1)[1]}",
            f"--cert-dir={workdir / 'certs'}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={workdir / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # A node's name is not in this machine's DNS: reach kubelets (logs, exec) by IP.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
        ],
    )
    cp._wait_ready(timeout)
    _write_kubeconfig(cp)

    kubeconfig = str(cp.kubeconfig)
    delegation = [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        # No serving port: nothing scrapes them, and fixed ports would clash
        # between clusters running side by side.
        "--bind-address=127.0.0.1",
        "--secure-port=0",
        "--leader-elect=false",
    ]
    _spawn(
        cp,
        "kube-controller-manager",
        [
            *delegation,
            f"--service-account-private-key-file={workdir / 'sa.key'}",
            f"--root-ca-file={workdir / 'certs' / 'apiserver.crt'}",
            "--use-service-account-credentials=false",
            # nodeipam needs a cluster CIDR; there is no cloud.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle",
        ],
    )
    _spawn(cp, "kube-scheduler", delegation)
    _spawn(
        cp,
        "kwok",
        [
            f"--kubeconfig={kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--manage-nodes-with-label-selector=",
            f"--config={kwok_stages(cp.bin_dir)}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            "--node-lease-duration-seconds=40",
            "--server-address=",  # no kwok HTTP server (its default port would clash)
        ],
    )

    with cp.api_client() as client:
        core = kubernetes.client.CoreV1Api(client)
        names = [f"kwok-node-{index}" for index in range(nodes)]
        for name in names:
            core.create_node(node_manifest(name))
        cp.wait(
            lambda: _exists(lambda: core.read_namespaced_service_account("default", "default")),
            timeout,
            "the default ServiceAccount",
            blame="kube-controller-manager",
        )
        for name in names:
            cp.wait(
                lambda name=name: node_schedulable(core, name),
                timeout,
                f"node {name} Ready without taints",
                blame="kwok",
            )


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


@contextmanager
def control_plane(workdir: Path, *, nodes: int = 2, timeout: float = 120) -> Iterator[ControlPlane]:
    """``start_control_plane`` as a context manager: stopped on exit."""
    cp = start_control_plane(workdir, nodes=nodes, timeout=timeout)
    try:
        yield cp
    finally:
        cp.stop()


class _Stop(Exception):
    """Raised by the SIGTERM/SIGHUP handler so ``main`` unwinds as on Ctrl-C."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.controlplane``: a cluster for people, up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / ".cache" / "cluster")
    parser.add_argument("--nodes", type=int, default=2)
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    try:
        cp = start_control_plane(options.dir, nodes=options.nodes)
    except (_Stop, KeyboardInterrupt):
        return 130
    except ControlPlaneError as error:
        print(f"controlplane: {error}", file=sys.stderr)
        return 1
    try:
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(
            f"# up in {cp.startup_s:.1f}s with {options.nodes} kwok GPU nodes; "
            f"kubectl is {cp.bin_dir / 'kubectl'}; logs in {cp.workdir}; Ctrl-C stops it",
            flush=True,
        )
        while True:
            for component in cp.components:
                if not component.alive():
                    print(
                        f"controlplane: {component.name} exited; {component.log}:\n"
                        f"{component.tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except (_Stop, KeyboardInterrupt):
        print("controlplane: stopping", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
