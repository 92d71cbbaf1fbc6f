"""Evaluation at the sites, the pure part: a report's checks, when it is due, the means."""

from __future__ import annotations

import math

import pytest

from fedkube.errors import UpdateRejected
from fedkube.spec import parse_job
from fedkube.training.evaluation import (
    Report,
    TenantSums,
    check_report,
    due,
    everyone,
    summarise,
    tenant_sums,
)
from tests.support import small_job_dict

GOOD = {"client": "a-0", "round": 2, "version": 3, "examples": 40, "metrics": {"auroc": 0.8}}


def test_a_good_report_is_read_as_sent():
    assert check_report(GOOD) == Report("a-0", 2, 3, 40, {"auroc": 0.8})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"client": ""}, "client: expected a client id"),
        ({"round": "2"}, "round: expected an integer, got str"),
        ({"version": 0}, "version: 0 is not in 1..1000000000"),
        ({"examples": 0}, "examples: 0 is not in 1..1000000000000"),
        ({"examples": True}, "examples: expected an integer, got bool"),
        ({"metrics": [0.8]}, "metrics: expected a map of metric names to numbers"),
        ({"metrics": {"AUROC": 0.8}}, "metrics: name 'AUROC' is not [a-z][a-z0-9_]*"),
        ({"metrics": {"auroc": {"mean": 0.8}}}, "metrics.auroc: expected a number, got dict"),
        ({"metrics": {"auroc": math.nan}}, "metrics.auroc: nan is not finite"),
        ({"metrics": {f"m{i}": 0.0 for i in range(17)}}, "metrics: 17 names; at most 16"),
        ({"error": 3}, "error: expected the failure's first line"),
        # JSON keeps 10**400 an int: float() of it raised OverflowError (a 500)
        (
            {"metrics": {"auroc": 10**400}},
            "metrics.auroc: 1000000000000000000000000000000000000000 is not finite",
        ),
        # re.match's $ took the name with its final newline
        ({"metrics": {"auroc\n": 0.8}}, "metrics: name 'auroc\\n' is not [a-z][a-z0-9_]*"),
    ],
)
def test_a_bad_report_is_refused_naming_the_field(change, problem):
    # prepare
    document = {**GOOD, **change}
    # execute
    with pytest.raises(UpdateRejected) as refused:
        check_report(document)
    # assert
    assert refused.value.reason == "malformed"
    assert refused.value.detail == problem


def test_a_failure_report_keeps_only_its_first_line_and_needs_no_metrics():
    document = {"client": "c-0", "round": 1, "version": 2, "error": "evaluate: OSError: gone\nmore"}
    assert check_report(document) == Report("c-0", 1, 2, error="evaluate: OSError: gone")


def test_sites_evaluate_every_n_rounds_and_everyone_evaluates_the_final_model():
    job = parse_job(small_job_dict(rounds=5, evaluation={"sites": "selected", "everyRounds": 2}))
    assert [due(job, n) for n in range(1, 6)] == [False, True, False, True, True]
    assert [everyone(job, n) for n in (4, 5)] == [False, True]
    off = parse_job(small_job_dict(rounds=5))
    assert not any(due(off, n) for n in range(1, 6))
    no_cross = parse_job(
        small_job_dict(rounds=5, evaluation={"sites": "selected", "crossSite": False})
    )
    assert not everyone(no_cross, 5)


def test_means_are_weighted_by_examples_per_tenant_and_overall_per_metric():
    # prepare: tenant a's two clients, tenant b's one (which reports no auroc)
    a, b = TenantSums(), TenantSums()
    a.add(100, {"accuracy": 0.9, "auroc": 0.8})
    a.add(300, {"accuracy": 0.5, "auroc": 0.6})
    b.add(600, {"accuracy": 1.0})
    # execute
    summary = summarise(
        {"a": a, "b": b}, {"c-0": "evaluate: OSError: gone"}, expected=4, final=True
    )
    # assert
    assert summary["tenants"]["a"] == {
        "clients": 2,
        "examples": 400,
        "metrics": {"accuracy": pytest.approx(0.6), "auroc": pytest.approx(0.65)},
    }
    assert summary["metrics"]["accuracy"] == pytest.approx((90 + 150 + 600) / 1000)
    assert summary["metrics"]["auroc"] == pytest.approx(0.65)  # only a's examples count
    assert (summary["clients"], summary["examples"], summary["expected"]) == (3, 1000, 4)
    assert summary["failed"] == {"c-0": "evaluate: OSError: gone"}


def test_tenant_sums_read_back_the_redis_hash():
    raw = {"a|examples": "400", "a|clients": "2", "a|w|auroc": "260.0", "a|n|auroc": "400"}
    (sums,) = tenant_sums(raw).values()
    assert sums.means() == {"auroc": pytest.approx(0.65)} and sums.clients == 2
