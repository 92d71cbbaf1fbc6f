"""The combiner's side of evaluation at the sites: hand out, check and record reports.

The global aggregator opens an evaluation in Redis (:mod:`fedkube.training.evaluation`);
the combiner hands each of its expected clients an ``evaluate`` task, checks
every report at the boundary and folds it into its tenant's sums in Redis.
Nothing here holds a sum in memory: a restarted combiner carries on from
Redis, and a report it recorded before the restart is a duplicate after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from fedkube.aggregator.validation import check_client
from fedkube.errors import UpdateRejected
from fedkube.service.logs import fields
from fedkube.service.metrics import Metrics
from fedkube.spec import Client
from fedkube.state.roundstate import EvaluationInfo, RoundStore
from fedkube.training.evaluation import check_report
from fedkube.wire.protocol import Reason

log = logging.getLogger("fedkube.combiner")


@dataclass
class _Open:
    info: EvaluationInfo
    expected: set[str]  # this region's clients asked to evaluate
    done: set[str] = field(default_factory=set)  # of those, the ones that reported


class SiteReports:
    """One combiner's view of the open evaluation at the sites (if any)."""

    def __init__(
        self,
        store: RoundStore,
        job: str,
        region: str,
        clients: Mapping[str, Client],
        metrics: Metrics,
    ):
        self.store = store
        self.job = job
        self.region = region
        self.clients = clients
        self.metrics = metrics
        self.current: _Open | None = None

    async def sync(self) -> int | None:
        """Follow Redis; the model version to fetch when an evaluation here just opened."""
        info = await self.store.evaluation()
        if info is None or not info.open:
            self.current = None
            return None
        current = self.current
        if current is not None and current.info == info:
            return None
        expected = {
            c for c in await self.store.evaluation_expected(info.round) if c in self.clients
        }
        done = await self.store.evaluation_done(info.round) & expected
        self.current = _Open(info, expected, done)
        if expected:
            log.info(
                "evaluation of model %d opened: %d clients here",
                info.version,
                len(expected),
                extra=fields(job=self.job, round=info.round, region=self.region),
            )
            return info.version
        return None

    def tasks_for(self, clients: set[str]) -> list[dict[str, Any]]:
        """An ``evaluate`` task for each of ``clients`` that still owes a report."""
        current = self.current
        if current is None or time.time() > current.info.deadline:
            return []
        task = {"round": current.info.round, "version": current.info.version}
        owing = (current.expected - current.done) & clients
        return [{"status": "evaluate", "client": c, **task} for c in sorted(owing)]

    async def receive(self, tenant: str, document: Any) -> dict[str, Any]:
        """Check one report and record it; :class:`UpdateRejected` says what is wrong."""
        try:
            return await self._receive(tenant, document)
        except UpdateRejected:
            self.metrics.evaluation_reports.labels(self.job, self.region, tenant, "rejected").inc()
            raise

    async def _receive(self, tenant: str, document: Any) -> dict[str, Any]:
        report = check_report(document)
        check_client(self.clients, report.client, tenant, self.region)
        current = self.current
        if (
            current is None
            or report.round != current.info.round
            or report.version != current.info.version
        ):
            raise UpdateRejected(
                Reason.wrong_round.value,
                f"no evaluation of model {report.version} (after round {report.round}) is open",
                409,
            )
        if report.client not in current.expected:
            raise UpdateRejected(
                Reason.not_selected.value,
                f"client {report.client!r} was not asked to evaluate model {report.version}",
                403,
            )
        try:
            recorded = await self.store.record_evaluation(
                report.round, report.client, tenant, report.examples, report.metrics, report.error
            )
        except RedisError as exc:
            raise UpdateRejected(
                Reason.unavailable.value, f"round state unavailable: {exc}", 503
            ) from None
        current.done.add(report.client)
        if not recorded:
            raise UpdateRejected(
                Reason.duplicate.value, f"client {report.client!r} already reported", 409
            )
        outcome = "failed" if report.error is not None else "evaluated"
        self.metrics.evaluation_reports.labels(self.job, self.region, tenant, outcome).inc()
        where = fields(
            job=self.job,
            round=report.round,
            region=self.region,
            tenant=tenant,
            client=report.client,
        )
        if report.error is not None:
            log.warning("the client could not evaluate: %s", report.error, extra=where)
        else:
            log.info("evaluation recorded: %d examples", report.examples, extra=where)
        return {"recorded": True}
