"""The global aggregator as a service: its state, its wiring and its lifecycle.

:class:`GlobalAggregator` holds what the job's rounds share (the model and
the strategy's server state, the partials of the open round, the model
bytes served, the Redis store) and ties the seams together: it takes the
global lease, restores (:mod:`.persistence`), serves (:mod:`.routes`),
drives rounds (:mod:`.rounds`) and stops. :func:`run_global` is the
command's entry point: it returns the job's final status, or ``stopped``,
or ``lease-lost`` when another process took the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from fedkube.aggregator.global_aggregator import persistence, rounds, routes
from fedkube.aggregator.global_aggregator.close import CentralEvaluation, SiteGauges, state_summary
from fedkube.aggregator.global_aggregator.common import TIER, log
from fedkube.aggregator.strategies import REGISTRY
from fedkube.aggregator.strategies.sums import Partial, Tensors
from fedkube.aggregator.validation import Template, template_of
from fedkube.errors import SigningKeyError
from fedkube.service.logs import fields
from fedkube.service.metrics import Metrics
from fedkube.service.tls import Tls, describe
from fedkube.spec import FederatedJob
from fedkube.state.lease import LEASE_TTL_MS, Lease
from fedkube.state.roundstate import RoundInfo, RoundStore
from fedkube.task import load_task
from fedkube.training import privacy
from fedkube.training.learning import build_model, float_state
from fedkube.wire.signing import VerifyKey


@dataclass
class GlobalConfig:
    """What the global tier runs with; per region, what checks its combiner's credential.

    Each region's combiner holds a token and an Ed25519 key of its own: the
    global tier holds only the token's digest and the public key, takes a
    partial only from the credential of the region it is for, and only if
    that region's key signed it (:mod:`fedkube.wire.signing`).
    """

    job: FederatedJob
    redis_url: str
    checkpoint_dir: Path
    region_digests: Mapping[str, str]
    region_keys: Mapping[str, VerifyKey]
    host: str = "127.0.0.1"
    port: int = 0
    resume: bool = False
    lease_ttl_ms: int = LEASE_TTL_MS
    tls: Tls | None = None  # spec.transport.tls: the files it serves with (None: plain HTTP)


class GlobalAggregator:
    """One job's global tier: see the package's docstring for what a round does."""

    def __init__(self, config: GlobalConfig, metrics: Metrics | None = None):
        self.config = config
        self.job = config.job
        self.spec = config.job.spec
        self.name = config.job.name
        self.metrics = metrics or Metrics()
        self.store = RoundStore.connect(config.redis_url, self.name)
        self.strategy = REGISTRY[self.spec.strategy.name]
        self.clients = config.job.clients()
        self.region_of = {c.id: c.region for c in self.clients}
        self.tenant_of = {c.id: c.tenant for c in self.clients}
        self.regions = set(config.job.region_names())
        missing = sorted(self.regions - (set(config.region_digests) & set(config.region_keys)))
        if missing:
            raise SigningKeyError(
                [
                    ("--region-tokens, --region-keys", f"nothing checks region {r!r}'s combiner")
                    for r in missing
                ]
            )
        self.task = load_task(config.job)
        self.model = build_model(config.job, self.task)
        self.weights = float_state(self.model)
        self.server_state: Tensors = self.strategy.module.init_state(
            self.weights, self.spec.strategy
        )
        # What travels down (and so what every update and partial must match).
        self.template: Template = template_of(
            self.strategy.downlink(self.weights, self.server_state)
        )
        self.dp = self.spec.privacy.dp
        self.accountant = (
            privacy.Accountant(self.dp, privacy.noise_multiplier(self.spec, len(self.clients)))
            if self.dp is not None
            else None
        )
        self.version = 1
        self.model_bytes: dict[int, bytes] = {}
        self.round_no = 0
        self.partials: dict[str, Partial] = {}
        # Set by the partial handler: the round loop wakes up at once.
        self.arrived = asyncio.Event()
        self.lease = Lease(self.store, "global", config.lease_ttl_ms)
        # The lease's renewal; it ends with LeaseLost if another process takes the lease.
        self.lease_task: asyncio.Task[None] | None = None
        self.central_evaluation = CentralEvaluation(self.job, self.task, self.model)
        self.site_gauges = SiteGauges(self.metrics, self.name)
        # The round a restart (or a Redis outage) continues instead of opening one.
        self.continuing: RoundInfo | None = None
        self.stopping = asyncio.Event()
        self.port = config.port
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------
    def app(self) -> web.Application:
        return routes.app(self)

    async def start(self) -> None:
        await self.lease.acquire()
        await persistence.restore(self)
        # A resumed round is open from the start: show it (the stalled-round
        # alert watches this gauge), not only once the next round opens.
        current = self.continuing.round if self.continuing is not None else self.round_no
        if current:
            self.metrics.round_current.labels(self.name, TIER, "").set(current)
        self.metrics.strategy_info.labels(
            self.name, self.spec.strategy.name, self.spec.strategy.robust.rule
        ).set(1)
        self.show_state()
        persistence.publish_model(self)
        self._runner, self.port = await routes.serve(self)
        self.lease_task = asyncio.create_task(self.lease.keep(self.stopping))
        log.info(
            "global aggregator serving on port %d (%s), next round %d",
            self.port,
            describe(self.config.tls),
            self.round_no + 1 if self.continuing is None else self.continuing.round,
            extra=fields(job=self.name),
        )

    async def stop(self) -> None:
        # Loops check `stopping` too: a cancellation racing with a timeout can
        # be lost on Python 3.11, and shutdown must not hang on it.
        self.stopping.set()
        if self.lease_task is not None:
            self.lease_task.cancel()
            await asyncio.wait({self.lease_task}, timeout=10)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.lease.release()
        await self.store.close()

    @property
    def lease_lost(self) -> bool:
        """Whether the lease's renewal ended because another process holds the lease."""
        task = self.lease_task
        return (
            task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is not None
        )

    def check_stopping(self) -> None:
        if self.stopping.is_set():
            raise asyncio.CancelledError("the global aggregator is stopping")

    # -- the rounds ----------------------------------------------------------
    async def run(self) -> str:
        """Drive rounds to the end; returns the job's final status."""
        self.metrics.state_store_up.labels(self.name, TIER, "").set(1)
        while True:
            try:
                return await rounds.drive(self)
            except RedisError as exc:
                await persistence.ride_out_outage(self, exc)

    def show_state(self) -> dict[str, float]:
        """The strategy's state as norms, on ``/metrics`` (and returned for the history)."""
        summary = state_summary(self.strategy, self.server_state)
        for quantity, value in summary.items():
            self.metrics.strategy_state.labels(self.name, self.spec.strategy.name, quantity).set(
                value
            )
        return summary


async def run_global(
    config: GlobalConfig, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None
) -> str:
    """Serve and drive the job until it ends, ``stop`` is set or the lease is lost."""
    aggregator = GlobalAggregator(config)
    await aggregator.start()
    if on_ready:
        on_ready(aggregator.port)
    runner = asyncio.create_task(aggregator.run())
    stopper = asyncio.create_task(stop.wait())
    waiting: set[asyncio.Future[Any]] = {runner, stopper}
    if aggregator.lease_task is not None:
        waiting.add(aggregator.lease_task)
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    status = "stopped"
    # A lost lease sets `stopping` as it ends: the round loop may have ended
    # too by then (cancelled), so the lease is asked first.
    if runner.done() and not aggregator.lease_lost:
        status = runner.result()
    else:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if aggregator.lease_lost:
            status = "lease-lost"
    stopper.cancel()
    await aggregator.stop()
    return status
