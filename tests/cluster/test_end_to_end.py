"""End to end: a suspended FederatedJob keeps its round and resumes it to success.

Nothing is started by hand but the operator. The pods it writes (aggregator
and combiner Deployments, worker pods with their ConfigMap, Secrets and
Service DNS names) are executed as local processes by ``tests/podrunner.py``
exactly as their specs say, against a real redis-server; the operator then
reads the round state back into the job's status. (A job trained by the chart's
operator in real containers is tests/realnode/test_pods.py; this test stays on the
pod runner because its subject is the operator's suspend logic, where pods that start
in a second instead of a minute keep the rounds short enough to catch mid-job.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import kubernetes.client
from redis import Redis

from fedkube.state.redis_server import RedisServer
from fedkube.state.roundstate import job_prefix
from tests.cluster.jobs import apply, job_document, status
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.podrunner import PodRunner
from tests.support import wait_for


def finished(cp: ControlPlane, namespace: str, job: str) -> dict[str, Any] | None:
    current = status(cp, namespace, job)
    return current if current.get("phase") in ("Succeeded", "Failed") else None


SUSPEND = {"spec": {"suspend": True}}


def test_a_suspended_job_keeps_its_round_and_resumes_it_to_success(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    redis_server: RedisServer,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    document = job_document()
    # Enough rounds that the job cannot end before the suspension takes effect.
    document["spec"]["rounds"] = 12
    document["spec"]["participation"] = {"minFraction": 1.0, "roundTimeoutSeconds": 5}
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    with PodRunner(api_client, namespace, tmp_path / "pods") as runner:
        apply(control_plane, namespace, document)
        # Read from Redis and patched through the API (not kubectl): rounds are short.
        wait_for(lambda: redis.llen(job_prefix("mnist") + "history") >= 1, 120, "round 1 closed")
        jobs = kubernetes.client.CustomObjectsApi(api_client)
        jobs.patch_namespaced_custom_object(
            "fedkube.io", "v1alpha1", namespace, "federatedjobs", "mnist", SUSPEND
        )
        document["spec"]["suspend"] = True
        wait_for(lambda: not runner.running() - aggregator_tier(runner), 60, "workers stopped")
        wait_for(lambda: redis.hget(job_prefix("mnist") + "job", "paused") == "1", 30, "paused")

        def round_held_open() -> bool:
            """No round can time out: the open one's deadline keeps moving, or none is open."""
            number = redis.hget(job_prefix("mnist") + "job", "round")
            state = redis.hgetall(job_prefix("mnist") + f"round:{number}")
            if state.get("state") == "collecting":
                return float(state["deadline"]) > time.time() + 4  # timeout is 5 s
            return state.get("state") == "closed"  # the next one waits for its clients

        wait_for(round_held_open, 30, "the aggregator holding the round while suspended")
        wait_for(
            lambda: status(control_plane, namespace, "mnist").get("phase") == "Suspended",
            30,
            "phase Suspended",
        )
        assert redis.llen(job_prefix("mnist") + "history") < 12, "ended before the suspension"
        document["spec"]["suspend"] = False
        apply(control_plane, namespace, document)
        final = wait_for(
            lambda: finished(control_plane, namespace, "mnist"), 300, "the job to finish"
        )
    assert final["phase"] == "Succeeded", final
    history = [json.loads(item) for item in redis.lrange(job_prefix("mnist") + "history", 0, -1)]
    assert [record["round"] for record in history] == list(range(1, 13))


def aggregator_tier(runner: PodRunner) -> set[str]:
    return {pod for pod in runner.running() if "aggregator" in pod or "combiner" in pod}
