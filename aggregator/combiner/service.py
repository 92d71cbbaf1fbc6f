"""The regional combiner: serves the global model to its region, folds updates.

One combiner runs per region. Per round it

1. learns of the new round from Redis (pub/sub, with polling as a fallback),
2. fetches model version ``v_r`` from the global aggregator once and serves it
   to every worker of the region from a local file with sendfile (one copy per
   region crosses the global tier, not one per worker; :mod:`.model_cache`),
3. validates each worker's update (identity, round, selection, size, the
   tenant's signature over job, round, client and body, codec, metadata,
   shape, dtype, finiteness, norm; :mod:`.admission`), clips it to
   ``strategy.robust.normBound`` if set, and folds it into one running
   weighted sum (memory O(model), not O(clients x model)) — or, under a robust
   rule, keeps it in the region's bounded buffer (O(clients x model));
   :mod:`.clear_intake`, :mod:`.accumulators`,
4. sends one partial (``Σ w_i·Δ_i``, ``Σ w_i``, ``Σ w_i·τ_i``; under a robust
   rule ``estimate × Σ w_i``) to the global aggregator when every selected
   client of the region reported, or when the global tier asks for a flush at
   the round deadline (:mod:`.uplink`).

A rejected update is counted by reason and never touches the sum, so it
cannot poison the round.

Under ``spec.privacy.secureAggregation`` steps 3 and 4 are the server side
of :mod:`fedkube.wire.secagg` instead (:mod:`.secure_intake`): the combiner routes
its clients' keys and sealed shares, adds their masked updates into a uint32
total it cannot read, and decodes the region's sum once the survivors
revealed the shares that remove the masks (the timing of the steps is
:mod:`.secure_region`'s). The sum goes up as the region's partial, as in the
clear.

Restarts lose nothing a worker was told was accepted. The running sum lives
only in memory (writing a model-sized sum to disk per update would cost more
than the update itself), but every worker keeps its update until the round
closes. A restarted combiner finds in Redis which of its clients reported to
the incarnation that died, hands those clients a ``resend`` task when they
poll again, and folds each resent update once (:mod:`.region`). It flushes
when every selected client is back in the sum, or, if the global tier already
asked for the flush, after a short reattach window; a client that never
resends (its worker died too) is forgotten in Redis and counts as dropped. If
the global tier already holds the region's partial, the restarted combiner
has nothing to collect for that round.

This module is the wiring: it builds the pieces, keeps the lease, follows the
job's round in Redis and drives the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from fedkube.aggregator.combiner.admission import Admission
from fedkube.aggregator.combiner.clear_intake import ClearIntake
from fedkube.aggregator.combiner.model_cache import ModelCache
from fedkube.aggregator.combiner.region import Intake, RegionRound, RegionState
from fedkube.aggregator.combiner.registrations import Registrations
from fedkube.aggregator.combiner.routes import make_app
from fedkube.aggregator.combiner.secure_intake import SecureIntake
from fedkube.aggregator.combiner.site_reports import SiteReports
from fedkube.aggregator.combiner.uplink import encode_partial, send_partial
from fedkube.service.backoff import Backoff
from fedkube.service.bodies import BufferPool
from fedkube.service.inflight import InflightBudget
from fedkube.service.logs import fields
from fedkube.service.metrics import Metrics
from fedkube.service.tls import Tls, client_ssl, describe
from fedkube.service.web import start_site
from fedkube.spec import FederatedJob
from fedkube.state.lease import LEASE_TTL_MS, Lease
from fedkube.state.roundstate import RoundInfo, RoundStore
from fedkube.wire import signing

log = logging.getLogger("fedkube.combiner")

TIER = "combiner"
POLL_INTERVAL_S = 0.5
ENDED = ("succeeded", "failed")


@dataclass
class CombinerConfig:
    job: FederatedJob
    region: str
    redis_url: str
    global_url: str
    tenant_digests: dict[str, str]
    # Each tenant's public key: its updates must carry a signature made with
    # the private key that only its workers hold (fedkube.wire.signing).
    tenant_keys: Mapping[str, signing.VerifyKey]
    # The region's own credential to the global tier: its token, and the key that
    # signs its partials (the global tier holds the digest and the public key).
    aggregator_token: str
    signing_key: signing.SigningKey
    host: str = "127.0.0.1"
    port: int = 0
    lease_ttl_ms: int = LEASE_TTL_MS
    # spec.transport.tls: what it serves its workers with and dials the global tier
    # with (None: plain HTTP).
    tls: Tls | None = None


class Combiner:
    def __init__(self, config: CombinerConfig, metrics: Metrics | None = None):
        self.config = config
        self.job = config.job
        self.name = config.job.name
        self.metrics = metrics or Metrics()
        self.store = RoundStore.connect(config.redis_url, self.name)
        self.admission = Admission(
            config.job, config.region, config.tenant_digests, config.tenant_keys, config.tls
        )
        clients = self.admission.clients
        self.region = config.region
        self.state = RegionState(
            self.name,
            config.region,
            set(clients),
            self.store,
            self.metrics,
            config.job.spec.participation.round_timeout_seconds,
        )
        self.state.wire(self._flush, self._background)
        self.models = ModelCache(
            config.global_url,
            config.region,
            config.job.spec.compression.down,
            prefix=f"fedkube-{self.name}-{config.region}-",
        )
        secure = config.job.spec.privacy.secure_aggregation
        self.intake: Intake = (
            ClearIntake(config.job, self.state, self.admission, self.models)
            if secure is None
            else SecureIntake(config.job, secure, self.state, self.admission, self.models)
        )
        self.evaluations = SiteReports(self.store, self.name, config.region, clients, self.metrics)
        self.job_status: str | None = None
        self.buffers = BufferPool()
        transport = config.job.spec.transport
        tenants = {t.name for t in config.job.spec.tenants if t.region == config.region}
        self.inflight = InflightBudget(
            transport.max_inflight_bytes, transport.inflight_per_tenant(len(tenants))
        )
        self.registrations = Registrations(config.job.spec.participation.registration_ttl_seconds)
        self.lease = Lease(self.store, f"combiner-{config.region}", config.lease_ttl_ms)
        self._tasks: list[asyncio.Task[None]] = []
        self._background_tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.stopped = asyncio.Event()
        self.port = config.port

    @property
    def current(self) -> RegionRound | None:
        return self.state.current

    def app(self) -> web.Application:
        return make_app(self)

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self.lease.acquire()
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.config.aggregator_token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(ssl=client_ssl(self.config.tls)),
        )
        self.models.http = self._http
        self._runner, self.port = await start_site(
            self.app(), self.config.host, self.config.port, self.config.tls
        )
        self._tasks = [
            asyncio.create_task(self._follow_rounds()),
            asyncio.create_task(self.lease.keep(self.stopped)),
        ]
        log.info(
            "combiner serving on port %d (%s)",
            self.port,
            describe(self.config.tls),
            extra=fields(job=self.name, region=self.region),
        )

    async def drain(self, timeout: float = 10) -> None:
        """Wait, at most ``timeout`` seconds, for in-flight partial sends to finish.

        A region's partial goes to the global tier in the background, so the
        update that completed the region is answered at once. ``stop()``
        cancels that send, so callers that shut down on purpose drain first:
        a partial already on its way is delivered rather than cut off.
        """
        if self._background_tasks:
            await asyncio.wait(set(self._background_tasks), timeout=timeout)
        writer = self.state.writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=timeout)

    async def stop(self) -> None:
        # Loops check `stopped` as well: a cancellation that races with a
        # timeout can be lost on Python 3.11, and shutdown must not hang on it.
        self.stopped.set()
        # Model fetches too: they are shielded from their waiters, so nothing
        # else cancels them, and they would fail on the closed session below.
        tasks = [*self._tasks, *self._background_tasks, *self.models.fetches.values()]
        if self.state.writer is not None:
            tasks.append(self.state.writer)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http:
            await self._http.close()
        await self.lease.release()
        await self.store.close()
        self.models.close()

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a task that stop() waits for or cancels (and that is not GC'd early)."""
        task = asyncio.create_task(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    # -- following the global round ----------------------------------------
    async def _follow_rounds(self) -> None:
        """Track the job's current round: pub/sub for speed, polling for safety.

        Redis going away (a restart, a failover) pauses the combiner instead of
        ending this task: it reconnects and resynchronises from the round state.
        """
        backoff = Backoff(POLL_INTERVAL_S, 2.0)
        up = self.metrics.state_store_up.labels(self.name, TIER, self.region)
        while not self.stopped.is_set():
            try:
                await self._follow_once(up)
                return
            except RedisError as exc:
                up.set(0)
                log.warning(
                    "Redis unavailable (%s); retrying in %.1fs",
                    exc,
                    backoff.delay,
                    extra=fields(job=self.name, region=self.region),
                )
                await backoff.wait()

    async def _follow_once(self, up: Any) -> None:
        pubsub = self.store.redis.pubsub()
        try:
            await pubsub.subscribe(self.store.channel)
            while not self.stopped.is_set():
                await self._sync_round()
                up.set(1)
                if self.job_status in ENDED:
                    self.stopped.set()
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=POLL_INTERVAL_S
                    )
        finally:
            await pubsub.aclose()

    async def _sync_round(self) -> None:
        job = await self.store.job_info()
        self.job_status = job.get("status")
        number = int(job.get("round", 0))
        info = await self.store.round_info(number) if number else None
        current = self.state.current
        if info is not None and (current is None or current.info.token != info.token):
            await self._begin_round(info)
        elif info is not None and current is not None:
            current.info = info
        evaluation = self.evaluations.current
        version = await self.evaluations.sync()
        if version is not None:
            self._background(self.models.prefetch(version))
        if self.evaluations.current is not evaluation:
            await self.state.changes.notify()
        if self.job_status in ENDED:
            await self.state.changes.notify()
            return
        current = self.state.current
        if current is not None:
            await self.intake.on_sync(current)

    async def _begin_round(self, info: RoundInfo) -> None:
        current = await self.state.begin(info, secure=isinstance(self.intake, SecureIntake))
        here = self.region
        self.metrics.round_current.labels(self.name, TIER, here).set(info.round)
        self.metrics.clients_selected.labels(self.name, here).set(len(current.selected))
        self.metrics.clients_reported.labels(self.name, here).set(0)
        log.info(
            "round opened: %d selected here",
            len(current.selected),
            extra=fields(job=self.name, round=info.round, region=here),
        )
        self.models.keep_from(info.version - 1)
        if current.selected:
            self._background(self.models.prefetch(info.version))
        await self.state.changes.notify()

    # -- tasks ---------------------------------------------------------------
    def tasks_for(self, clients: set[str], after: int) -> dict[str, Any] | None:
        """What ``clients`` should do now, or None while none of them has anything to do."""
        if self.job_status in ENDED:
            return {"status": "done", "job_status": self.job_status}
        evaluate = self.evaluations.tasks_for(clients)
        if evaluate:
            return {"status": "tasks", "round": evaluate[0]["round"], "tasks": evaluate}
        current = self.state.current
        if current is None or current.flushed:
            return None
        tasks = self.intake.tasks_for(current, clients, after)
        if not tasks:
            return None
        return {"status": "tasks", "round": current.info.round, "tasks": tasks}

    # -- flushing the partial ------------------------------------------------
    async def _flush(self, current: RegionRound) -> None:
        """Send the partial; retry until the global tier has it or moved on."""
        async with self.state.lock:
            await self.state.forget_owed(current)
            result = await self.intake.reduce(current)
            if result is None:  # the region failed this round; the global tier knows why
                return
            encoded = encode_partial(self.name, current.info.round, self.region, result)
        # BLAKE3 releases the GIL: the loop goes on serving while the partial is hashed.
        digest = await asyncio.get_running_loop().run_in_executor(
            None, signing.payload_digest, encoded.chunks()
        )
        signature = signing.sign_partial(
            self.config.signing_key, self.name, current.info.round, self.region, digest
        )
        # The round's byte counters are read when it closes: in Redis before the partial.
        await self.state.counted()
        assert self._http is not None
        await send_partial(
            self._http,
            self.config.global_url,
            self.name,
            current.info.round,
            self.region,
            encoded,
            signature,
            result,
            self.stopped,
        )


async def run_combiner(
    config: CombinerConfig, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve until the job ends or ``stop`` is set."""
    combiner = Combiner(config)
    await combiner.start()
    if on_ready:
        on_ready(combiner.port)
    waiter = asyncio.create_task(stop.wait())
    done = asyncio.create_task(combiner.stopped.wait())
    await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    done.cancel()
    # Let in-flight partials finish before leaving (bounded by their own retries).
    await combiner.drain()
    await combiner.stop()
