"""Place the same services as Ray actors: ``fedkube run --runtime ray``.

Each service (global aggregator, combiners, workers) runs its ordinary CLI
entrypoint inside a Ray actor, so the code path is the one the pods run. On a
local Ray (the default) everything binds to loopback; with ``--ray-address``
the services bind to all interfaces of their node and are reached at the
node's IP, and Redis is started on the driver's node IP. The cluster's nodes
need fedkube installed (the same image the chart uses).

Placement is by resource requests (:func:`actor_options`): every service asks
for a little CPU, a worker for its tenant's GPUs (``resources.gpu``), and a
region's combiner and workers for a sliver of the custom resource
``region-<name>`` when some node of the cluster offers it, so that a cluster
whose nodes are started with ``--resources '{"region-eu": 8}'`` runs each
region's services on that region's nodes. A cluster without such resources
(a local Ray) places them anywhere.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from fedkube.errors import FedkubeError, SpecError
from fedkube.service.logs import LOG_FILE_ENV
from fedkube.spec import FederatedJob, load_job

# What one service actor reserves of a node's CPUs: the services mostly wait
# on HTTP and Redis, and a worker trains in bursts (OMP_NUM_THREADS shares the
# cores out), so a small share lets a whole job fit on a laptop's Ray.
SERVICE_CPUS = 0.1
# How much of its region's custom resource a service asks for: only a marker
# that pins it to the region's nodes (8 per node is room for 8000 services).
REGION_SHARE = 0.001
# How long a started actor may take to be placed and report its node.
PLACEMENT_TIMEOUT_S = 120.0


def region_resource(region: str) -> str:
    """The Ray custom resource that marks a node as one of ``region``'s."""
    return f"region-{region}"


def _flag(argv: Sequence[str], name: str) -> str:
    if name not in argv or argv.index(name) + 1 >= len(argv):
        raise FedkubeError(f"{argv[0]}: no {name} in its arguments")
    return str(argv[argv.index(name) + 1])


def _needs(argv: Sequence[str], job: FederatedJob) -> tuple[str | None, int, int | None]:
    """The region a service belongs to, the GPUs it asks for and its tenant's index."""
    command = argv[0]
    if command == "combiner":
        return _flag(argv, "--region"), 0, None
    if command != "worker":
        return None, 0, None
    name = _flag(argv, "--group" if "--group" in argv else "--client")
    group = next((g for g in job.worker_groups() if g.name == name), None)
    if group is None:
        raise FedkubeError(f"worker {name}: no such client or worker group in job {job.name!r}")
    index = next(i for i, t in enumerate(job.spec.tenants) if t.name == group.tenant)
    return group.region, job.spec.tenants[index].resources.gpu, index


def actor_options(
    argv: Sequence[str], job: FederatedJob, nodes: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    """Ray actor options for the service that ``argv`` (its CLI arguments) starts.

    ``nodes`` holds the resources of each alive node of the cluster
    (``ray.nodes()[i]["Resources"]``). What the cluster does not offer at all
    is not asked for, so a plain local Ray runs everything:

    * a combiner (``--region``) and a worker (``--client`` or ``--group``, whose tenant names
      the region) ask for ``REGION_SHARE`` of ``region-<name>`` when some node
      has that resource;
    * a worker whose tenant asks for GPUs (``resources.gpu``) asks Ray for them
      when some node has GPUs (none anywhere: it trains on CPU, as the field
      says). No node able to give them, in the region if it is pinned, is a
      :class:`SpecError` naming the field, rather than an actor pending forever.
    """
    region, gpus, index = _needs(argv, job)
    custom: dict[str, float] = {}
    if region is not None:
        marker = region_resource(region)
        if any(node.get(marker, 0.0) >= REGION_SHARE for node in nodes):
            custom[marker] = REGION_SHARE
    if gpus and not any(node.get("GPU", 0.0) > 0 for node in nodes):
        gpus = 0
    if gpus and not any(
        node.get("GPU", 0.0) >= gpus and all(node.get(k, 0.0) >= v for k, v in custom.items())
        for node in nodes
    ):
        tenant = job.spec.tenants[index or 0].name
        where = f" with {next(iter(custom))}" if custom else ""
        raise SpecError(
            [
                (
                    f"spec.tenants[{index}].resources.gpu",
                    f"tenant {tenant!r} asks {gpus} GPU(s) per worker; "
                    f"no Ray node{where} has that many",
                )
            ]
        )
    options: dict[str, Any] = {"num_cpus": SERVICE_CPUS, "num_gpus": gpus}
    if custom:
        options["resources"] = custom
    return options


@ray.remote(num_cpus=0, max_concurrency=2)  # type: ignore[call-overload]
class ServiceActor:
    """Runs one fedkube service; a second thread answers small questions."""

    def __init__(self, env: dict[str, str]):
        os.environ.update(env)

    def where(self) -> tuple[str, str]:
        """This actor's node: its IP address and its Ray node id."""
        return str(ray.util.get_node_ip_address()), str(ray.get_runtime_context().get_node_id())

    def run(self, argv: list[str], log_path: str) -> int:
        import logging

        from fedkube.cli import main

        code = main(argv)
        logging.shutdown()
        return code

    def read_text(self, path: str) -> str | None:
        target = Path(path)
        return target.read_text() if target.exists() else None


class RayHandle:
    """A service's actor; where it runs is asked of the actor when first needed."""

    def __init__(self, name: str, actor: Any, ref: Any, where: Any, url_host: str | None):
        self.name = name
        self.actor = actor
        self.ref = ref
        self._where = where  # ObjectRef of ServiceActor.where()
        self._url_host = url_host
        self._node_id: str | None = None
        self._code: int | None = None
        self._ports: dict[Path, int] = {}  # once read: a dead actor cannot be asked again

    def _resolve(self, timeout: float = PLACEMENT_TIMEOUT_S) -> tuple[str, str]:
        try:
            ip, node_id = ray.get(self._where, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise FedkubeError(
                f"{self.name}: no Ray node took its actor within {timeout:.0f}s "
                "(see `ray status` for what the cluster offers)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise FedkubeError(f"{self.name}: its Ray actor did not start: {exc}") from None
        self._node_id = str(node_id)
        return str(ip), self._node_id

    @property
    def url_host(self) -> str:
        """The address others reach it at: its node's IP (loopback on a local Ray)."""
        if self._url_host is None:
            self._url_host = self._resolve()[0]
        return self._url_host

    @url_host.setter
    def url_host(self, value: str) -> None:
        self._url_host = value

    @property
    def node_id(self) -> str | None:
        """The Ray node it runs on, if it has reported it within ``timeout``."""
        if self._node_id is None:
            try:
                self._resolve(timeout=5.0)
            except FedkubeError:
                return None
        return self._node_id

    def poll(self) -> int | None:
        if self._code is None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self._code = int(ray.get(self.ref))
                except ray.exceptions.RayError:
                    self._code = -9  # the actor died (killed or crashed)
        return self._code

    def read_port(self, path: Path) -> int | None:
        """The port in ``path`` on the actor's node; None while it is not placed or written."""
        if path in self._ports:
            return self._ports[path]
        ready, _ = ray.wait([self._where], timeout=0)
        if not ready:
            return None  # not placed yet: the caller's deadline decides
        try:
            text = ray.get(self.actor.read_text.remote(str(path)))
        except ray.exceptions.RayError:
            return None  # the actor is gone; poll() says so
        if not text:
            return None
        self._ports[path] = int(text)
        return self._ports[path]

    def terminate(self) -> None:
        if self.poll() is None:
            ray.kill(self.actor)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.poll() is None:
            ray.kill(self.actor)
        return self.poll()


class RayLauncher:
    """Starts services as actors on a local Ray or on the cluster at ``address``.

    ``job`` is the job the services run (read from their ``--job`` when not
    given); its regions and tenants' GPUs decide each actor's resource requests.
    After :meth:`close`, ``nodes`` maps each service to the Ray node id it ran on.
    """

    def __init__(self, address: str | None, job: FederatedJob | None = None):
        self.address = address
        self.job = job
        self.handles: dict[str, RayHandle] = {}
        self.nodes: dict[str, str] = {}
        self._cpu_only: set[int | None] = set()  # tenants (indexes) told their GPUs are not there
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=max(2, os.cpu_count() or 2),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        self.host = "127.0.0.1" if address is None else str(ray.util.get_node_ip_address())

    def reserve_port(self) -> int | None:
        """None: a service's node (and so its address) is known only once it is placed."""
        return None

    def service_hosts(self) -> list[str]:
        """Loopback and every live node's address: a service may be placed on any of them."""
        import ray

        nodes = [str(n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive")]
        return list(dict.fromkeys([self.host, "127.0.0.1", "localhost", *nodes]))

    def _job(self, argv: list[str]) -> FederatedJob:
        if self.job is None:
            self.job = load_job(Path(_flag(argv, "--job")))
        return self.job

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> RayHandle:
        argv = list(argv)
        alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        job = self._job(argv)
        options = actor_options(argv, job, alive)
        _, gpus, index = _needs(argv, job)
        if gpus and not options["num_gpus"] and index not in self._cpu_only:
            self._cpu_only.add(index)
            tenant = job.spec.tenants[index or 0].name
            print(
                f"tenant {tenant} asks {gpus} GPU(s) per worker; no Ray node has a GPU, "
                "so its workers train on CPU",
                file=sys.stderr,
            )
        if self.address is not None and "--host" in argv:
            argv[argv.index("--host") + 1] = "0.0.0.0"  # reached at the actor node's IP
        actor = ServiceActor.options(name=None, **options).remote(  # type: ignore[attr-defined]
            {**env, LOG_FILE_ENV: str(log)}
        )
        where = actor.where.remote()
        url_host = self.host if self.address is None else None
        handle = RayHandle(name, actor, actor.run.remote(argv, str(log)), where, url_host)
        self.handles[name] = handle
        return handle

    def close(self) -> None:
        if not ray.is_initialized():
            return
        for name, handle in self.handles.items():
            node_id = handle.node_id
            if node_id is not None:
                self.nodes[name] = node_id
        if self._owns_ray:
            ray.shutdown()
