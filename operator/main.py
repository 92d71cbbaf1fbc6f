"""``fedkube operator``: run the kopf operator with fedkube's handlers.

It logs in the way ``kubectl`` does (in-cluster service account, else
``--kubeconfig`` or ``$KUBECONFIG``), serves ``/metrics`` and a liveness
endpoint, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import start_http_server

from fedkube.operator.config import OperatorConfig
from fedkube.operator.handlers import State, build_registry
from fedkube.operator.kube import Kube
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
    start_http_server(runtime.metrics_port, runtime.metrics_host, registry=metrics.registry)
    state = State(config=config, kube=Kube(api_client(runtime.kubeconfig)), metrics=metrics)
    registry = build_registry(config)

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    async def main() -> None:
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
        )

    asyncio.run(main())
