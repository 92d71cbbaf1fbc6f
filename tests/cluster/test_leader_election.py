"""Two operator replicas with ``--leader-election``: one reconciles, the other takes over.

Both run against the real API server and its Lease objects; the first is
SIGKILLed (a node dying under it), so it never releases the Lease and the
second must wait for it to expire.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedkube.state.redis_server import RedisServer
from tests.cluster.jobs import apply, children, job_document
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.support import wait_for

LEASE = "fedkube-operator"


def replica(
    cp: ControlPlane, namespace: str, redis: RedisServer, folder: Path, name: str
) -> OperatorProcess:
    folder.mkdir()
    return OperatorProcess(
        cp,
        namespace,
        redis.url,
        folder,
        "--leader-election",
        "--lease-namespace",
        namespace,
        env={"POD_NAME": name},
    ).start()


def holder(cp: ControlPlane, namespace: str) -> str:
    found = cp.kubectl("get", "lease", "-n", namespace, LEASE, "-o", "json", check=False)
    if found.returncode != 0:
        return ""
    return str(json.loads(found.stdout)["spec"].get("holderIdentity") or "")


def reconciled(process: OperatorProcess) -> bool:
    return "fedkube_operator_reconcile_duration_seconds_count" in process.metrics()


def test_only_the_lease_holder_reconciles_and_a_standby_takes_over_when_it_dies(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
    redis_server: RedisServer,
    tmp_path: Path,
):
    first = replica(control_plane, namespace, redis_server, tmp_path / "a", "replica-a")
    second = None
    try:
        first.wait_serving()
        wait_for(lambda: holder(control_plane, namespace) == "replica-a", 60, "a's Lease")
        second = replica(control_plane, namespace, redis_server, tmp_path / "b", "replica-b")
        second.wait_serving()
        wait_for(lambda: "waiting for the Lease" in second.log(), 30, "b waiting")
        # Both are alive for the liveness probe, the standby as much as the leader.
        assert first.healthz() == second.healthz() == "ok\n"

        apply(control_plane, namespace, job_document())
        wait_for(lambda: len(children(control_plane, namespace, "mnist")) > 10, 60, "children")
        wait_for(lambda: reconciled(first), 30, "a's reconcile counted")
        assert not reconciled(second), "the standby reconciled while a held the Lease"

        first.kill()
        # b takes the Lease once a's last renewal is older than the lease duration.
        wait_for(lambda: holder(control_plane, namespace) == "replica-b", 60, "b's Lease")
        document = job_document()
        document["spec"]["tenants"].append({"name": "d", "region": "us"})
        apply(control_plane, namespace, document)
        wait_for(
            lambda: any(
                c["metadata"]["name"] == "mnist-d-0"
                for c in children(control_plane, namespace, "mnist")
            ),
            60,
            "b to reconcile the new tenant",
        )
        # A clean stop hands the Lease back instead of letting it run out.
        assert second.stop() == 0
        assert holder(control_plane, namespace) == ""
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_a_leader_whose_lease_is_taken_stops_reconciling_and_exits(
    control_plane: ControlPlane,
    crd: None,
    namespace: str,
    redis_server: RedisServer,
    tmp_path: Path,
):
    leader = replica(control_plane, namespace, redis_server, tmp_path / "a", "replica-a")
    try:
        leader.wait_serving()
        wait_for(lambda: holder(control_plane, namespace) == "replica-a", 60, "a's Lease")
        # Another holder renews the Lease from now on (a partitioned leader sees the same).
        intruder = json.dumps(
            {"spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 3600}}
        )
        control_plane.kubectl(
            "patch", "lease", "-n", namespace, LEASE, "--type=merge", "-p", intruder
        )
        process = leader.process
        assert process is not None
        wait_for(lambda: process.poll() is not None, 60, "a to exit")
        assert process.returncode != 0
        assert "is held by intruder now" in leader.log()
        assert holder(control_plane, namespace) == "intruder"
    finally:
        leader.kill()
