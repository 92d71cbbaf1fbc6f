"""Evaluation at the sites: when it is due, what a client reports, how reports add up.

After a round closes (every ``spec.evaluation.everyRounds``, and after the
last round), the global aggregator opens an *evaluation* of the new model:
the clients that ``spec.evaluation.sites`` names evaluate it on their own
validation data (role ``validation``) and report their task's metrics with
the number of examples. Their combiner checks each report here
(:func:`check_report`) and folds it into per-tenant sums in Redis
(:meth:`fedkube.state.roundstate.RoundStore.record_evaluation`); the global tier
turns the sums into example-weighted means per tenant and overall
(:func:`summarise`) and writes them into the round's history record under
``sites``. After the last round every client evaluates the final model
(``crossSite``), as NVIDIA FLARE's cross-site validation does.

A client whose task failed to evaluate reports the failure's first line
instead: the evaluation goes on with the others, and the record says who
failed and why.

Pure functions: no I/O, and no torch: the combiners' slim image imports this.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedkube.errors import UpdateRejected
from fedkube.spec import MAX_METRICS, METRIC_NAME, FederatedJob
from fedkube.wire.protocol import Reason, first_line, int_field

# A failure's reason as a report carries it (its first line): longer is cut.
MAX_ERROR_CHARS = 500
MAX_EXAMPLES = 10**12
NAME = re.compile(METRIC_NAME)


@dataclass(frozen=True)
class Report:
    """One client's evaluation of one model: its metrics, or why it has none."""

    client: str
    round: int
    version: int
    examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None

    def document(self) -> dict[str, Any]:
        """The report as the worker sends it (``POST /v1/evaluation``)."""
        body: dict[str, Any] = {"client": self.client, "round": self.round, "version": self.version}
        if self.error is not None:
            body["error"] = self.error
        else:
            body.update(examples=self.examples, metrics=dict(self.metrics))
        return body


def _refuse(problem: str) -> UpdateRejected:
    return UpdateRejected(Reason.malformed.value, problem)


def check_report(document: Any) -> Report:
    """A worker's report, checked field by field (:class:`UpdateRejected` names the field).

    ``metrics`` must be a flat map of at most :data:`fedkube.task.MAX_METRICS`
    finite numbers named ``[a-z][a-z0-9_]*``, the same rule the worker
    applies to its task's result: a report that passed a tampered worker is
    refused here all the same.
    """
    if not isinstance(document, Mapping):
        raise _refuse('expected {"client", "round", "version", "examples", "metrics"}')
    client = document.get("client")
    if not isinstance(client, str) or not client:
        raise _refuse("client: expected a client id")
    number = int_field(document, "round", 1, 10**9)
    version = int_field(document, "version", 1, 10**9)
    error = document.get("error")
    if error is not None:
        if not isinstance(error, str):
            raise _refuse("error: expected the failure's first line")
        return Report(client, number, version, error=first_line(error, MAX_ERROR_CHARS))
    examples = int_field(document, "examples", 1, MAX_EXAMPLES)
    metrics = document.get("metrics")
    if not isinstance(metrics, Mapping):
        raise _refuse("metrics: expected a map of metric names to numbers")
    if len(metrics) > MAX_METRICS:
        raise _refuse(f"metrics: {len(metrics)} names; at most {MAX_METRICS}")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        # fullmatch: the pattern's $ would let match() take "accuracy\n" too.
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _refuse(f"metrics: name {name!r} is not [a-z][a-z0-9_]*")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _refuse(f"metrics.{name}: expected a number, got {type(value).__name__}")
        try:
            real = float(value)
        except OverflowError:  # a JSON integer beyond float's range (10**400)
            real = math.inf
        if not math.isfinite(real):
            raise _refuse(f"metrics.{name}: {str(value)[:40]} is not finite")
        checked[name] = real
    return Report(client, number, version, examples, checked)


def due(job: FederatedJob, number: int) -> bool:
    """Whether the model after round ``number`` is evaluated at the sites."""
    evaluation = job.spec.evaluation
    if evaluation.sites == "none":
        return False
    if number == job.spec.rounds:
        return True
    return number % evaluation.every_rounds == 0


def everyone(job: FederatedJob, number: int) -> bool:
    """Whether every client (not only the round's selected) evaluates after ``number``."""
    evaluation = job.spec.evaluation
    final = number == job.spec.rounds and evaluation.cross_site
    return evaluation.sites == "all" or final


@dataclass
class TenantSums:
    """One tenant's reports, summed: Σ n·m and Σ n per metric (n: a client's examples)."""

    examples: int = 0
    clients: int = 0
    weighted: dict[str, float] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)

    def add(self, examples: int, metrics: Mapping[str, float]) -> None:
        self.examples += examples
        self.clients += 1
        for name, value in metrics.items():
            self.weighted[name] = self.weighted.get(name, 0.0) + examples * value
            self.counted[name] = self.counted.get(name, 0) + examples

    def absorb(self, other: TenantSums) -> None:
        """Add ``other``'s sums to these (a tenant's into everyone's)."""
        self.examples += other.examples
        self.clients += other.clients
        for name, value in other.weighted.items():
            self.weighted[name] = self.weighted.get(name, 0.0) + value
            self.counted[name] = self.counted.get(name, 0) + other.counted.get(name, 0)

    def means(self) -> dict[str, float]:
        return {
            name: self.weighted[name] / self.counted[name]
            for name in sorted(self.weighted)
            if self.counted.get(name)
        }


def tenant_sums(raw: Mapping[str, str]) -> dict[str, TenantSums]:
    """Per-tenant sums from their Redis hash (``<tenant>|examples``, ``<tenant>|w|<metric>``...)."""
    tenants: dict[str, TenantSums] = {}
    for key, value in raw.items():
        tenant, _, rest = key.partition("|")
        sums = tenants.setdefault(tenant, TenantSums())
        if rest == "examples":
            sums.examples = int(value)
        elif rest == "clients":
            sums.clients = int(value)
        elif rest.startswith("w|"):
            sums.weighted[rest[2:]] = float(value)
        elif rest.startswith("n|"):
            sums.counted[rest[2:]] = int(value)
    return tenants


def summarise(
    tenants: Mapping[str, TenantSums],
    failed: Mapping[str, str],
    expected: int,
    final: bool,
) -> dict[str, Any]:
    """The ``sites`` entry of a history record: means per tenant and over everyone.

    Every mean is weighted by examples: the overall accuracy is the share of
    all validation examples classified right, whichever site holds them.
    """
    overall = TenantSums()
    for sums in tenants.values():
        overall.absorb(sums)
    return {
        "final": final,
        "expected": expected,
        "clients": overall.clients,
        "examples": overall.examples,
        "metrics": overall.means(),
        "tenants": {
            name: {"clients": s.clients, "examples": s.examples, "metrics": s.means()}
            for name, s in sorted(tenants.items())
        },
        "failed": dict(sorted(failed.items())),
    }
