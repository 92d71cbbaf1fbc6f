"""The close of a round, in the pieces that need no Redis: noise, evaluation, the record.

A round closes in this order (the loop in :mod:`.rounds` makes the calls
and does the I/O between them): reduce the regions' partials to the round's
mean delta; central DP's Gaussian noise on it, once for the whole hierarchy
(:func:`fedkube.training.privacy.central_noise_std`, :func:`privacy_record`); the
strategy's server step; the central evaluation on the held-out split (:class:`CentralEvaluation`);
the history record (:func:`participation`, :func:`history_record`), which is
also the checkpoint's metadata; then the clients' evaluation of the new model
at their sites, shown by :class:`SiteGauges`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedkube.aggregator.global_aggregator.common import log
from fedkube.aggregator.strategies import StrategyInfo
from fedkube.aggregator.strategies.sums import Partial, RoundAggregate, Tensors
from fedkube.service.logs import fields
from fedkube.service.metrics import Metrics
from fedkube.spec import MAX_METRICS, DifferentialPrivacy, FederatedJob, JobSpec
from fedkube.task import Task, TaskContext, TaskFailed
from fedkube.training import privacy
from fedkube.training.learning import load_data, load_float_state

if TYPE_CHECKING:
    import torch.nn as nn


def state_summary(strategy: StrategyInfo, server_state: Tensors) -> dict[str, float]:
    """The strategy's state as norms (rounded), for ``/metrics`` and the history."""
    return {
        key: round(value, 6) for key, value in strategy.module.state_summary(server_state).items()
    }


async def privatise(
    dp: DifferentialPrivacy, accountant: privacy.Accountant, rate: float, aggregate: RoundAggregate
) -> tuple[RoundAggregate, float, dict[str, float]]:
    """Central DP: the round's mean with its Gaussian noise (in an executor), once for the
    whole hierarchy; and, both modes, the privacy spent so far with this round's
    sampling ``rate``: ε and the record's entries."""
    z = accountant.noise_multiplier
    std = privacy.central_noise_std(dp, z, aggregate.count)
    if std is not None:
        noised = await asyncio.get_running_loop().run_in_executor(
            None, privacy.add_gaussian_noise, aggregate.delta, std, privacy.noise_rng()
        )
        aggregate = dataclasses.replace(aggregate, delta=noised)
    epsilon = accountant.spend(rate)
    return aggregate, epsilon, privacy_record(epsilon, dp.delta, z, rate)


def privacy_record(
    epsilon: float, delta: float, noise_multiplier: float, rate: float
) -> dict[str, float]:
    """The privacy spent so far, for the round's record (``dp_rate`` rebuilds the accountant)."""
    return {
        "epsilon": round(epsilon, 6),
        "delta": delta,
        "noise_multiplier": round(noise_multiplier, 6),
        "dp_rate": rate,
    }


def central_due(spec: JobSpec, number: int) -> bool:
    """Whether round ``number`` is one the central evaluation runs after (``everyRounds``,
    and always the last)."""
    return number % spec.evaluation.every_rounds == 0 or number == spec.rounds


def participation(
    regions: Collection[str],
    selected: Collection[str],
    region_of: Mapping[str, str],
    partials: Mapping[str, Partial],
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per region, clients selected and reported; and the regions with selected clients
    whose combiner sent no partial."""
    by_region: dict[str, dict[str, int]] = {}
    missing: list[str] = []
    for region in sorted(regions):
        chosen = sum(1 for c in selected if region_of[c] == region)
        if chosen and region not in partials:
            missing.append(region)
        got = partials[region].count if region in partials else 0
        by_region[region] = {"selected": chosen, "reported": got}
    return by_region, missing


def history_record(
    *,
    number: int,
    evaluated: Mapping[str, float],
    selected: int,
    partials: Sequence[Partial],
    duration_s: float,
    counters: Mapping[str, int],
    regions: Mapping[str, Mapping[str, int]],
    missing: Sequence[str],
    extensions: int,
    task_failures: Mapping[str, str],
    strategy: str,
    robust: str,
    server_state: Mapping[str, float],
    privacy: Mapping[str, float],
    secure: bool,
) -> dict[str, Any]:
    """Round ``number``'s record: the history's entry and the checkpoint's metadata."""
    reported = sum(p.count for p in partials)
    record: dict[str, Any] = {
        "round": number,
        "loss": evaluated.get("loss"),
        "accuracy": evaluated.get("accuracy"),
        "metrics": dict(evaluated),
        "selected": selected,
        "reported": reported,
        "dropped": selected - reported,
        "participation": reported / selected if selected else 0.0,
        "weight": sum(p.weight for p in partials),
        "duration_s": duration_s,
        "bytes_up": counters.get("bytes_up", 0),
        "bytes_down": counters.get("bytes_down", 0),
        "duplicates": counters.get("duplicate", 0),
        "late": counters.get("late", 0),
        "regions": dict(regions),
        # Regions with selected clients whose combiner sent no partial.
        "missing_regions": list(missing),
        "extensions": extensions,
        # Clients whose task failed the round, with the failure's first line.
        "task_failures": dict(task_failures),
        "strategy": strategy,
        "robust": robust,
        "server_state": dict(server_state),
        **privacy,
    }
    if secure:
        # Its keys and shares, sent beside the masked updates (bytes_up).
        record["secagg_bytes"] = counters.get("secagg_bytes", 0)
    return record


class CentralEvaluation:
    """The task's metrics of the global model on the held-out split (role ``test``).

    The split is loaded once, at the first evaluation. Called in an executor.
    """

    def __init__(self, job: FederatedJob, task: Task, model: nn.Module):
        self.job = job
        self.task = task
        self.model = model
        self._test_data: Any = None

    def __call__(self, weights: Tensors, number: int) -> Mapping[str, float]:
        """A failure of the task's code is logged with its traceback and the round
        goes on unevaluated: the model is not lost for want of a number."""
        ctx = TaskContext(self.job, "test", round=number, seed=self.job.spec.seed)
        try:
            if self._test_data is None:
                self._test_data = load_data(self.job, "test", task=self.task)
            load_float_state(self.model, weights)
            return self.task.evaluate(self.model, self._test_data, ctx).metrics
        except TaskFailed as exc:
            log.error(
                "evaluation failed: %s\n%s",
                exc,
                exc.details.rstrip(),
                extra=fields(job=self.job.name, round=number),
            )
            return {}


class SiteGauges:
    """``fedkube_eval_metric{scope="site"}``: overall (tenant empty) and per tenant.

    At most :data:`fedkube.spec.MAX_METRICS` names reach Prometheus over the
    job's life, whatever the tenants report.
    """

    def __init__(self, metrics: Metrics, job: str):
        self.metrics = metrics
        self.job = job
        self._names: set[str] = set()

    def show(self, summary: Mapping[str, Any]) -> None:
        scopes = [("", summary["metrics"])] + [
            (tenant, entry["metrics"]) for tenant, entry in summary["tenants"].items()
        ]
        for tenant, metrics in scopes:
            for name, score in metrics.items():
                if name not in self._names:
                    if len(self._names) >= MAX_METRICS:
                        continue
                    self._names.add(name)
                self.metrics.eval_metric.labels(self.job, "site", tenant, name).set(score)
