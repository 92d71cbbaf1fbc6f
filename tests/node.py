"""A real Kubernetes node on this machine: containerd, runc, CNI, kubelet, kube-proxy, CoreDNS.

``tests/controlplane.py`` gives a real control plane whose nodes are kwok's fakes: pods are
scheduled, and nothing runs them. This module adds the node that runs them, built from the
same sources a cluster is: kubelet and kube-proxy (the control plane's Kubernetes version),
containerd 2 with runc, the reference CNI plugins on a Linux bridge, CoreDNS for Service
names, and a CNCF distribution registry from which containerd pulls fedkube's images, as any
cluster pulls its images (``scripts/build-node.sh`` builds them; ``scripts/build-images.sh``
builds the images). Nothing runs in a container that would not run so on a cluster: the
image's entrypoint, its user, a read-only root filesystem, Service DNS names and ports,
probes, the operator's in-cluster login.

From Python::

    with start_node_cluster(tmp_path / "cluster") as cluster:
        cluster.cp.kubectl("get", "nodes")

From a shell (``make cluster``)::

    .venv/bin/python -m tests.node

which prints ``export KUBECONFIG=...`` and keeps the cluster up until Ctrl-C.

The host, and what is undone
----------------------------
The node needs root. It makes a bridge (``BRIDGE``, the gateway ``NODE_IP`` of the pod
subnet ``POD_SUBNET``), turns on ``ip_forward``, and kubelet and kube-proxy write sysctls,
iptables chains (``KUBE-*``, the bridge plugin's ``CNI-*``), network namespaces, mounts
(secrets, emptyDirs, container root filesystems) and cgroups (``kubepods``). ``stop()``
removes every pod, stops the components and then undoes each of those against what it
recorded at the start: chains and nft tables that did not exist before are deleted, the
sysctls get their old values, leftover mounts are unmounted, the bridge and namespaces
deleted. The same machine session can start a node again afterwards. One node runs at a
time on a machine (a lock in ``/run``), since the bridge, port 53 on it and the chains are
the host's.

kube-apiserver listens on ``NODE_IP`` (the bridge's address), so pods reach it through the
``kubernetes`` Service as on any cluster, and the host reaches it too. CoreDNS answers on
``NODE_IP:53``, the kubelet's ``clusterDNS``. kube-proxy runs in iptables mode.

What stays between runs, under ``CACHE`` (``/var/lib/fedkube/node``, or
``$FEDKUBE_NODE_CACHE``): the registry's storage and containerd's content and snapshots,
so a second run pushes and pulls only the layers that changed (a code change moves
megabytes, not the gigabytes of torch). Like podman's image storage, it belongs to the
machine rather than to a clone.

NetworkPolicy is not enforced here: the bridge plugin implements none (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from fedkube.state.redis_server import free_port
from tests.controlplane import (
    SERVICE_CIDR,
    Component,
    ControlPlane,
    ControlPlaneError,
    _http_ok,
    _launch,
    resolve_bin_dir,
    start_control_plane,
)
from tests.support import ROOT

NODE_NAME = "fedkube-node"
BRIDGE = "fkbr0"
POD_SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
CLUSTER_DOMAIN = "cluster.local"
CNI_NETWORK = "fedkube"
# The registry's storage and containerd's content and snapshots: gigabytes of image layers
# that belong to the machine, like podman's own storage, so that every clone on it (CI's
# fresh one included) reuses them instead of holding copies.
CACHE = Path(os.environ.get("FEDKUBE_NODE_CACHE", "/var/lib/fedkube/node"))
BUILD_NODE = ROOT / "scripts" / "build-node.sh"
BUILD_IMAGES = ROOT / "scripts" / "build-images.sh"
CONTAINERS_CONF = ROOT / "scripts" / "containers.conf"
NODE_BINARIES = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
    "registry",
)
# The registry listens on the bridge's address, which is the node's alone, at a fixed port:
# podman remembers which layers a registry already holds by its address, so a fixed one
# lets a push after a code change skip (and not even recompress) the unchanged gigabytes.
REGISTRY = f"{NODE_IP}:5000"
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = "/usr/sbin/runc"
LOCK_PATH = Path("/run/fedkube-node.lock")
# containerd resolves an unqualified image name (``fedkube:0.1.0``, as the chart writes it)
# in docker.io/library; the node's registry serves that namespace as its mirror, so the
# chart's defaults work unchanged. Nothing is ever fetched from outside.
MIRRORED = "docker.io"
PAUSE_IMAGE = "pause:3.10"
# The images a node loads at start: the sandbox image and fedkube's three.
VERSION = "0.1.0"
IMAGES = (PAUSE_IMAGE, f"fedkube:{VERSION}", f"fedkube-slim:{VERSION}", f"fedkube-redis:{VERSION}")
# Sysctls that the node's components set (kubelet's kernel defaults, kube-proxy's and the
# bridge's forwarding): recorded at the start, put back at the stop.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
IPTABLES = ("iptables", "ip6tables")
TABLES = ("filter", "nat", "mangle", "raw")
STOP_GRACE_S = 10.0


class NodeError(ControlPlaneError):
    """The node could not be built, started, loaded or cleaned up."""


def run(
    *command: str, check: bool = True, input: str | None = None, timeout: float = 600, **kw
) -> subprocess.CompletedProcess[str]:
    """A host command; a failure raises NodeError with its output."""
    done = subprocess.run(
        command, capture_output=True, text=True, input=input, timeout=timeout, **kw
    )
    if check and done.returncode != 0:
        raise NodeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}"
            f"{done.stderr[-4000:]}"
        )
    return done


# -- what the node changes on the host, recorded to be undone ----------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _chains(tool: str, table: str) -> set[str]:
    done = run(f"{tool}-save", "-t", table, check=False)
    return {line[1:].split()[0] for line in done.stdout.splitlines() if line.startswith(":")}


def _nft_tables() -> set[str]:
    if shutil.which("nft") is None:
        return set()
    return set(run("nft", "list", "tables", check=False).stdout.splitlines())


def _netns() -> set[str]:
    path = Path("/var/run/netns")
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


# The kubelet writes containers' logs here whatever its root directory.
POD_LOG_DIRS = (Path("/var/log/pods"), Path("/var/log/containers"))
# containerd's runc shim keeps its state here whatever containerd's own state directory.
RUNTIME_DIRS = (Path("/run/containerd"),)


def _entries(paths: Sequence[Path]) -> set[Path]:
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found |= {path, *path.iterdir()}
    return found


@dataclass
class HostState:
    """What the host looked like before the node started."""

    sysctls: dict[str, str]
    chains: dict[tuple[str, str], set[str]]
    nft_tables: set[str]
    netns: set[str]
    files: set[Path] = field(default_factory=set)

    @classmethod
    def capture(cls) -> HostState:
        sysctls = {}
        for name in SYSCTLS:
            path = _sysctl_path(name)
            if path.exists():
                sysctls[name] = path.read_text().strip()
        chains = {(tool, table): _chains(tool, table) for tool in IPTABLES for table in TABLES}
        return cls(sysctls, chains, _nft_tables(), _netns(), _entries(POD_LOG_DIRS + RUNTIME_DIRS))

    def restore(self, bin_dir: Path, dirs: Sequence[Path]) -> list[str]:
        """Undo what the node changed; returns what could not be undone (empty: all)."""
        problems: list[str] = []
        problems += _kill_pod_processes()
        problems += _unmount_under(dirs)
        for name in sorted(_netns() - self.netns):
            if run("ip", "netns", "delete", name, check=False).returncode != 0:
                problems.append(f"network namespace {name}")
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            if run("ip", "link", "delete", BRIDGE, check=False).returncode != 0:
                problems.append(f"bridge {BRIDGE}")
        run(str(bin_dir / "kube-proxy"), "--cleanup", check=False)
        for (tool, table), before in self.chains.items():
            problems += _drop_new_chains(tool, table, before)
        if shutil.which("nft") is not None:
            for line in sorted(_nft_tables() - self.nft_tables):
                if run("nft", "delete", *line.split(), check=False).returncode != 0:
                    problems.append(f"nft {line}")
        problems += _remove_cgroups()
        for path in sorted(_entries(POD_LOG_DIRS + RUNTIME_DIRS) - self.files, reverse=True):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as error:
                problems.append(f"{path}: {error}")
        for name, value in self.sysctls.items():
            path = _sysctl_path(name)
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as error:
                problems.append(f"sysctl {name}: {error}")
        return problems


def _drop_new_chains(tool: str, table: str, before: set[str]) -> list[str]:
    """Delete the chains of ``table`` that were not there before, and the jumps to them."""
    new = _chains(tool, table) - before
    if not new:
        return []
    saved = run(f"{tool}-save", "-t", table, check=False).stdout.splitlines()
    for line in saved:
        if line.startswith("-A "):
            parts = line.split()
            target = parts[parts.index("-j") + 1] if "-j" in parts else None
            if parts[1] not in new and target in new:
                run(tool, "-t", table, "-D", *parts[1:], check=False)
    for chain in new:
        run(tool, "-t", table, "-F", chain, check=False)
    for chain in new:
        run(tool, "-t", table, "-X", chain, check=False)
    left = _chains(tool, table) - before
    return [f"{tool} -t {table} chain {chain}" for chain in sorted(left)]


def _cgroup_roots() -> list[Path]:
    """Each cgroup hierarchy's mount point (v1 controllers and the v2 mount)."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _device, mount, kind, *_ = line.split()
        if kind in ("cgroup", "cgroup2"):
            roots.append(Path(mount))
    return roots


def _kubepods() -> list[Path]:
    return [root / "kubepods" for root in _cgroup_roots() if (root / "kubepods").is_dir()]


def _kill_pod_processes() -> list[str]:
    """SIGKILL every process left in the kubelet's pod cgroups (a container outliving its shim)."""
    for tree in _kubepods():
        for procs in tree.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    return []


def _remove_cgroups() -> list[str]:
    problems = []
    for tree in _kubepods():
        for directory in sorted(
            (p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        try:
            tree.rmdir()
        except OSError as error:
            problems.append(f"cgroup {tree}: {error}")
    return problems


def _mounts_under(dirs: Sequence[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount = line.split()[4].encode().decode("unicode_escape")
        if any(mount == str(d) or mount.startswith(f"{d}/") for d in dirs):
            found.append(mount)
    return found


def _unmount_under(dirs: Sequence[Path]) -> list[str]:
    for mount in sorted(_mounts_under(dirs), key=lambda m: -m.count("/")):
        if run("umount", mount, check=False).returncode != 0:
            run("umount", "-l", mount, check=False)
    return [f"mount {m}" for m in _mounts_under(dirs)]


# -- the node ------------------------------------------------------------------------------------


@dataclass
class NodeCluster:
    """A control plane with one real node; ``stop()`` it (or use it as a context manager)."""

    cp: ControlPlane
    workdir: Path
    bin_dir: Path
    registry: str
    host: HostState
    components: list[Component] = field(default_factory=list, repr=False)
    startup_s: float = 0.0
    images_s: float = 0.0
    image_load_s: dict[str, float] = field(default_factory=dict)
    _lock: IO[str] | None = field(default=None, repr=False)

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def ctr(self, *args: str, check: bool = True, timeout: float = 900) -> str:
        """Run containerd's ``ctr`` in the CRI namespace (``k8s.io``)."""
        return run(
            str(self.bin_dir / "ctr"),
            "--address",
            str(self.containerd_socket),
            "--namespace",
            "k8s.io",
            *args,
            check=check,
            timeout=timeout,
        ).stdout

    def load_images(self, images: Sequence[str] = IMAGES) -> None:
        """Push podman's images to the node's registry and have containerd pull them.

        As a cluster gets its images: the registry receives only the layers it lacks, and
        containerd fetches only those it lacks, so after a code change this moves fedkube's
        own layer, not torch's. Pulling here rather than at the first pod keeps the tests'
        waits about the pods, not about gigabytes.
        """
        started = time.monotonic()
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        for image in images:
            loading = time.monotonic()
            name, tag = image.split(":")
            run(
                "podman",
                "push",
                "--quiet",
                "--tls-verify=false",
                "--format=oci",
                "--compression-format=zstd",
                f"localhost/{image}",
                f"docker://{self.registry}/library/{name}:{tag}",
                env=env,
                timeout=1800,
            )
            self.ctr(
                "images",
                "pull",
                "--hosts-dir",
                str(self.workdir / "containerd" / "certs.d"),
                f"{MIRRORED}/library/{name}:{tag}",
                timeout=1800,
            )
            self.image_load_s[image] = time.monotonic() - loading
        self.images_s = time.monotonic() - started

    def wait(
        self,
        condition: Callable[[], Any],
        timeout: float = 60,
        what: str = "condition",
        *,
        blame: str = "kubelet",
    ) -> Any:
        """``ControlPlane.wait``, failing early if a node component exits too (the tail of
        ``blame``'s log, a control-plane component's, on a timeout)."""
        return self.cp.wait(
            lambda: self._check_alive(what) or condition(), timeout, what, blame=blame
        )

    def _check_alive(self, what: str) -> None:
        for component in self.components:
            if not component.alive():
                raise NodeError(
                    f"{component.name} exited (code {component.process.returncode}) "
                    f"while waiting for {what}; {component.log}:\n{component.tail()}"
                )

    def stop(self) -> list[str]:
        """Remove every pod, stop everything, undo the host changes; returns what was left.

        The scheduler goes first (no new pod is bound while the old ones go), then every pod
        is deleted through the API and the kubelet stops their containers and sandboxes
        (CNI DEL: veths, addresses); then the components stop, and whatever is still there
        is removed by force.
        """
        problems: list[str] = []
        if self.components and self.cp.components:
            with contextlib.suppress(ControlPlaneError, subprocess.SubprocessError):
                self.cp.component("kube-scheduler").stop()
                self.cp.kubectl(
                    "delete", "pods", "--all", "-A", "--grace-period=0", "--force",
                    "--wait=false", check=False, timeout=60,
                )  # fmt: skip
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self._running_tasks():
                    time.sleep(0.5)
        while self.components:
            self.components.pop().stop(STOP_GRACE_S)
        self.cp.stop()
        problems += self.host.restore(
            self.bin_dir, [self.workdir, CACHE / "containerd", *RUNTIME_DIRS]
        )
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if problems:
            print(f"node: left behind: {problems}", file=sys.stderr)
        return problems

    def _running_tasks(self) -> bool:
        if not self.containerd_socket.exists():
            return False
        listed = self.ctr("tasks", "list", "--quiet", check=False, timeout=30)
        return bool(listed.strip())

    def __enter__(self) -> NodeCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def node_bin_dir() -> Path:
    """The control plane's binaries and the node's, built if missing (build-node.sh)."""
    bin_dir = resolve_bin_dir()
    missing = [name for name in NODE_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if not (pause_binary(bin_dir)).is_file():
        missing.append(str(pause_binary(bin_dir)))
    if missing:
        print(f"node: missing {', '.join(missing)}; running {BUILD_NODE}", file=sys.stderr)
        if subprocess.run([str(BUILD_NODE)], cwd=ROOT).returncode != 0:
            raise NodeError(f"{BUILD_NODE} failed")
    return bin_dir


def pause_binary(bin_dir: Path) -> Path:
    return bin_dir.parent / "share" / "pause" / "pause"


def build_images() -> None:
    """scripts/build-images.sh: seconds when nothing changed, a layer when code did."""
    done = subprocess.run([str(BUILD_IMAGES)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise NodeError(f"{BUILD_IMAGES} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def _lock_host() -> IO[str]:
    lock = LOCK_PATH.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NodeError(f"a fedkube node already runs on this machine ({LOCK_PATH})") from None
    return lock


def _require_root() -> None:
    if os.geteuid() != 0:
        raise NodeError("a real node needs root (bridge, iptables, mounts, cgroups)")
    for tool in ("ip", "iptables", "podman", RUNC):
        if shutil.which(tool) is None:
            raise NodeError(f"{tool} not found (scripts/build-node.sh installs it)")
    if not (CNI_BIN_DIR / "bridge").exists():
        raise NodeError(f"no CNI plugins in {CNI_BIN_DIR} (scripts/build-node.sh installs them)")


def start_node_cluster(
    workdir: Path, *, timeout: float = 180, images: Sequence[str] = IMAGES
) -> NodeCluster:
    """A control plane on ``NODE_IP`` and one real node, Ready, with ``images`` loaded.

    On failure everything started is stopped and the host restored, and the error carries
    the failing component's log tail.
    """
    started = time.monotonic()
    _require_root()
    bin_dir = node_bin_dir()
    lock = _lock_host()
    workdir = workdir.resolve()
    # A node killed without its stop() left its bridge and mounts: undo them first.
    _clear_leftovers(bin_dir, workdir)
    host = HostState.capture()
    try:
        _make_bridge()
        cp = start_control_plane(
            workdir / "control-plane", nodes=0, address=NODE_IP, timeout=timeout
        )
    except BaseException:
        host.restore(bin_dir, [workdir])
        lock.close()
        raise
    cluster = NodeCluster(
        cp=cp,
        workdir=workdir,
        bin_dir=bin_dir,
        registry=REGISTRY,
        host=host,
        _lock=lock,
    )
    try:
        _start_node(cluster, timeout)
        if images:
            cluster.load_images(images)
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_s = time.monotonic() - started
    return cluster


def _clear_leftovers(bin_dir: Path, workdir: Path) -> None:
    if Path(f"/sys/class/net/{BRIDGE}").exists() or _kubepods():
        print("node: clearing what an earlier node left", file=sys.stderr)
        HostState.capture().restore(bin_dir, [workdir, CACHE / "containerd", *RUNTIME_DIRS])


def _make_bridge() -> None:
    """The pods' bridge with the gateway address, before anything binds that address."""
    prefix = POD_SUBNET.split("/")[1]
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    _sysctl_path("net.ipv4.ip_forward").write_text("1")


def _spawn(cluster: NodeCluster, name: str, args: list[str]) -> None:
    cluster.components.append(_launch(cluster.workdir, cluster.bin_dir, name, args))


def _start_node(cluster: NodeCluster, timeout: float) -> None:
    workdir = cluster.workdir
    for name in ("containerd", "kubelet", "kube-proxy", "coredns", "registry"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    (CACHE / "registry").mkdir(parents=True, exist_ok=True)
    (CACHE / "containerd").mkdir(parents=True, exist_ok=True)

    # The registry, containerd's only source of images.
    registry_config = workdir / "registry" / "config.yml"
    registry_config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(CACHE / "registry")},
                    "delete": {"enabled": True},
                },
                "http": {"addr": cluster.registry},
            }
        )
    )
    _spawn(cluster, "registry", ["serve", str(registry_config)])

    # containerd, with runc and the bridge network.
    _write_cni_config(workdir / "containerd" / "cni")
    hosts = workdir / "containerd" / "certs.d" / MIRRORED
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(
        f'server = "http://{cluster.registry}"\n\n'
        f'[host."http://{cluster.registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    config = workdir / "containerd" / "config.toml"
    config.write_text(_containerd_config(cluster))
    _spawn(cluster, "containerd", ["--config", str(config)])
    cluster.wait(
        lambda: (
            cluster.containerd_socket.exists()
            and cluster.ctr("version", check=False, timeout=10).strip() != ""
        ),
        timeout,
        "containerd to answer",
        blame="containerd",
    )
    cluster.wait(
        lambda: _http_ok(f"http://{cluster.registry}/v2/", expect="{}"),
        timeout,
        "the registry",
        blame="registry",
    )

    # kubelet: the node.
    kubeconfig = str(cluster.cp.kubeconfig)
    kubelet_config = workdir / "kubelet" / "config.yaml"
    kubelet_config.write_text(yaml.safe_dump(_kubelet_config(cluster)))
    _spawn(
        cluster,
        "kubelet",
        [
            f"--config={kubelet_config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={workdir / 'kubelet' / 'root'}",
            f"--cert-dir={workdir / 'kubelet' / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--node-labels=fedkube.io/node=real",
            "--v=1",
        ],
    )

    # kube-proxy: Services in iptables mode.
    proxy_config = workdir / "kube-proxy" / "config.yaml"
    proxy_config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "iptables",
                "clientConnection": {"kubeconfig": kubeconfig},
                "hostnameOverride": NODE_NAME,
                "clusterCIDR": POD_SUBNET,
                "bindAddress": NODE_IP,
                "healthzBindAddress": f"127.0.0.1:{free_port()}",
                "metricsBindAddress": f"127.0.0.1:{free_port()}",
                # Leave the host's conntrack table size alone.
                "conntrack": {"maxPerCore": 0, "min": 0},
                "iptables": {"masqueradeAll": True, "syncPeriod": "30s", "minSyncPeriod": "0s"},
            }
        )
    )
    _spawn(cluster, "kube-proxy", [f"--config={proxy_config}", "--v=1"])

    # CoreDNS on the bridge address: Service and pod names of cluster.local.
    corefile = workdir / "coredns" / "Corefile"
    corefile.write_text(
        f"{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n"
        f"  bind {NODE_IP}\n"
        "  errors\n"
        f"  kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
        f"    kubeconfig {kubeconfig}\n"
        "    pods insecure\n"
        "    fallthrough in-addr.arpa ip6.arpa\n"
        "  }\n"
        "  cache 5\n"
        "}\n"
        ".:53 {\n"
        f"  bind {NODE_IP}\n"
        "  errors\n"
        "}\n"
    )
    _spawn(cluster, "coredns", ["-conf", str(corefile), "-dns.port", "53"])

    with cluster.cp.api_client() as client:
        import kubernetes.client

        from tests.controlplane import node_schedulable

        core = kubernetes.client.CoreV1Api(client)
        cluster.wait(lambda: node_schedulable(core, NODE_NAME), timeout, f"node {NODE_NAME} Ready")
        cluster.wait(lambda: _exists_service_account(core), timeout, "the default ServiceAccount")


def _exists_service_account(core) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service_account("default", "default")
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _write_cni_config(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "10-fedkube.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": CNI_NETWORK,
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(directory.parent / "ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                    {"type": "loopback"},
                ],
            },
            indent=2,
        )
    )


def _containerd_config(cluster: NodeCluster) -> str:
    workdir = cluster.workdir / "containerd"
    return f"""\
version = 4
root = "{CACHE / "containerd"}"
state = "{workdir / "state"}"

[plugins."io.containerd.server.v1.grpc"]
  address = "{cluster.containerd_socket}"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "{workdir / "containerd.sock.ttrpc"}"
[plugins."io.containerd.server.v1.debug"]
  address = "{workdir / "debug.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{MIRRORED}/library/{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{workdir / "certs.d"}"

[plugins."io.containerd.cri.v1.runtime"]
  # The kubelet asks for a lower oom_score_adj than an unprivileged sandbox may set.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{workdir / "cni"}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def _kubelet_config(cluster: NodeCluster) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This kind of machine mounts cgroup v1 (with a cgroup2 mount beside it).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{cluster.containerd_socket}",
        "address": NODE_IP,
        "port": free_port(NODE_IP),
        "readOnlyPort": 0,
        "healthzPort": 0,
        # The API server reaches the kubelet (logs, exec) on the bridge only, with no
        # client certificate: a test node, never one that other machines can reach.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",
        "failSwapOn": False,
        "podCIDR": POD_SUBNET,
        "maxPods": 110,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # A busy shared machine must not evict the tests' pods.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
    }


# -- ``make cluster`` ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.node``: a cluster with a real node, images loaded, up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m tests.node", description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / ".cache" / "cluster")
    parser.add_argument(
        "--no-build", action="store_true", help="use the images podman has, as they are"
    )
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    try:
        if not options.no_build:
            print("node: building the images (scripts/build-images.sh)", file=sys.stderr)
            build_images()
        cluster = start_node_cluster(options.dir)
    except (_Stop, KeyboardInterrupt):
        return 130
    except ControlPlaneError as error:
        print(f"node: {error}", file=sys.stderr)
        return 1
    try:
        print(f"export KUBECONFIG={cluster.cp.kubeconfig}")
        print(
            f"export PATH={cluster.bin_dir}:$PATH\n"
            f"# up in {cluster.startup_s:.0f}s (images loaded in {cluster.images_s:.0f}s): "
            f"node {NODE_NAME}, pods on {POD_SUBNET}, Services on {SERVICE_CIDR}; "
            f"logs in {cluster.workdir}; Ctrl-C stops it and cleans up",
            flush=True,
        )
        while True:
            for component in [*cluster.components, *cluster.cp.components]:
                if not component.alive():
                    print(
                        f"node: {component.name} exited; {component.log}:\n{component.tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except (_Stop, KeyboardInterrupt):
        print("node: stopping", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
