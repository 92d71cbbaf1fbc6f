"""The status rules: phase, conditions, deadline and backoff, from observed facts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fedkube.operator.status import (
    ConditionType,
    JobStatus,
    Observation,
    Phase,
    PodFacts,
    RoundFacts,
    next_status,
)
from fedkube.spec import Evaluation

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def observe(**overrides: Any) -> Observation:
    values: dict[str, Any] = {
        "generation": 1,
        "rounds": 5,
        "clients": 4,
        "suspend": False,
        "active_deadline_seconds": None,
        "backoff_limit": 2,
        "now": NOW,
        "rounds_facts": RoundFacts(),
        "pods": PodFacts(),
    }
    values.update(overrides)
    return Observation(**values)


def last_condition(status: JobStatus) -> str:
    return status.conditions[-1].type.value


def test_a_new_job_is_pending_until_its_first_round():
    status = next_status(JobStatus(), observe())
    assert status.phase is Phase.pending
    assert last_condition(status) == "Created"
    assert status.observed_generation == 1


def test_a_running_job_reports_round_participation_and_metrics():
    record = {"round": 2, "selected": 4, "reported": 3, "loss": 0.41, "accuracy": 0.9}
    facts = RoundFacts(job_status="running", current_round=3, closed_rounds=2, last_record=record)
    status = next_status(JobStatus(), observe(rounds_facts=facts))
    assert status.phase is Phase.running
    assert (status.round, status.progress, status.participation) == (3, "2/5", "3/4")
    assert (status.last_loss, status.last_accuracy) == (0.41, 0.9)
    assert last_condition(status) == "Running"


def test_the_status_shows_the_strategy_and_its_server_state():
    record = {
        "round": 2,
        "selected": 4,
        "reported": 4,
        "strategy": "scaffold",
        "robust": "median",
        "server_state": {"control_variate_norm": 0.1234567891},
    }
    facts = RoundFacts(job_status="running", current_round=3, closed_rounds=2, last_record=record)
    status = next_status(JobStatus(), observe(rounds_facts=facts))
    assert status.strategy == "scaffold+median"
    assert status.server_state == {"control_variate_norm": 0.123457}
    assert status.wire()["serverState"] == {"control_variate_norm": 0.123457}


def test_success_is_terminal_and_the_last_condition():
    facts = RoundFacts(job_status="succeeded", job_message="5 rounds completed", closed_rounds=5)
    status = next_status(JobStatus(), observe(rounds_facts=facts))
    assert status.phase is Phase.succeeded
    assert last_condition(status) == "Succeeded"
    assert status.completion_time == "2026-11-23T12:00:00Z"
    again = next_status(status, observe(now=NOW + timedelta(minutes=5), suspend=True))
    assert again.phase is Phase.succeeded
    assert again.completion_time == status.completion_time


def test_suspending_and_resuming_moves_the_state_back_and_forth():
    facts = RoundFacts(job_status="running", current_round=2, closed_rounds=1)
    running = next_status(JobStatus(), observe(rounds_facts=facts))
    suspended = next_status(running, observe(rounds_facts=facts, suspend=True))
    assert suspended.phase is Phase.suspended
    assert last_condition(suspended) == "Suspended"
    resumed = next_status(suspended, observe(rounds_facts=facts))
    assert resumed.phase is Phase.running
    assert last_condition(resumed) == "Running"
    suspended_condition = next(c for c in resumed.conditions if c.type.value == "Suspended")
    assert suspended_condition.status == "False"


def test_a_tenant_that_cannot_be_placed_is_named_in_the_unschedulable_condition():
    pods = PodFacts(unschedulable={"c": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."})
    status = next_status(JobStatus(), observe(pods=pods))
    condition = next(c for c in status.conditions if c.type is ConditionType.unschedulable)
    assert condition.status == "True"
    assert "tenant c" in condition.message and "nvidia.com/gpu" in condition.message
    placed = next_status(status, observe())
    condition = next(c for c in placed.conditions if c.type is ConditionType.unschedulable)
    assert condition.status == "False"
    assert last_condition(placed) == "Created"  # a False condition never shows as the state


def test_the_active_deadline_fails_the_job():
    first = next_status(JobStatus(), observe(active_deadline_seconds=60))
    late = next_status(first, observe(active_deadline_seconds=60, now=NOW + timedelta(seconds=61)))
    assert late.phase is Phase.failed
    failed = next(c for c in late.conditions if c.type is ConditionType.failed)
    assert failed.reason == "DeadlineExceeded"


def test_pod_failures_beyond_the_backoff_limit_fail_the_job():
    status = next_status(JobStatus(), observe(pods=PodFacts(new_failures=2)))
    assert status.phase is not Phase.failed and status.failures == 2
    status = next_status(status, observe(pods=PodFacts(new_failures=0, restarts=1)))
    assert status.phase is Phase.failed
    assert "backoffLimit=2" in status.message


def test_an_unchanged_observation_gives_an_equal_status():
    facts = RoundFacts(job_status="running", current_round=2, closed_rounds=1)
    once = next_status(JobStatus(), observe(rounds_facts=facts))
    twice = next_status(once, observe(rounds_facts=facts, now=NOW + timedelta(seconds=2)))
    assert twice == once


def test_an_unreachable_round_state_is_shown_and_cleared_when_redis_answers_again():
    # prepare: a running job, then a status pass that could not read Redis
    running = next_status(
        JobStatus(), observe(rounds_facts=RoundFacts(job_status="running", current_round=3))
    )
    away = RoundFacts(current_round=3, unreachable="Connection refused")
    # execute
    during = next_status(running, observe(rounds_facts=away))
    after = next_status(
        during, observe(rounds_facts=RoundFacts(job_status="running", current_round=3))
    )
    # assert: the STATE column says why while it lasts; the phase and round hold
    assert last_condition(during) == "RoundStateUnavailable"
    assert during.phase is Phase.running and during.round == 3
    assert "Connection refused" in during.conditions[-1].message
    assert last_condition(after) == "Running"
    unavailable = next(c for c in after.conditions if c.type.value == "RoundStateUnavailable")
    assert unavailable.status == "False" and unavailable.reason == "RedisReachable"


def test_the_status_shows_the_tasks_metrics_and_the_headline_for_the_printer_column():
    record = {"round": 2, "selected": 4, "reported": 4, "metrics": {"mae": 0.4321, "rmse": 0.6}}
    facts = RoundFacts(job_status="running", current_round=3, closed_rounds=2, last_record=record)
    evaluation = Evaluation(metric="mae", goal="minimize")
    status = next_status(JobStatus(), observe(rounds_facts=facts, evaluation=evaluation))
    assert status.last_metrics == {"mae": 0.4321, "rmse": 0.6}
    assert status.metric == "mae 0.4321"
    assert status.last_accuracy is None


def test_without_central_data_the_status_shows_the_sites_evaluation_per_tenant():
    sites = {
        "metrics": {"auroc": 0.81234567},
        "tenants": {"b": {"metrics": {"auroc": 0.7}}, "a": {"metrics": {"auroc": 0.9}}},
    }
    record = {"round": 2, "selected": 4, "reported": 4, "metrics": {}, "sites": sites}
    facts = RoundFacts(job_status="running", current_round=3, closed_rounds=2, last_record=record)
    evaluation = Evaluation(metric="auroc", central=False, sites="all")
    status = next_status(JobStatus(), observe(rounds_facts=facts, evaluation=evaluation))
    assert status.site_metrics == {"auroc": 0.812346}
    assert status.tenant_metrics == {"a": {"auroc": 0.9}, "b": {"auroc": 0.7}}
    assert status.metric == "auroc 0.8123" and status.last_metrics is None


def test_a_round_with_failed_tasks_names_each_client_and_the_next_round_clears_them():
    failure = "task x:Task: train: RuntimeError: scanner of b is offline"
    record = {"round": 2, "selected": 4, "reported": 3, "task_failures": {"b-0": failure}}
    facts = RoundFacts(job_status="running", current_round=3, closed_rounds=2, last_record=record)
    failed = next_status(JobStatus(), observe(rounds_facts=facts))
    assert failed.task_failures == {"b-0": failure}
    clean = {"round": 3, "selected": 4, "reported": 4, "task_failures": {}}
    facts = RoundFacts(job_status="running", current_round=4, closed_rounds=3, last_record=clean)
    assert next_status(failed, observe(rounds_facts=facts)).task_failures is None
