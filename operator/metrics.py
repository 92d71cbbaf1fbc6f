"""The operator's own ``fedkube_operator_*`` series, served on ``--metrics-port``."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.operator.status import Phase

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconcile_seconds = Histogram(
            "fedkube_operator_reconcile_duration_seconds",
            "Time of one reconcile pass over a job's children.",
            ["trigger"],
            buckets=_SECONDS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "fedkube_operator_reconcile_errors_total",
            "Reconcile passes that failed, by kind (temporary: retried; permanent: bad spec).",
            ["kind"],
            registry=r,
        )
        self.writes = Counter(
            "fedkube_operator_writes_total",
            "Child objects written, by action (apply, delete) and kind.",
            ["action", "kind"],
            registry=r,
        )
        self.drift_corrections = Counter(
            "fedkube_operator_drift_corrections_total",
            "Children applied again because a field the operator sets was changed by hand.",
            ["kind"],
            registry=r,
        )
        self.jobs = Gauge(
            "fedkube_operator_jobs",
            "FederatedJobs this operator watches, by phase.",
            ["phase"],
            registry=r,
        )
        self._phases: dict[str, str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def job_phase(self, uid: str, phase: str | None) -> None:
        """Record a job's phase (None: the job is gone) and refresh the gauge."""
        if phase is None:
            self._phases.pop(uid, None)
        else:
            self._phases[uid] = phase
        self._set(self._phases)

    def _set(self, phases: Mapping[str, str]) -> None:
        for phase in Phase:
            self.jobs.labels(phase.value).set(sum(1 for p in phases.values() if p == phase.value))
