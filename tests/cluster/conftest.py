"""Fixtures for tests against a real control plane (tests/controlplane.py).

One cluster serves the whole session (it takes seconds to start); each test
gets its own namespace for isolation. Every test under tests/cluster is
marked ``cluster``, so ``pytest -m "not cluster"`` skips them all.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from fedkube.state.redis_server import RedisServer
from tests.controlplane import ControlPlane, start_control_plane
from tests.operator_process import OperatorProcess
from tests.support import ROOT, wait_for

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests in this folder ``cluster``.

    The hook sees the whole session's items, not only this folder's, hence
    the path check.
    """
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, controller-manager, scheduler and kwok with 2 GPU nodes."""
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """One API client for the session, with the control plane's admin token."""
    with control_plane.api_client() as client:
        yield client


@contextlib.contextmanager
def fresh_namespace(api_client: kubernetes.client.ApiClient, stem: str) -> Iterator[str]:
    """A new namespace ``<stem>-xxxxx``, deleted afterwards without waiting.

    It is handed over once its ``default`` ServiceAccount exists: until the
    controller-manager creates it, the apiserver refuses pods in the namespace.
    """
    core = kubernetes.client.CoreV1Api(api_client)
    stem = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].strip("-")
    created = core.create_namespace(
        {"metadata": {"generateName": f"{stem or 'test'}-", "labels": {"fedkube.io/test": "true"}}}
    )
    name: str = created.metadata.name

    def has_default_service_account() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    wait_for(has_default_service_account, 30, f"the default ServiceAccount in {name}")
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture
def namespace(
    request: pytest.FixtureRequest, api_client: kubernetes.client.ApiClient
) -> Iterator[str]:
    """A fresh namespace named after the test."""
    with fresh_namespace(api_client, request.node.name) as name:
        yield name


@pytest.fixture
def site_namespace(api_client: kubernetes.client.ApiClient) -> Iterator[str]:
    """A second namespace, standing for a data-owning site's cluster."""
    with fresh_namespace(api_client, "site") as name:
        yield name


# -- the operator under test ------------------------------------------------------------------


@pytest.fixture(scope="session")
def crd(control_plane: ControlPlane) -> None:
    """The FederatedJob CRD from crds/, applied as a user would, once it is Established.

    Polled rather than ``kubectl wait --for=condition=Established``, which
    fails ("<nil> is of the type <nil>") when it runs before the CRD has any
    conditions at all.
    """
    control_plane.kubectl("apply", "-f", str(ROOT / "crds"))

    def established() -> bool:
        found = control_plane.kubectl(
            "get", "crd", "federatedjobs.fedkube.io", "-o", "json", check=False
        )
        conditions = json.loads(found.stdout or "{}").get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 60, "the FederatedJob CRD Established")


@pytest.fixture
def operator(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    """``fedkube operator`` watching the test's namespace, with a real redis-server."""
    process = OperatorProcess(control_plane, namespace, redis_server.url, tmp_path).start()
    process.wait_serving()
    try:
        yield process
    finally:
        process.stop()
        # Shown by pytest only when the test failed.
        print(f"--- operator log (last 6000 characters) ---\n{process.log()[-6000:]}")
