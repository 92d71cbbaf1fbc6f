"""The FederatedJob status: its typed model and the pure rules that compute it.

The operator's status timer gathers facts (the round state in Redis, the
pods' phases, the clock) into :class:`Observation` and calls
:func:`next_status`, a pure function, so every rule (suspend, deadline,
backoff limit, Unschedulable) is unit-tested without a cluster or a Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from fedkube.spec import Evaluation
from fedkube.training import headline


class Phase(str, Enum):
    pending = "Pending"
    running = "Running"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"


FINISHED = (Phase.succeeded, Phase.failed)


class ConditionType(str, Enum):
    created = "Created"
    running = "Running"
    suspended = "Suspended"
    unschedulable = "Unschedulable"
    refused = "Refused"
    # Redis (the round state) does not answer: the job is paused, not lost.
    state_unavailable = "RoundStateUnavailable"
    succeeded = "Succeeded"
    failed = "Failed"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Model):
    type: ConditionType
    status: str = Field(description="True, False or Unknown")
    reason: str = Field(description="CamelCase reason")
    message: str = ""
    last_transition_time: str = Field(description="RFC 3339")


class JobStatus(_Model):
    """What ``kubectl get/describe fedjob`` shows; written only by the operator."""

    phase: Phase = Phase.pending
    round: int = Field(default=0, description="the round in progress (or the last one)")
    rounds: int = Field(default=0, description="spec.rounds, for the printer column")
    closed_rounds: int = Field(default=0, description="rounds closed so far")
    progress: str = Field(default="", description="closed rounds / spec.rounds")
    participation: str = Field(
        default="", description="reported / selected clients of the last closed round"
    )
    clients: int = Field(
        default=0, description="clients of the job (under spec.simulation: virtual clients)"
    )
    last_loss: float | None = Field(default=None, description="global model, last evaluation")
    last_accuracy: float | None = Field(default=None, description="global model, last evaluation")
    last_metrics: dict[str, float] | None = Field(
        default=None, description="the task's metrics of the global model, last evaluation"
    )
    task_failures: dict[str, str] | None = Field(
        default=None,
        description="clients whose task failed the last closed round, with the failure's "
        "first line (also a TaskFailed Event)",
    )
    site_metrics: dict[str, float] | None = Field(
        default=None,
        description="the sites' evaluation of the last model they evaluated: the task's "
        "metrics on the clients' own validation data, example-weighted over all of them",
    )
    tenant_metrics: dict[str, dict[str, float]] | None = Field(
        default=None, description="the same, per tenant"
    )
    metric: str | None = Field(
        default=None,
        description="spec.evaluation.metric and its last value, for the printer column",
    )
    epsilon: float | None = Field(
        default=None,
        description="differential privacy spent so far (epsilon at spec.privacy.dp.delta)",
    )
    strategy: str | None = Field(
        default=None, description="the strategy of the last closed round (with its robust rule)"
    )
    server_state: dict[str, float] | None = Field(
        default=None,
        description="norms of the strategy's server state after the last closed round "
        "(momentum, moments, SCAFFOLD's control variate)",
    )
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    failures: int = Field(default=0, description="pod failures counted against backoffLimit")
    refused_tenants: list[str] | None = Field(
        default=None,
        description="tenants whose site's policy refuses the job (they take no part; "
        "the Refused condition says why)",
    )
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class RoundFacts:
    """The job's round state as read from Redis (all optional: Redis may be empty)."""

    job_status: str | None = None  # running / succeeded / failed (fedkube:{job}:job)
    job_message: str = ""
    current_round: int = 0
    closed_rounds: int = 0
    last_record: dict[str, Any] | None = None
    paused: bool = False  # what the aggregator was told of spec.suspend
    # tenant -> why its site refused the job (reported through its combiner)
    refused: dict[str, str] = field(default_factory=dict)
    # Why Redis could not be read this time ("" when it was): the status
    # keeps the last round it saw and says so.
    unreachable: str = ""


@dataclass(frozen=True)
class PodFacts:
    """What the worker pods say: who cannot be placed, who failed."""

    unschedulable: dict[str, str] = field(default_factory=dict)  # tenant -> scheduler message
    new_failures: int = 0  # Failed pods removed (to be recreated) since the last status
    restarts: int = 0  # container restarts of the pods that exist now


@dataclass(frozen=True)
class Observation:
    generation: int
    rounds: int
    clients: int
    suspend: bool
    active_deadline_seconds: int | None
    backoff_limit: int
    now: datetime
    rounds_facts: RoundFacts
    pods: PodFacts
    # tenant -> why this site's own policy refuses it (site mode)
    refused: dict[str, str] = field(default_factory=dict)
    evaluation: Evaluation = field(default_factory=Evaluation)  # the job's headline metric


def refused_status(previous: JobStatus, message: str, now: datetime) -> JobStatus:
    """A job this operator refuses to run at all (the central allowlist): Failed, no children."""
    if previous.phase is Phase.failed and previous.message == message:
        return previous
    conditions = set_condition(
        list(previous.conditions), ConditionType.failed, True, "EntrypointNotAllowed", message, now
    )
    return previous.model_copy(
        update={
            "phase": Phase.failed,
            "message": message,
            "conditions": conditions,
            "completion_time": previous.completion_time or rfc3339(now),
        }
    )


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def set_condition(
    conditions: list[Condition],
    kind: ConditionType,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
) -> list[Condition]:
    """A new list with ``kind`` set.

    The last entry is the job's current state, which the State printer column
    shows (``.status.conditions[-1:].type``), as in Kubeflow's TrainJob: a
    condition that becomes True moves to the end, one that becomes False to
    the front (kept, since its history matters for ``describe``). A condition
    that never was True is not added as False.
    """
    value = "True" if status else "False"
    current = next((c for c in conditions if c.type == kind), None)
    if current is not None and (current.status, current.reason, current.message) == (
        value,
        reason,
        message,
    ):
        return list(conditions)
    others = [c for c in conditions if c.type != kind]
    if current is None and not status:
        return others
    updated = Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=(
            current.last_transition_time
            if current is not None and current.status == value
            else rfc3339(now)
        ),
    )
    if status:
        return [*others, updated]
    if current is not None and current.status == value:
        return [updated if c.type == kind else c for c in conditions]
    return [updated, *others]


def _round_fields(
    status: JobStatus, facts: RoundFacts, rounds: int, evaluation: Evaluation
) -> dict[str, Any]:
    record = facts.last_record or {}
    selected = int(record.get("selected", 0) or 0)
    reported = int(record.get("reported", 0) or 0)
    fields: dict[str, Any] = {
        "round": max(facts.current_round, facts.closed_rounds),
        "closed_rounds": facts.closed_rounds,
        "progress": f"{facts.closed_rounds}/{rounds}",
        "participation": f"{reported}/{selected}" if selected else status.participation,
    }
    if record.get("loss") is not None:
        fields["last_loss"] = round(float(record["loss"]), 6)
    if record.get("accuracy") is not None:
        fields["last_accuracy"] = round(float(record["accuracy"]), 6)
    metrics = record.get("metrics")
    if isinstance(metrics, dict) and metrics:
        fields["last_metrics"] = _rounded(metrics)
    failures = record.get("task_failures")
    if isinstance(failures, dict):
        fields["task_failures"] = {str(c): str(m) for c, m in sorted(failures.items())} or None
    sites = record.get("sites")
    if isinstance(sites, dict) and sites.get("metrics"):
        fields["site_metrics"] = _rounded(sites["metrics"])
        fields["tenant_metrics"] = {
            str(tenant): _rounded(entry.get("metrics", {}))
            for tenant, entry in sorted(sites.get("tenants", {}).items())
        }
    value = headline.value(record, evaluation)
    if value is not None:
        fields["metric"] = f"{evaluation.metric} {headline.show(value, evaluation)}"
    if record.get("epsilon") is not None:
        fields["epsilon"] = round(float(record["epsilon"]), 4)
    if record.get("strategy"):
        robust = record.get("robust") or "none"
        fields["strategy"] = record["strategy"] + ("" if robust == "none" else f"+{robust}")
    if isinstance(record.get("server_state"), dict) and record["server_state"]:
        fields["server_state"] = {
            str(key): round(float(value), 6) for key, value in record["server_state"].items()
        }
    return fields


def next_status(previous: JobStatus, seen: Observation) -> JobStatus:
    """The status that follows ``previous`` given what was just observed.

    Terminal phases stick: once Succeeded or Failed, only the round fields
    may still catch up (the last record can land after the job's status).
    """
    now = seen.now
    facts = seen.rounds_facts
    status = previous.model_copy(
        update={
            "rounds": seen.rounds,
            "clients": seen.clients,
            "observed_generation": seen.generation,
            **_round_fields(previous, facts, seen.rounds, seen.evaluation),
        }
    )
    conditions = status.conditions
    if not conditions:
        conditions = set_condition(
            conditions, ConditionType.created, True, "Created", "children created", now
        )
    if status.phase in FINISHED:
        return status.model_copy(update={"conditions": conditions})
    start = status.start_time or rfc3339(now)
    removed = status.failures + seen.pods.new_failures
    update: dict[str, Any] = {"start_time": start, "failures": removed}
    failures = removed + seen.pods.restarts

    phase: Phase
    message = ""
    if facts.job_status == "succeeded":
        phase, message = Phase.succeeded, facts.job_message or "all rounds completed"
        conditions = set_condition(
            conditions, ConditionType.running, False, "Completed", message, now
        )
        conditions = set_condition(
            conditions, ConditionType.succeeded, True, "RoundsCompleted", message, now
        )
    elif facts.job_status == "failed":
        phase, message = Phase.failed, facts.job_message or "the aggregator failed the job"
        conditions = set_condition(conditions, ConditionType.running, False, "Failed", message, now)
        conditions = set_condition(
            conditions, ConditionType.failed, True, "AggregatorFailed", message, now
        )
    elif (
        seen.active_deadline_seconds is not None
        and not seen.suspend
        and (now - parse_time(start)).total_seconds() > seen.active_deadline_seconds
    ):
        phase = Phase.failed
        message = f"the job ran longer than activeDeadlineSeconds={seen.active_deadline_seconds}"
        conditions = set_condition(conditions, ConditionType.running, False, "Failed", message, now)
        conditions = set_condition(
            conditions, ConditionType.failed, True, "DeadlineExceeded", message, now
        )
    elif failures > seen.backoff_limit:
        phase = Phase.failed
        message = f"{failures} pod failures exceed backoffLimit={seen.backoff_limit}"
        conditions = set_condition(conditions, ConditionType.running, False, "Failed", message, now)
        conditions = set_condition(
            conditions, ConditionType.failed, True, "BackoffLimitExceeded", message, now
        )
    elif seen.suspend:
        phase, message = Phase.suspended, "spec.suspend is true: every pod is stopped"
        conditions = set_condition(
            conditions, ConditionType.running, False, "Suspended", message, now
        )
        conditions = set_condition(
            conditions, ConditionType.suspended, True, "Suspended", message, now
        )
    else:
        conditions = set_condition(
            conditions, ConditionType.suspended, False, "Resumed", "spec.suspend is false", now
        )
        if facts.job_status == "running" or facts.current_round > 0:
            phase = Phase.running
            message = f"round {status.round} of {seen.rounds}"
            conditions = set_condition(
                conditions, ConditionType.running, True, "RoundsInProgress", "rounds started", now
            )
        else:
            phase, message = Phase.pending, "waiting for the aggregator and a quorum of workers"

    if seen.pods.unschedulable and phase not in FINISHED:
        names = ", ".join(
            f"tenant {tenant}: {why}" for tenant, why in sorted(seen.pods.unschedulable.items())
        )
        conditions = set_condition(
            conditions, ConditionType.unschedulable, True, "PodsUnschedulable", names, now
        )
    else:
        conditions = set_condition(
            conditions, ConditionType.unschedulable, False, "Scheduled", "every pod is placed", now
        )
    if facts.unreachable and phase not in FINISHED:
        conditions = set_condition(
            conditions,
            ConditionType.state_unavailable,
            True,
            "RedisUnreachable",
            f"the round state (Redis) does not answer; rounds pause until it does: "
            f"{facts.unreachable}",
            now,
        )
    else:
        conditions = set_condition(
            conditions,
            ConditionType.state_unavailable,
            False,
            "RedisReachable",
            "the round state answers",
            now,
        )
    refused = {**facts.refused, **seen.refused}
    if refused:
        reasons = "; ".join(f"tenant {tenant}: {why}" for tenant, why in sorted(refused.items()))
        conditions = set_condition(
            conditions, ConditionType.refused, True, "PolicyRefused", reasons, now
        )
        update["refused_tenants"] = sorted(refused)
    if phase in FINISHED:
        update["completion_time"] = rfc3339(now)
    update.update(phase=phase, message=message, conditions=conditions)
    return status.model_copy(update=update)


def _rounded(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): round(float(v), 6) for k, v in sorted(metrics.items())}
