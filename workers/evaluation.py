"""A client's evaluation of a global model on its own validation data (role ``validation``).

Called by the worker in its executor when its combiner hands out an
``evaluate`` task (:mod:`fedkube.evaluation`). Whatever goes wrong in the
user's code (loading the validation data, ``evaluate()`` itself, a bad
result) becomes a report that carries the failure's first line, with the
traceback in the worker's log: one client's evaluation is lost, not the
worker, and the job's record says who and why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedkube.evaluation import Report
from fedkube.learning import load_data, load_float_state
from fedkube.logs import fields
from fedkube.policy import DataBinding
from fedkube.spec import Client, FederatedJob
from fedkube.strategy_client import split
from fedkube.task import Task, TaskContext, TaskFailed, guarded

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
