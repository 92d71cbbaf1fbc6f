"""Evaluation at the sites in a whole federation: real Redis, real HTTP, real workers.

The clients evaluate each new global model on their own validation data;
their combiners sum the reports per tenant in Redis, and the round's history
record carries the example-weighted means per tenant and overall. With the
digits split, every client's validation share together is exactly the
global tier's held-out set, so the sites' overall accuracy must equal the
central evaluation's.
"""

from __future__ import annotations

import logging

import pytest

from fedkube.examples import digits
from fedkube.spec import parse_job
from fedkube.training import headline
from fedkube.training.learning import data_context
from tests import tasks
from tests.federation import federate
from tests.support import small_job_dict

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def validation_examples(job, tenant_index: int) -> int:
    client = next(c for c in job.clients() if c.tenant_index == tenant_index)
    return len(digits.make_data(data_context(job, "validation", client)))


async def test_every_site_evaluates_the_global_model_and_the_means_match_the_central_split(
    redis_server, tmp_path
):
    # prepare: every client evaluates every round, and the central side evaluates too
    job = parse_job(small_job_dict(rounds=3, evaluation={"sites": "all", "central": True}))
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: each round's record has the sites' means, per tenant and overall
    assert outcome.status == "succeeded", outcome
    for record in outcome.history:
        sites = record["sites"]
        assert sites["clients"] == sites["expected"] == 4 and sites["failed"] == {}
        assert sorted(sites["tenants"]) == ["a", "b", "c", "d"]
        for index, name in enumerate("abcd"):
            assert sites["tenants"][name]["examples"] == validation_examples(job, index)
        # the clients' shares are the held-out split: same accuracy as the central one
        assert sites["metrics"]["accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
        assert sites["metrics"]["loss"] == pytest.approx(record["loss"], rel=1e-4)
        weighted = sum(t["examples"] * t["metrics"]["accuracy"] for t in sites["tenants"].values())
        assert sites["metrics"]["accuracy"] == pytest.approx(weighted / sites["examples"])
    assert [r["sites"]["final"] for r in outcome.history] == [False, False, True]


async def test_without_central_data_the_headline_comes_from_the_sites_and_a_blind_site_is_named(
    redis_server, tmp_path, caplog
):
    # prepare: no central evaluation; the round's reporters evaluate; tenant c cannot
    document = small_job_dict(
        rounds=3,
        task={"entrypoint": "tests.tasks:BlindSite", "kwargs": {"hidden": 16}},
        evaluation={"sites": "selected", "central": False, "everyRounds": 2},
        participation={"minFraction": 0.5, "roundTimeoutSeconds": 30},
        training={"epochs": 5, "batchSize": 32, "learningRate": 0.1, "momentum": 0.9},
    )
    del document["spec"]["model"]
    del document["spec"]["data"]["entrypoint"]
    job = parse_job(document)
    caplog.set_level(logging.WARNING)
    # execute
    outcome = await federate(job, redis_server.url, tmp_path)
    # assert: rounds 2 (every 2nd) and 3 (the last: every client) were evaluated at the sites
    assert outcome.status == "succeeded", outcome
    assert ["sites" in r for r in outcome.history] == [False, True, True]
    assert all(r["metrics"] == {} for r in outcome.history)
    final = outcome.history[-1]["sites"]
    assert final["final"] and final["expected"] == 4 and final["clients"] == 3
    assert sorted(final["tenants"]) == ["a", "b", "d"]
    (blind,) = final["failed"].items()
    assert blind[0] == "c-0"
    assert "evaluate: FileNotFoundError: /data/c/validation: no such directory" in blind[1]
    # the headline is the sites' accuracy, and the model learned
    best = headline.best(outcome.history, job.spec.evaluation)
    assert best == (3, final["metrics"]["accuracy"]) and best[1] > 0.8, best
    # the failure is in the worker's log with its traceback, and counted
    logged = [r.getMessage() for r in caplog.records if "could not evaluate" in r.getMessage()]
    assert any("Traceback (most recent call last)" in m for m in logged), logged
    blind_worker = next(w for w in outcome.workers if w.tenant == tasks.BLIND_TENANT)
    counted = blind_worker.metrics.task_failures.labels(job.name, "us", "c", "evaluate")
    assert counted._value.get() >= 1
