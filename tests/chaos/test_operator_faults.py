"""Faults under the operator (issue 12, "Operator"), with real components only.

The operator is a real process (``tests/operator_process.py``) against the
loopback control plane (``tests/controlplane.py``) and a real redis-server:
it is SIGKILLed in the middle of deleting a job, and kube-apiserver is
restarted under it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis import Redis

from fedkube.operator.handlers import FINALIZER
from fedkube.state.redis_server import RedisServer
from fedkube.state.roundstate import job_prefix
from tests.cluster.jobs import (
    apply,
    children,
    expected_children,
    job_document,
    names,
    owned_children,
    status,
)
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.support import wait_for

pytestmark = pytest.mark.cluster


def job_or_none(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    found = cp.kubectl("get", "-n", namespace, "federatedjob", name, "-o", "json", check=False)
    if found.returncode != 0:
        assert "NotFound" in found.stderr, found.stderr
        return None
    job: dict[str, Any] = json.loads(found.stdout)
    return job


def held_by_the_finalizer(job: dict[str, Any] | None) -> bool:
    """Deleted (a deletionTimestamp) but still there: the operator's finalizer holds it."""
    return (
        job is not None
        and "deletionTimestamp" in job["metadata"]
        and FINALIZER in job["metadata"].get("finalizers", [])
    )


def blocked_deletes(redis: Redis) -> list[dict[str, Any]]:
    """Redis clients whose DEL is held by ``CLIENT PAUSE ... WRITE``."""
    clients: list[dict[str, Any]] = redis.client_list()
    return [c for c in clients if "b" in c["flags"] and c["cmd"] in ("del", "unlink")]


def test_an_operator_killed_while_deleting_a_job_finishes_the_deletion_after_a_restart(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    redis_server: RedisServer,
):
    # Prepare: a running job with every child, and its round state in Redis.
    apply(control_plane, namespace, job_document("mnist"))
    wait_for(
        lambda: expected_children("mnist") <= names(children(control_plane, namespace, "mnist")),
        30,
        "every child of the job",
    )
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    redis.hset(job_prefix("mnist") + "job", mapping={"status": "running", "round": 1})
    redis.rpush(job_prefix("mnist") + "history", json.dumps({"round": 1}))
    keys = set(redis.keys(job_prefix("mnist") + "*"))
    wait_for(
        lambda: status(control_plane, namespace, "mnist").get("phase") == "Running",
        30,
        "phase Running from the round state in Redis",
    )

    # Execute: Redis holds writes, so the finalizer's DEL hangs; the job is deleted and
    # the operator is killed while it is inside the finalizer.
    redis.execute_command("CLIENT", "PAUSE", 120_000, "WRITE")
    control_plane.kubectl("delete", "-n", namespace, "federatedjob", "mnist", "--wait=false")
    wait_for(
        lambda: (
            held_by_the_finalizer(job_or_none(control_plane, namespace, "mnist"))
            and blocked_deletes(redis)
        ),
        30,
        "the job held by the finalizer, whose DEL of the Redis keys waits",
    )
    operator.kill()
    wait_for(lambda: not blocked_deletes(redis), 10, "Redis to drop the killed operator's DEL")
    redis.execute_command("CLIENT", "UNPAUSE")
    # Nothing was finished: the job waits on its finalizer, with its keys. Its pods and
    # Deployments, which write round state, went first (the finalizer deletes the keys only
    # once no pod of the job runs); its other children wait for garbage collection.
    assert held_by_the_finalizer(job_or_none(control_plane, namespace, "mnist"))
    assert set(redis.keys(job_prefix("mnist") + "*")) == keys
    writers = {child for child in expected_children("mnist") if child[0] in ("Deployment", "Pod")}
    left = names(children(control_plane, namespace, "mnist"))
    assert expected_children("mnist") - writers <= left
    assert not writers & left, writers & left
    operator.start()

    # Assert: the restarted operator finishes the deletion, and nothing of the job is left.
    wait_for(
        lambda: job_or_none(control_plane, namespace, "mnist") is None,
        60,
        "the job gone once the restarted operator ran its finalizer",
    )
    assert redis.keys(job_prefix("mnist") + "*") == []
    wait_for(
        lambda: not children(control_plane, namespace, "mnist"),
        60,
        "garbage collection of every child of the job",
    )


def watch_failures(log: str) -> list[str]:
    """The operator's log lines of FederatedJob watch requests that failed (kopf retries them)."""
    return [
        line
        for line in log.splitlines()
        if "failed; will retry" in line and "federatedjobs?watch=true" in line
    ]


def test_the_operator_rides_out_an_api_server_restart_and_goes_on_reconciling(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    redis_server: RedisServer,
):
    # Prepare: the operator has reconciled a job, so its watch stream and status timer run.
    before = job_document("before")
    apply(control_plane, namespace, before)
    wait_for(
        lambda: (
            expected_children("before")
            <= owned_children(children(control_plane, namespace, "before"))
        ),
        30,
        "every child of the first job",
    )
    wait_for(
        lambda: status(control_plane, namespace, "before").get("phase") == "Pending",
        30,
        "the first job's status",
    )

    # Execute: kube-apiserver stops under the operator, whose watch fails, and starts again.
    control_plane.stop_apiserver()
    wait_for(
        lambda: watch_failures(operator.log()), 30, "the operator's watch to find the API gone"
    )
    control_plane.start_apiserver()
    # A new job reaches the operator only through a watch opened after the restart.
    apply(control_plane, namespace, job_document("after"))
    before["spec"]["tenants"].append({"name": "d", "region": "us"})
    apply(control_plane, namespace, before)
    # The first job's aggregator reports a round, which only the status timer picks up.
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    redis.hset(job_prefix("before") + "job", mapping={"status": "running", "round": 1})

    # Assert: all three are reconciled, promptly, by the same operator process.
    wait_for(
        lambda: (
            expected_children("after")
            <= owned_children(children(control_plane, namespace, "after"))
        ),
        30,
        "every child of the job created after the restart",
    )
    wait_for(
        lambda: status(control_plane, namespace, "after").get("phase") == "Pending",
        30,
        "the new job's status",
    )
    wait_for(
        lambda: (
            {("Pod", "before-d-0"), ("NetworkPolicy", "before-tenant-d")}
            <= names(children(control_plane, namespace, "before"))
        ),
        30,
        "the first job's new tenant",
    )
    wait_for(
        lambda: status(control_plane, namespace, "before").get("observedGeneration") == 2,
        30,
        "the first job's status to observe its change",
    )
    wait_for(
        lambda: status(control_plane, namespace, "before").get("phase") == "Running",
        20,
        "the first job's status to follow its round state again",
    )
    assert operator.process is not None and operator.process.poll() is None
    assert operator.starts == 1
