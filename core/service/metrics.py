"""The ``fedkube_*`` Prometheus series, one definition for every service.

Each service builds its collectors in its own ``CollectorRegistry`` so that
several services can share a process (tests, Ray actors) without clashing.
Labels: ``job`` always; ``tier`` (worker, combiner, global), ``region`` and
``tenant`` where they apply. "Up" is toward the global aggregator (updates,
partials), "down" toward the workers (models); byte counters are labelled by
the tier that measured them.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """All collectors; a service touches the ones that concern it."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.round_current = Gauge(
            "fedkube_round_current",
            "Round currently open (or last closed).",
            ["job", "tier", "region"],
            registry=r,
        )
        self.round_duration = Histogram(
            "fedkube_round_duration_seconds",
            "Wall time from a round's opening to its close.",
            ["job"],
            buckets=_SECONDS,
            registry=r,
        )
        self.rounds_completed = Counter(
            "fedkube_rounds_completed_total",
            "Rounds closed with an aggregate.",
            ["job"],
            registry=r,
        )
        self.clients_selected = Gauge(
            "fedkube_clients_selected",
            "Clients selected for the current round.",
            ["job", "region"],
            registry=r,
        )
        self.clients_reported = Gauge(
            "fedkube_clients_reported",
            "Clients whose update was accepted this round.",
            ["job", "region"],
            registry=r,
        )
        self.clients_dropped = Counter(
            "fedkube_clients_dropped_total",
            "Selected clients that did not report before close.",
            ["job", "region"],
            registry=r,
        )
        self.participation = Gauge(
            "fedkube_participation_ratio",
            "Reported over selected clients, last closed round.",
            ["job", "region"],
            registry=r,
        )
        self.bytes_up = Counter(
            "fedkube_bytes_up_total",
            "Payload bytes received from the tier below.",
            ["job", "tier", "region", "tenant"],
            registry=r,
        )
        self.bytes_down = Counter(
            "fedkube_bytes_down_total",
            "Model bytes sent to the tier below.",
            ["job", "tier", "region", "tenant"],
            registry=r,
        )
        self.updates_accepted = Counter(
            "fedkube_updates_accepted_total",
            "Updates validated and folded.",
            ["job", "tier", "region", "tenant"],
            registry=r,
        )
        self.updates_rejected = Counter(
            "fedkube_updates_rejected_total",
            "Updates refused, by reason.",
            ["job", "tier", "region", "tenant", "reason"],
            registry=r,
        )
        self.aggregation_seconds = Histogram(
            "fedkube_aggregation_seconds",
            "Time spent folding or reducing, per tier.",
            ["job", "tier", "region"],
            buckets=_SECONDS,
            registry=r,
        )
        self.updates_clipped = Counter(
            "fedkube_updates_clipped_total",
            "Updates scaled down to spec.strategy.robust.normBound before aggregation.",
            ["job", "region", "tenant"],
            registry=r,
        )
        self.strategy_info = Gauge(
            "fedkube_strategy_info",
            "1 for the job's strategy and robust rule (the labels say which).",
            ["job", "strategy", "robust"],
            registry=r,
        )
        self.strategy_state = Gauge(
            "fedkube_strategy_state",
            "Norms of the server strategy's state (momentum, moments, control variate).",
            ["job", "strategy", "quantity"],
            registry=r,
        )
        self.state_store_up = Gauge(
            "fedkube_state_store_up",
            "1 while this component reaches the round state (Redis), 0 during an outage.",
            ["job", "tier", "region"],
            registry=r,
        )
        self.updates_recovered = Counter(
            "fedkube_updates_recovered_total",
            "Updates folded again after a combiner restart (resent by their workers).",
            ["job", "region", "tenant"],
            registry=r,
        )
        self.secagg_dropouts = Counter(
            "fedkube_secagg_dropouts_total",
            "Clients that sent their keys under secure aggregation but no masked update "
            "(their masks were removed with their neighbours' shares).",
            ["job", "region"],
            registry=r,
        )
        self.secagg_failures = Counter(
            "fedkube_secagg_failures_total",
            "Rounds in which a region's secure aggregation could not produce its sum.",
            ["job", "region"],
            registry=r,
        )
        self.model_loss = Gauge(
            "fedkube_model_loss", "Global model loss on the held-out set.", ["job"], registry=r
        )
        self.model_accuracy = Gauge(
            "fedkube_model_accuracy",
            "Global model accuracy on the held-out set.",
            ["job"],
            registry=r,
        )
        self.eval_metric = Gauge(
            "fedkube_eval_metric",
            "The task's evaluation metrics of the global model. Scope central: the global "
            "tier's held-out split (tenant empty). Scope site: the clients' own validation "
            "data, example-weighted, per tenant and overall (tenant empty). At most 16 names "
            "per job.",
            ["job", "scope", "tenant", "metric"],
            registry=r,
        )
        self.dp_epsilon = Gauge(
            "fedkube_dp_epsilon",
            "Differential privacy spent so far: epsilon at the job's delta "
            "(spec.privacy.dp), from the RDP accountant.",
            ["job"],
            registry=r,
        )
        self.train_seconds = Histogram(
            "fedkube_worker_train_seconds",
            "Local training time per round.",
            ["job", "region", "tenant"],
            buckets=_SECONDS,
            registry=r,
        )
        self.worker_rounds = Counter(
            "fedkube_worker_rounds_total",
            "Rounds in which the worker sent an update.",
            ["job", "region", "tenant"],
            registry=r,
        )
        self.evaluation_reports = Counter(
            "fedkube_evaluation_reports_total",
            "Clients' evaluation reports at their combiner, by outcome: evaluated, failed "
            "(the task could not evaluate) or rejected (a malformed or unexpected report).",
            ["job", "region", "tenant", "outcome"],
            registry=r,
        )
        self.task_failures = Counter(
            "fedkube_task_failures_total",
            "Client rounds lost to the task's code (an exception, a bad result), by step.",
            ["job", "region", "tenant", "step"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, _request: web.Request) -> web.Response:
        """aiohttp handler for ``GET /metrics``."""
        response = web.Response(body=self.exposition())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response
