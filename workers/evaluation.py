"""Evaluation at the sites: a client's report on a global model, from its own validation data.

When its combiner hands out ``evaluate`` tasks (:mod:`fedkube.training.evaluation`),
the worker evaluates the model each names on the client's validation data
(role ``validation``) in its executor and reports once per client and round
(:class:`SiteEvaluations`). Whatever goes wrong in the user's code (loading
the validation data, ``evaluate()`` itself, a bad result) becomes a report
that carries the failure's first line, with the traceback in the worker's
log: one client's evaluation is lost, not the worker, and the job's record
says who and why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedkube.errors import CodecError
from fedkube.policy import DataBinding
from fedkube.service.logs import fields
from fedkube.spec import Client, FederatedJob
from fedkube.task import Task, TaskContext, TaskFailed, guarded
from fedkube.training.evaluation import Report
from fedkube.training.learning import load_data, load_float_state
from fedkube.training.strategy_client import split
from fedkube.workers.link import TRANSIT_ERRORS, CombinerLink
from fedkube.workers.seat import Identity, Seat

log = logging.getLogger("fedkube.worker")


def validation_data(
    job: FederatedJob, task: Task, client: Client, binding: DataBinding | None, scratch: Path
) -> Any:
    """The client's validation split, loaded the way its training data is."""
    where = task.reference if task.has("data") else str(job.spec.data.entrypoint)
    return guarded(where, "data", load_data, job, "validation", client, binding, task, scratch)


def evaluate_model(
    job: FederatedJob,
    task: Task,
    model: nn.Module,
    data: Any,
    model_tensors: dict[str, np.ndarray],
    ctx: TaskContext,
    version: int,
) -> Report:
    """``task.evaluate`` of the model ``model_tensors`` hold, as a report for the combiner."""
    assert ctx.client is not None
    weights, _control = split(model_tensors)
    load_float_state(model, weights)
    model.eval()
    try:
        result = task.evaluate(model, data, ctx)
    finally:
        model.train()
    return Report(ctx.client.id, ctx.round, version, result.examples, dict(result.metrics))


def failed_report(
    exc: TaskFailed, client: Client, number: int, version: int, job: FederatedJob
) -> Report:
    """The report of an evaluation the task could not do (logged with its traceback)."""
    log.error(
        "the task could not evaluate model %d: %s\n%s",
        version,
        exc,
        exc.details.rstrip(),
        extra=fields(job=job.name, round=number, tenant=client.tenant, client=client.id),
    )
    return Report(client.id, number, version, error=str(exc))


# Model ``version`` for round ``number``, downloaded once (the worker's round model).
ModelFor = Callable[[int, int], Awaitable[dict[str, np.ndarray]]]
# One client's report on a model (run in the executor; a failed task is a report).
EvaluateSeat = Callable[[Seat, dict[str, np.ndarray], int, int], Report]


class SiteEvaluations:
    """The ``evaluate`` tasks of a combiner's polls: each client's report, sent once."""

    def __init__(
        self,
        seats: Mapping[str, Seat],
        link: CombinerLink,
        identity: Identity,
        model_for: ModelFor,
        evaluate: EvaluateSeat,
    ):
        self.seats = seats
        self.link = link
        self.identity = identity
        self.model_for = model_for
        self.evaluate = evaluate
        # (client, round) of every evaluation reported: not done twice.
        self._evaluated: set[tuple[str, int]] = set()

    async def report(self, tasks: list[dict[str, Any]]) -> bool:
        """Evaluate the model each task names on its client's validation data and report.

        False when nothing was reported (the reports failed in transit, or
        were answered before): the caller backs off before it polls again.
        """
        reported = False
        for task in tasks:
            seat = self.seats.get(str(task.get("client", "")))
            number, version = int(task["round"]), int(task["version"])
            if seat is None or (seat.client.id, number) in self._evaluated:
                continue
            where = self.identity.log(number, seat.client.id)
            try:
                # Model ``version`` is the one round ``version`` trains on: kept for it.
                tensors = await self.model_for(version, version)
                loop = asyncio.get_running_loop()
                report = await loop.run_in_executor(
                    None, self.evaluate, seat, tensors, number, version
                )
                status, answer = await self.link.post_evaluation(report.document())
            except (*TRANSIT_ERRORS, CodecError) as exc:
                log.warning("evaluation failed in transit (%s)", exc, extra=where)
                continue
            if status == 503:
                continue  # the combiner could not record it: asked again
            # Recorded, or refused for good (said in the combiner's log and here).
            self._evaluated.add((seat.client.id, number))
            reported = True
            if status >= 400 and status != 409:
                log.warning("evaluation report refused (%d): %s", status, answer, extra=where)
        return reported
