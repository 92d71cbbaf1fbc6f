"""A task of the user's own in a whole federation: real Redis, real HTTP, real workers.

``tests.tasks.ScannerOffline`` is the digits task written as plain PyTorch,
raising at tenant ``b`` in round 2: that client's round is lost with its
traceback in the log, its worker says so to its combiner, the round closes
on the others at once (not at its deadline), and ``b`` is back in round 3.
When so many clients fail that the quorum is lost, the job fails naming them.
"""

from __future__ import annotations

import logging

import pytest

from fedkube.spec import parse_job
from tests import tasks
from tests.federation import federate
from tests.support import small_job_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def user_task_job(task: str = "tests.tasks:ScannerOffline"):
    document = small_job_dict(
        rounds=3,
        task={"entrypoint": task, "kwargs": {"hidden": 16}},
        # A deadline no test waits for: a failed client's round closes when it says so.
        participation={"minFraction": 0.5, "roundTimeoutSeconds": 3600},
        training={"epochs": 5, "batchSize": 32, "learningRate": 0.1, "momentum": 0.9},
    )
    del document["spec"]["model"]
    del document["spec"]["data"]["entrypoint"]
    return parse_job(document)


async def test_a_users_task_trains_the_federation_and_its_failure_costs_one_client_one_round(
    redis_server, tmp_path, caplog
):
    # prepare
    job = user_task_job()
    caplog.set_level(logging.ERROR, logger="fedkube.worker")
    # execute
    outcome = await federate(job, redis_server.url, tmp_path, timeout_s=300)
    # assert: the job succeeded on the task's own loop, evaluated by the task's evaluate()
    assert outcome.status == "succeeded", outcome
    reported = [record["reported"] for record in outcome.history]
    assert reported[tasks.FAILING_ROUND - 1] == 3 and reported[-1] == 4, reported
    failed_round = outcome.history[tasks.FAILING_ROUND - 1]
    assert failed_round["task_failures"] == {
        "b-0": "task tests.tasks:ScannerOffline: train: RuntimeError: scanner of b is offline"
    }
    assert failed_round["duration_s"] < 3600 and outcome.history[-1]["task_failures"] == {}
    assert outcome.history[-1]["metrics"].keys() == {"loss", "accuracy"}
    assert outcome.accuracy[-1] > 0.85, outcome.accuracy
    # assert: the failure is in the worker's log with its traceback, and counted
    failures = [r for r in caplog.records if "the task failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    text = failures[0].getMessage()
    assert "task tests.tasks:ScannerOffline: train: RuntimeError: scanner of b is offline" in text
    assert "Traceback (most recent call last)" in text
    failed = next(w for w in outcome.workers if w.tenant == tasks.FAILING_TENANT)
    counted = failed.metrics.task_failures.labels(job.name, "eu", "b", "train")._value.get()
    assert counted == 1


async def test_when_failed_tasks_cost_the_quorum_the_job_fails_naming_each_tenant_and_cause(
    redis_server, tmp_path
):
    # prepare: in round 2 the task fails at b, c and d; the quorum is 2 of 4
    job = user_task_job("tests.tasks:ScannersOffline")
    # execute
    outcome = await federate(job, redis_server.url, tmp_path, timeout_s=300)
    # assert: failed at once (no deadline waited for), naming every tenant and its exception
    assert outcome.status == "failed", outcome
    assert [r["round"] for r in outcome.history] == [1]
    assert outcome.message.startswith(
        "round 2: 1 of 4 selected clients reported, quorum is 2; the task failed at "
        "tenant b (client b-0): task tests.tasks:ScannersOffline: train: "
        "RuntimeError: scanner of b is offline; tenant c (client c-0): "
    ), outcome.message
    assert "tenant d (client d-0): task tests.tasks:ScannersOffline" in outcome.message
