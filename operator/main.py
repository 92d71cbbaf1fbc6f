"""``fedkube operator``: run the kopf operator with fedkube's handlers.

It logs in the way ``kubectl`` does (in-cluster service account, else
``--kubeconfig`` or ``$KUBECONFIG``), serves ``/metrics`` and ``/healthz``
(the event loop's heartbeat) on the metrics port, and stops cleanly on
SIGTERM. With leader election, only the replica holding the Lease runs kopf;
the others serve ``/metrics`` and ``/healthz`` and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from fedkube.operator.config import OperatorConfig
from fedkube.operator.handlers import State, build_registry
from fedkube.operator.health import Heartbeat, health_app, serve
from fedkube.operator.kube import Kube
from fedkube.operator.leader import Election, LeaderElector
from fedkube.operator.metrics import OperatorMetrics


@dataclass(frozen=True)
class Runtime:
    """Where the operator listens and what it watches (not part of what it builds)."""

    kubeconfig: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8000
    health_port: int | None = 8081
    standalone: bool = True
    peering: str | None = None
    election: Election | None = None


log = logging.getLogger("fedkube.operator")


def api_client(kubeconfig: str | None) -> k8s.ApiClient:
    """The API client, configured as kubectl would be."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it too
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s.ApiClient(configuration)


def run(config: OperatorConfig, runtime: Runtime) -> None:
    """Block until SIGINT/SIGTERM (kopf's own handlers stop it gracefully)."""
    metrics = OperatorMetrics()
    heartbeat = Heartbeat()
    serve(health_app(metrics.registry, heartbeat), runtime.metrics_host, runtime.metrics_port)
    state = State(config=config, kube=Kube(api_client(runtime.kubeconfig)), metrics=metrics)
    registry = build_registry(config)

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    async def operate(stop: asyncio.Event) -> None:
        await kopf.operator(
            registry=registry,
            memo=state,
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            standalone=runtime.standalone and runtime.peering is None,
            peering_name=runtime.peering,
            liveness_endpoint=(
                f"http://0.0.0.0:{runtime.health_port}/healthz" if runtime.health_port else None
            ),
            stop_flag=stop,
        )

    asyncio.run(_beating(heartbeat, _lead_then_operate(runtime, operate)))


async def _beating(heartbeat: Heartbeat, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` with the heartbeat that ``/healthz`` reports on."""
    beating = asyncio.create_task(heartbeat.keep())
    try:
        await main
    finally:
        beating.cancel()


async def _lead_then_operate(
    runtime: Runtime, operate: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """Run kopf, first waiting for the Lease when leader election is on.

    Kopf installs its own SIGINT/SIGTERM handlers only once it runs; until
    then (a standby replica) ours set the same stop flag. Losing the Lease
    stops kopf and raises LeadershipLost, so the process exits non-zero and
    Kubernetes restarts it as a standby.
    """
    stop = asyncio.Event()
    if runtime.election is None:
        await operate(stop)
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    elector = LeaderElector(api_client(runtime.kubeconfig), runtime.election)
    acquiring = asyncio.create_task(elector.acquire())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        acquiring.cancel()
        return
    stopping.cancel()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
    holding = asyncio.create_task(elector.hold())
    operating = asyncio.create_task(operate(stop))
    await asyncio.wait({holding, operating}, return_when=asyncio.FIRST_COMPLETED)
    if holding.done():
        stop.set()  # lost the Lease: stop reconciling before anyone else starts
        with contextlib.suppress(asyncio.CancelledError):
            await operating
        holding.result()  # raises LeadershipLost
    holding.cancel()
    await asyncio.to_thread(elector.release)
    log.info("released the Lease")
