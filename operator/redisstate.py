"""The operator's view of a job's round state in Redis (read-only, but for cleanup).

The round state is written by the global aggregator; the operator reads it
to fill the job's status, and deletes it when the job is deleted (the only
thing owner references cannot clean up, hence the finalizer).
"""

from __future__ import annotations

import base64

from fedkube.operator.config import OperatorConfig
from fedkube.operator.kube import Kube
from fedkube.operator.reconcile import NotReady
from fedkube.operator.status import RoundFacts
from fedkube.spec import FederatedJob
from fedkube.state.roundstate import RoundStore, redis_url_with_password


def job_redis_url(kube: Kube, job: FederatedJob, namespace: str, config: OperatorConfig) -> str:
    """The job's Redis URL with its password.

    The password comes from the job's ``state.redisPasswordSecret``; a job on
    the operator's own Redis (``--redis-url``) uses the operator's password.
    """
    url = job.spec.state.redis_url or config.redis_url
    if not url:
        raise NotReady("no Redis: set spec.state.redisUrl or the operator's --redis-url")
    ref = job.spec.state.redis_password_secret
    if ref is None:
        if job.spec.state.redis_url is None:
            return redis_url_with_password(url, config.redis_password)
        return url
    secret = kube.get("Secret", namespace, ref.name)
    data = (secret or {}).get("data") or {}
    if ref.key not in data:
        raise NotReady(f"waiting for Secret {ref.name!r} with key {ref.key!r} (Redis password)")
    return redis_url_with_password(url, base64.b64decode(data[ref.key]).decode())


async def read_round_facts(store: RoundStore) -> RoundFacts:
    info = await store.job_info()
    closed, last = await store.last_record()
    return RoundFacts(
        job_status=info.get("status"),
        job_message=info.get("message", ""),
        current_round=int(info.get("round", 0) or 0),
        closed_rounds=closed,
        last_record=last,
        paused=info.get("paused") == "1",
        refused=await store.refused_tenants(),
    )
