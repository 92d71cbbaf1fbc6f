"""One way to refuse what a client or a combiner sent: count it, log it, answer it.

Every refusal on the aggregator tier (an update, a secure-aggregation
message, a region's partial) is seen three ways, and the three must agree:
``fedkube_updates_rejected_total{reason}`` for dashboards and alerts, a
structured warning naming job, round, region, tenant and client for the
operator reading logs, and a JSON error ``{"error": reason, "detail": ...}``
with the HTTP status that tells the sender whether to retry (and, for a
busy combiner, a Retry-After header that says when).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from fedkube.errors import UpdateRejected
from fedkube.service.logs import fields
from fedkube.service.metrics import Metrics
from fedkube.service.web import json_error


def refuse(
    exc: UpdateRejected,
    *,
    what: str,
    metrics: Metrics,
    log: logging.Logger,
    job: str,
    tier: str,
    region: str,
    tenant: str = "",
    **where: Any,
) -> web.Response:
    """Count, log and answer the refusal ``exc`` of ``what`` ("update", "partial", ...)."""
    metrics.updates_rejected.labels(job, tier, region, tenant, exc.reason).inc()
    log.warning(
        "%s refused: %s",
        what,
        exc.detail,
        extra=fields(job=job, region=region, tenant=tenant or None, reason=exc.reason, **where),
    )
    response = json_error(exc.status, exc.reason, exc.detail)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
