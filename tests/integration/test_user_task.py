"""A task of the user's own in a whole federation: real Redis, real HTTP, real workers.

``tests.tasks.ScannerOffline`` is the digits task written as plain PyTorch,
raising at tenant ``b`` in round 2: that client's round is lost with its
traceback in the log, the round closes on the others, and ``b`` is back in
round 3.
"""

from __future__ import annotations

import logging

import pytest

from fedkube.spec import parse_job
from tests import tasks
from tests.federation import federate
from tests.support import small_job_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def user_task_job():
    document = small_job_dict(
        rounds=3,
        task={"entrypoint": "tests.tasks:ScannerOffline", "kwargs": {"hidden": 16}},
        # The failed client sends nothing: its round closes at the deadline on the others.
        participation={"minFraction": 0.5, "roundTimeoutSeconds": 10},
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
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: the job succeeded on the task's own loop, evaluated by the task's evaluate()
    assert outcome.status == "succeeded", outcome
    reported = [record["reported"] for record in outcome.history]
    assert reported[tasks.FAILING_ROUND - 1] == 3 and reported[-1] == 4, reported
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
