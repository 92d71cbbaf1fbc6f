"""A whole federation in the test's event loop: real Redis, real HTTP, real workers.

The global aggregator, one combiner per region and every worker group's
:class:`~fedkube.workers.runtime.Worker` (one client's, or many virtual
clients') run as objects in one process, over loopback HTTP and a real
redis-server, exactly as their CLI entrypoints would run them, but without
starting a Python process (and importing torch) per
service. A test may give some clients a worker class of its own (an
attacker): that is reachable only from tests, never from a manifest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.aggregator.combiner import Combiner, CombinerConfig
from fedkube.aggregator.global_aggregator import GlobalAggregator, GlobalConfig
from fedkube.service.web import digest
from fedkube.spec import FederatedJob
from fedkube.state import checkpoint
from fedkube.wire import signing
from fedkube.workers.runtime import Worker, WorkerConfig
from tests.support import (
    region_checks,
    region_credential,
    tenant_signing_key,
    tenant_verify_keys,
)

SETTLED_ROUNDS = 5  # accuracy is compared as the mean of the last rounds: one round is noisy


def tenant_token(tenant: str) -> str:
    return f"token-{tenant}"


@dataclass(frozen=True)
class Outcome:
    """How a federated run ended, and what it left behind."""

    status: str
    message: str
    history: list[dict[str, Any]]
    checkpoint: checkpoint.Checkpoint | None
    workers: list[Worker] = field(default_factory=list)

    @property
    def accuracy(self) -> list[float]:
        return [float(r["accuracy"]) for r in self.history if r.get("accuracy") is not None]

    @property
    def settled(self) -> float:
        """Mean held-out accuracy of the last rounds; a failed job counts as chance (10 %)."""
        if self.status != "succeeded":
            return 0.1
        return float(np.mean(self.accuracy[-SETTLED_ROUNDS:]))

    def __str__(self) -> str:
        text = f"{self.status} after {len(self.history)} rounds, settled {self.settled:.4f}"
        return text if self.status == "succeeded" else f"{text} ({self.message})"


async def federate(
    job: FederatedJob,
    redis_url: str,
    workdir: Path,
    workers: dict[str, type[Worker]] | None = None,
    timeout_s: float = 300,
) -> Outcome:
    """Run ``job`` to its end; ``workers`` maps worker groups (client ids, unless the job
    simulates) to a worker class of the test's."""
    checkpoints = workdir / "ckpt"
    aggregator = GlobalAggregator(
        GlobalConfig(job, redis_url, checkpoints, **region_checks(job.region_names()))
    )
    await aggregator.start()
    combiners = {
        region: Combiner(
            CombinerConfig(
                job=job,
                region=region,
                redis_url=redis_url,
                global_url=f"http://127.0.0.1:{aggregator.port}",
                tenant_digests={t.name: digest(tenant_token(t.name)) for t in job.spec.tenants},
                tenant_keys=tenant_verify_keys(t.name for t in job.spec.tenants),
                **region_credential(region),
            )
        )
        for region in job.region_names()
    }
    for combiner in combiners.values():
        await combiner.start()
    # One worker per worker group: a client each, or many under spec.simulation.
    clients = [
        (workers or {}).get(group.name, Worker)(
            WorkerConfig(
                job=job,
                clients=group.clients,
                name=group.name,
                combiner_url=f"http://127.0.0.1:{combiners[group.region].port}",
                token=tenant_token(group.tenant),
                signing_key=signing.load_signing_key(tenant_signing_key(group.tenant), "test"),
                state_dir=workdir / "clients",
                poll_wait_s=5,
            )
        )
        for group in job.worker_groups()
    ]
    stop = asyncio.Event()
    running = [asyncio.create_task(worker.run(stop)) for worker in clients]
    try:
        status = await asyncio.wait_for(aggregator.run(), timeout=timeout_s)
        await asyncio.wait_for(asyncio.gather(*running), timeout=60)
        history = await aggregator.store.history()
        message = (await aggregator.store.job_info()).get("message", "")
    finally:
        stop.set()
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=10)
        for combiner in combiners.values():
            await combiner.stop()
        await aggregator.stop()
    return Outcome(status, message, history, checkpoint.load_latest(checkpoints, job.name), clients)
