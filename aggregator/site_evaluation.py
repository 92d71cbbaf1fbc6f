"""The global aggregator's side of evaluation at the sites (:mod:`fedkube.training.evaluation`).

Between a round's checkpoint and its close, the new model is published and
the clients that ``spec.evaluation.sites`` names are asked to evaluate it;
their combiners record the reports in Redis. Once every asked client has
reported (or ``siteTimeoutSeconds`` passed), the sums become the ``sites``
entry of the round's history record: the same record as the central
evaluation of the same model, so "best round" means one thing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from fedkube.service.logs import fields
from fedkube.spec import FederatedJob
from fedkube.state.roundstate import RoundStore
from fedkube.training import evaluation

log = logging.getLogger("fedkube.global")

# How often the count of reports is read while an evaluation is open.
POLL_S = 0.1


async def evaluate_at_sites(
    store: RoundStore,
    job: FederatedJob,
    number: int,
    version: int,
    clients: Sequence[str],
    stopping: asyncio.Event,
) -> dict[str, Any]:
    """Ask ``clients`` to evaluate model ``version`` and wait for them; the ``sites`` entry."""
    final = number == job.spec.rounds and job.spec.evaluation.cross_site
    timeout = job.spec.evaluation.site_timeout_seconds
    where = fields(job=job.name, round=number)
    info = await store.open_evaluation(number, version, clients, timeout, final)
    log.info(
        "%s: %d clients evaluate model %d",
        "cross-site evaluation" if final else "evaluation at the sites",
        len(clients),
        version,
        extra=where,
    )
    reported = 0
    while not stopping.is_set():
        reported = await store.evaluation_done_count(number)
        if reported >= len(clients) or time.time() >= info.deadline:
            break
        await asyncio.sleep(POLL_S)
    if stopping.is_set():
        raise asyncio.CancelledError("the global aggregator is stopping")
    sums, failed = await store.evaluation_results(number)
    await store.close_evaluation(number, job.spec.state.key_ttl_seconds)
    summary = evaluation.summarise(evaluation.tenant_sums(sums), failed, len(clients), final)
    if reported < len(clients):
        log.warning(
            "evaluation closed at its deadline: %d of %d clients reported",
            reported,
            len(clients),
            extra=where,
        )
    for client, reason in summary["failed"].items():
        log.warning("client %s could not evaluate: %s", client, reason, extra=where)
    return summary
