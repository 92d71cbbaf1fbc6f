"""The regional combiner: serves the global model to its region, folds updates.

One combiner runs per region. Per round it

1. learns of the new round from Redis (pub/sub, with polling as a fallback),
2. fetches model version ``v_r`` from the global aggregator once and serves it
   to every worker of the region from a local file with sendfile (one copy per
   region crosses the global tier, not one per worker),
3. validates each worker's update (identity, round, selection, size, the
   tenant's signature over job, round, client and body, codec, metadata,
   shape, dtype, finiteness, norm), clips it to
   ``strategy.robust.normBound`` if set, and folds it into one running
   weighted sum (memory O(model), not O(clients x model)) — or, under a robust
   rule, keeps it in the region's bounded buffer (O(clients x model)),
4. sends one partial (``Σ w_i·Δ_i``, ``Σ w_i``, ``Σ w_i·τ_i``; under a robust
   rule ``estimate × Σ w_i``) to the global aggregator when every selected
   client of the region reported, or when the global tier asks for a flush at
   the round deadline.

A rejected update is counted by reason and never touches the sum, so it
cannot poison the round.

Under ``spec.privacy.secureAggregation`` steps 3 and 4 are the server side
of :mod:`fedkube.secagg` instead: the combiner routes its clients' keys and
sealed shares, adds their masked updates into a uint32 total it cannot read,
and decodes the region's sum once the survivors revealed the shares that
remove the masks (the timing of the steps is ``secure_region``'s). The sum
goes up as the region's partial, as in the clear.

Restarts lose nothing a worker was told was accepted. The running sum lives
only in memory (writing a model-sized sum to disk per update would cost more
than the update itself), but every worker keeps its update until the round
closes. A restarted combiner finds in Redis which of its clients reported to
the incarnation that died, hands those clients a ``resend`` task when they
poll again, and folds each resent update once (the report in Redis is its
record; the in-memory ``folded`` set guards against a second fold). It
flushes when every selected client is back in the sum, or, if the global
tier already asked for the flush, after a short reattach window; a client
that never resends (its worker died too) is forgotten in Redis and counts as
dropped. If the global tier already holds the region's partial, the
restarted combiner has nothing to collect for that round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from redis.exceptions import RedisError

from fedkube import codec, compression, faults, privacy, secagg, signing
from fedkube.aggregator.bodies import BufferPool, json_body, read_body
from fedkube.aggregator.secure_region import Claim, SecureRegion
from fedkube.aggregator.site_reports import SiteReports
from fedkube.aggregator.strategies import REGISTRY, ROBUST_RULES, norm_bound
from fedkube.aggregator.strategies.fedavg import WeightedSum
from fedkube.aggregator.update_buffer import UpdateBuffer
from fedkube.aggregator.validation import (
    Template,
    check_bound,
    check_client,
    check_structure,
    check_update,
    l2_norm,
    template_of,
)
from fedkube.errors import (
    CodecError,
    LeaseLost,
    SecureAggregationFailed,
    SigningKeyError,
    UpdateRejected,
)
from fedkube.failures import check_failure
from fedkube.logs import fields
from fedkube.metrics import Metrics
from fedkube.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_REGION,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    M_CLIENT,
    M_JOB,
    M_KIND,
    M_ROUND,
    M_STEPS,
    M_TENANT,
    M_WEIGHT,
    M_WEIGHTED_STEPS,
    Envelope,
    Reason,
    RoundState,
    check_metadata,
    parse_int,
    parse_steps,
    parse_weight,
)
from fedkube.roundstate import RoundInfo, RoundStore
from fedkube.spec import DpMode, FederatedJob
from fedkube.web import bearer, json_error, start_site, token_matches, upload

log = logging.getLogger("fedkube.combiner")

TIER = "combiner"
POLL_INTERVAL_S = 0.5
LEASE_TTL_MS = 5000
# After a restart, how long a flushed-for round waits for its workers to
# resend what the previous incarnation had folded (at most half the round
# timeout). Workers retry with a backoff capped well below this.
REATTACH_S = 10.0


# A refusal message is shown in conditions and logs, never more than this.
MAX_REFUSAL_CHARS = 2000


def _failed(task: asyncio.Task[bytes]) -> bool:
    """Whether a finished task failed or was cancelled (reading its exception marks it seen)."""
    return task.done() and (task.cancelled() or task.exception() is not None)


@dataclass
class _Round:
    """What the combiner holds for the round it is collecting."""

    info: RoundInfo
    selected: set[str]  # this region's selected clients
    folded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # their task failed the round (they said so)
    # Reported to an earlier incarnation of this combiner (Redis says so) but
    # not in this one's sum: their workers are asked to send them again.
    owed: set[str] = field(default_factory=set)
    reattach_by: float = 0.0  # time.monotonic() after which a flush stops waiting for them
    sum: WeightedSum | None = None
    buffer: UpdateBuffer | None = None  # under a robust rule, instead of the sum
    secure: SecureRegion | None = None  # under secure aggregation, instead of the sum
    flushed: bool = False


def _task_fields(current: _Round) -> dict[str, Any]:
    """What every task of the round says: its number, model version and deadline."""
    return {
        "round": current.info.round,
        "version": current.info.version,
        "deadline": current.info.deadline,
    }


@dataclass
class CombinerConfig:
    job: FederatedJob
    region: str
    redis_url: str
    global_url: str
    tenant_digests: dict[str, str]
    # Each tenant's public key: its updates must carry a signature made with
    # the private key that only its workers hold (fedkube.signing).
    tenant_keys: Mapping[str, signing.VerifyKey]
    aggregator_token: str
    host: str = "127.0.0.1"
    port: int = 0
    lease_ttl_ms: int = LEASE_TTL_MS


class Combiner:
    def __init__(self, config: CombinerConfig, metrics: Metrics | None = None):
        self.config = config
        self.job = config.job
        self.name = config.job.name
        self.region = config.region
        self.metrics = metrics or Metrics()
        self.store = RoundStore.connect(config.redis_url, self.name)
        clients = [c for c in config.job.clients() if c.region == config.region]
        self.clients = {c.id: c for c in clients}
        self.tenants = {c.tenant for c in clients}
        self._check_keys(config.tenant_keys)
        self.max_bytes = config.job.spec.transport.max_update_bytes
        self.weight_caps = {c.id: config.job.weight_cap(c.tenant) for c in clients}
        self.compression = config.job.spec.compression
        self.strategy = config.job.spec.strategy
        self.fold_scale = REGISTRY[self.strategy.name].fold_scale
        self.needs_local_steps = REGISTRY[self.strategy.name].needs_local_steps
        self.robust_rule = ROBUST_RULES.get(self.strategy.robust.rule)
        self.dp = config.job.spec.privacy.dp
        self.secure = config.job.spec.privacy.secure_aggregation
        self.current: _Round | None = None
        self.evaluations = SiteReports(
            self.store, self.name, self.region, self.clients, self.metrics
        )
        self.job_status: str | None = None
        self.models: dict[int, bytes] = {}
        self.template: Template | None = None
        self._fetches: dict[int, asyncio.Task[bytes]] = {}
        self._lock = asyncio.Lock()
        self._buffers = BufferPool()
        self._cache_dir = Path(tempfile.mkdtemp(prefix=f"fedkube-{self.name}-{self.region}-"))
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._background_tasks: set[asyncio.Task[None]] = set()
        self._lease = secrets.token_hex(8)
        self._http: aiohttp.ClientSession | None = None
        self.stopped = asyncio.Event()
        self.port = config.port

    def _check_keys(self, keys: Mapping[str, signing.VerifyKey]) -> None:
        """Every tenant of the region needs a public key, or none of its updates could pass."""
        missing = sorted(self.tenants - set(keys))
        if missing:
            reason = f"no public key (--tenant-keys) to check its updates in region {self.region}"
            raise SigningKeyError([(f"tenant {t!r}", reason) for t in missing])

    # -- lifecycle ---------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_bytes)
        app.router.add_post("/v1/tasks", self.handle_tasks)
        app.router.add_get("/v1/model/{version}", self.handle_model)
        app.router.add_post("/v1/update", self.handle_update)
        app.router.add_post("/v1/refusal", self.handle_refusal)
        app.router.add_post("/v1/evaluation", self.handle_evaluation)
        app.router.add_post("/v1/failure", self.handle_failure)
        app.router.add_post("/v1/secagg/{step}", self.handle_secagg)
        app.router.add_get("/metrics", self.metrics.handle)
        app.router.add_get("/healthz", self.handle_health)
        return app

    async def start(self) -> None:
        role = f"combiner-{self.region}"
        while not await self.store.acquire_lease(role, self._lease, self.config.lease_ttl_ms):
            log.info("waiting for lease %s", role, extra=fields(job=self.name, region=self.region))
            await asyncio.sleep(self.config.lease_ttl_ms / 4000)
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.config.aggregator_token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        self._runner, self.port = await start_site(self.app(), self.config.host, self.config.port)
        self._tasks = [
            asyncio.create_task(self._follow_rounds()),
            asyncio.create_task(self._keep_lease(role)),
        ]
        log.info(
            "combiner serving on port %d",
            self.port,
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

    async def stop(self) -> None:
        # Loops check `stopped` as well: a cancellation that races with a
        # timeout can be lost on Python 3.11, and shutdown must not hang on it.
        self.stopped.set()
        # Model fetches too: they are shielded from their waiters, so nothing
        # else cancels them, and they would fail on the closed session below.
        tasks = [*self._tasks, *self._background_tasks, *self._fetches.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await self._runner.cleanup()
        if self._http:
            await self._http.close()
        await self.store.release_lease(f"combiner-{self.region}", self._lease)
        await self.store.close()
        shutil.rmtree(self._cache_dir, ignore_errors=True)

    async def _keep_lease(self, role: str) -> None:
        try:
            while not self.stopped.is_set():
                await asyncio.sleep(self.config.lease_ttl_ms / 3000)
                try:
                    await self.store.renew_lease(role, self._lease, self.config.lease_ttl_ms)
                except RedisError as exc:  # transient: the next tick tries again
                    log.warning("lease renewal failed: %s", exc, extra=fields(job=self.name))
        except LeaseLost:
            log.error("lost lease %s; stopping", role, extra=fields(job=self.name))
            self.stopped.set()
            raise

    # -- following the global round ----------------------------------------
    async def _follow_rounds(self) -> None:
        """Track the job's current round: pub/sub for speed, polling for safety.

        Redis going away (a restart, a failover) pauses the combiner instead of
        ending this task: it reconnects and resynchronises from the round state.
        """
        delay = POLL_INTERVAL_S
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
                    delay,
                    extra=fields(job=self.name, region=self.region),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _follow_once(self, up: Any) -> None:
        pubsub = self.store.redis.pubsub()
        try:
            await pubsub.subscribe(self.store.channel)
            while not self.stopped.is_set():
                await self._sync_round()
                up.set(1)
                if self.job_status in ("succeeded", "failed"):
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
        if info is not None and (self.current is None or self.current.info.token != info.token):
            await self._begin_round(info)
        elif info is not None and self.current is not None:
            self.current.info = info
        evaluation = self.evaluations.current
        version = await self.evaluations.sync()
        if version is not None:
            self._background(self._prefetch(version))
        if self.evaluations.current is not evaluation:
            async with self._changed:
                self._changed.notify_all()
        if self.job_status in ("succeeded", "failed"):
            async with self._changed:
                self._changed.notify_all()
            return
        current = self.current
        if current is not None and self.secure is not None:
            async with self._lock:
                await self._secure_tick(current)
            return
        if (
            current
            and current.selected
            and not current.flushed
            and current.info.state == RoundState.aggregating
            and not (current.owed and time.monotonic() < current.reattach_by)
        ):
            self._schedule_flush(current)

    async def _begin_round(self, info: RoundInfo) -> None:
        async with self._lock:
            previous = self.current
            selected = {c for c in await self.store.selected(info.round) if c in self.clients}
            current = _Round(info=info, selected=selected)
            if previous is None or previous.info.round != info.round:
                await self._recover(current)
            self.current = current
        self.metrics.round_current.labels(self.name, TIER, self.region).set(info.round)
        self.metrics.clients_selected.labels(self.name, self.region).set(len(selected))
        self.metrics.clients_reported.labels(self.name, self.region).set(0)
        log.info(
            "round opened: %d selected here",
            len(selected),
            extra=fields(job=self.name, round=info.round, region=self.region),
        )
        for version in list(self.models):
            if version < info.version - 1:
                del self.models[version]
                self._model_path(version).unlink(missing_ok=True)
        if selected:
            self._background(self._prefetch(info.version))
        async with self._changed:
            self._changed.notify_all()

    async def _recover(self, current: _Round) -> None:
        """Pick up a round that an earlier incarnation of this combiner collected for.

        Its sum died with it; its reports in Redis say whose updates were in
        that sum. Those workers still hold their updates and are asked for
        them again. If the global tier already has this region's partial,
        there is nothing left to collect.
        """
        number = current.info.round
        if self.region in await self.store.partials(number):
            current.flushed = True
            return
        current.owed = {c for c in await self.store.reported(number) if c in self.clients}
        if current.owed and self.secure is not None:
            # Their keys died with the incarnation they were sent to. Running the
            # protocol again over the same updates would give a curious combiner
            # two sums over different sets of clients: they count as dropped.
            lost, current.owed = sorted(current.owed), set()
            current.selected -= set(lost)
            await self.store.forget_reports(number, lost)
            log.error(
                "restarted mid-round under secure aggregation: %d clients that sent their "
                "keys before count as dropped (%s)",
                len(lost),
                ", ".join(lost),
                extra=fields(job=self.name, round=number, region=self.region),
            )
            return
        if current.owed:
            window = min(REATTACH_S, self.job.spec.participation.round_timeout_seconds / 2)
            current.reattach_by = time.monotonic() + window
            log.warning(
                "restarted mid-round: asking %d clients to resend the updates folded before",
                len(current.owed),
                extra=fields(job=self.name, round=number, region=self.region),
            )

    async def _prefetch(self, version: int) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            await self.model_bytes(version)

    async def model_bytes(self, version: int) -> bytes:
        """Model ``version`` from the cache, fetched from the global tier once."""
        if version in self.models:
            return self.models[version]
        task = self._fetches.get(version)
        if task is None or _failed(task):
            # A fetch whose waiters were all cancelled (a stopped prefetch) stays
            # here; if it failed, fetch again rather than repeat its old error.
            task = asyncio.create_task(self._fetch_model(version))
            task.add_done_callback(_failed)  # retrieved: no "never retrieved" noise
            self._fetches[version] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._fetches.pop(version, None)

    async def _fetch_model(self, version: int) -> bytes:
        assert self._http is not None
        url = f"{self.config.global_url}/v1/model/{version}"
        async with self._http.get(url, params={"region": self.region}) as response:
            response.raise_for_status()
            data = await response.read()
        tensors, meta = codec.decode(data)
        if self.compression.down.scheme == "none":
            self.template = template_of(tensors)
        else:  # served as it came; updates must match the model it decodes to
            shapes = compression.shapes_of(tensors, meta)
            compression.parse(tensors, meta, shapes, self.compression.down)
            self.template = {name: (shape, np.dtype(np.float32)) for name, shape in shapes.items()}
        self.models[version] = data
        # Served from a file so that aiohttp can use sendfile(2): a region's
        # hundred downloads then cost no user-space copies.
        path = self._model_path(version)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data

    # -- handlers ------------------------------------------------------------
    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "region": self.region})

    def _authenticate(self, request: web.Request) -> str:
        tenant = request.headers.get(H_TENANT, "")
        if tenant not in self.tenants:
            raise UpdateRejected(
                Reason.unknown_tenant.value,
                f"tenant {tenant!r} is not served by region {self.region}",
                403,
            )
        if not token_matches(bearer(request), self.config.tenant_digests.get(tenant)):
            raise UpdateRejected(
                Reason.unauthenticated.value, f"bad or missing token for tenant {tenant!r}", 401
            )
        client = request.headers.get(H_CLIENT, "")
        if client and (client not in self.clients or self.clients[client].tenant != tenant):
            raise UpdateRejected(
                Reason.unknown_tenant.value,
                f"client {client!r} is not a client of tenant {tenant!r}",
                403,
            )
        return tenant

    async def handle_tasks(self, request: web.Request) -> web.Response:
        """Long poll for a worker's clients (``{"clients": [...], "after": r, "wait": s}``).

        One request (and one Redis write to register them all) for every
        client a worker hosts: a worker of a thousand virtual clients polls
        as cheaply as a worker of one. The answer lists a task per client
        that has one (``train`` or ``resend``; ``evaluate`` while an
        evaluation at the sites is open, see :mod:`fedkube.evaluation`), the
        round the combiner is at, or ``done`` with the job's status.
        """
        try:
            tenant = self._authenticate(request)
            clients, after, wait_s = await self._poll_request(request, tenant)
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        return web.json_response(await self._await_tasks(clients, after, wait_s))

    async def _poll_request(
        self, request: web.Request, tenant: str
    ) -> tuple[list[str], int, float]:
        """The checked body of a ``/v1/tasks`` poll: every client must be the tenant's, here."""
        document = await json_body(request)
        if not isinstance(document, dict):
            raise UpdateRejected(Reason.malformed.value, 'expected {"clients": [...], ...}')
        clients = document.get("clients")
        if (
            not isinstance(clients, list)
            or not clients
            or not all(isinstance(c, str) for c in clients)
        ):
            raise UpdateRejected(
                Reason.malformed.value, "clients must be a non-empty list of client ids"
            )
        for client in clients:
            check_client(self.clients, client, tenant, self.region)
        after, wait_s = document.get("after", 0), document.get("wait", 20)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise UpdateRejected(Reason.malformed.value, "after must be a round number (>= 0)")
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or wait_s < 0:
            raise UpdateRejected(Reason.malformed.value, "wait must be seconds (>= 0)")
        return clients, after, float(wait_s)

    async def _await_tasks(self, clients: list[str], after: int, wait_s: float) -> dict[str, Any]:
        """Register ``clients`` and wait, at most ``wait_s`` seconds, until one has a task."""
        try:
            await self.store.register_clients(clients)
        except RedisError as exc:  # the task can still be answered from memory
            log.warning("cannot record registration: %s", exc, extra=fields(job=self.name))
        mine = set(clients)
        deadline = time.monotonic() + min(wait_s, 60.0)
        while True:
            answer = self._tasks_for(mine, after)
            if answer is not None:
                return answer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                current = self.current
                return {"status": "wait", "round": current.info.round if current else 0}
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _tasks_for(self, clients: set[str], after: int) -> dict[str, Any] | None:
        """What ``clients`` should do now, or None while none of them has anything to do."""
        if self.job_status in ("succeeded", "failed"):
            return {"status": "done", "job_status": self.job_status}
        evaluate = self.evaluations.tasks_for(clients)
        if evaluate:
            return {"status": "tasks", "round": evaluate[0]["round"], "tasks": evaluate}
        current = self.current
        if current is None or current.flushed:
            return None
        if self.secure is not None:
            return self._secure_tasks_for(current, clients, after)
        task = _task_fields(current)
        tasks: list[dict[str, Any]] = []
        # Only the round's selected (and owed) clients can have a task: a worker
        # of many clients is answered in O(selected), not O(its clients).
        for client in sorted((current.selected | current.owed) & clients):
            if client in current.owed:
                # Accepted by the incarnation that died: the worker has it still.
                tasks.append({"status": "resend", "client": client, **task})
            elif (
                current.info.round > after
                and client not in current.folded
                and current.info.state == RoundState.collecting
            ):
                tasks.append({"status": "train", "client": client, **task})
        if not tasks:
            return None
        return {"status": "tasks", "round": current.info.round, "tasks": tasks}

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        try:
            tenant = self._authenticate(request)
            version = int(request.match_info["version"])
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        except ValueError:
            return json_error(400, "malformed", "version must be an integer")
        try:
            data = await self.model_bytes(version)
        except aiohttp.ClientResponseError as exc:
            return json_error(exc.status, "unavailable", f"model {version}: {exc.message}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return json_error(503, "unavailable", f"global aggregator unreachable: {exc}")
        self.metrics.bytes_down.labels(self.name, TIER, self.region, tenant).inc(len(data))
        current = self.current
        if current is not None:
            await self._count(current.info.round, bytes_down=len(data))
        return web.FileResponse(
            self._model_path(version), headers={"Content-Type": codec.CONTENT_TYPE}
        )

    def _model_path(self, version: int) -> Path:
        return self._cache_dir / f"model-{version}.safetensors"

    async def handle_update(self, request: web.Request) -> web.Response:
        tenant = "unknown"
        try:
            tenant = self._authenticate(request)
            result = await self._accept_update(request, tenant)
        except UpdateRejected as exc:
            self.metrics.updates_rejected.labels(
                self.name, TIER, self.region, tenant, exc.reason
            ).inc()
            round_no = self.current.info.round if self.current else None
            if exc.reason in (Reason.duplicate.value, Reason.late.value) and round_no:
                await self._count(round_no, **{exc.reason: 1})
            log.warning(
                "update rejected: %s",
                exc.detail,
                extra=fields(
                    job=self.name,
                    round=round_no,
                    region=self.region,
                    tenant=tenant,
                    client=request.headers.get(H_CLIENT),
                    reason=exc.reason,
                ),
            )
            return json_error(exc.status, exc.reason, exc.detail)
        return web.json_response(result)

    async def handle_refusal(self, request: web.Request) -> web.Response:
        """A site's operator says its policy refuses this tenant (with the tenant's token).

        The site has no Redis; its only line to the central side is the
        tenant's token and this combiner. The refusal is recorded in Redis,
        where the global aggregator stops waiting on the tenant's clients
        and the central operator shows it in the job's status.
        """
        try:
            tenant = self._authenticate(request)
            document = await request.json()
            message = str(document.get("message", ""))[:MAX_REFUSAL_CHARS] or "refused"
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        except (ValueError, AttributeError):
            return json_error(400, Reason.malformed.value, 'expected {"message": "..."}')
        await self.store.record_refusal(tenant, message)
        log.warning(
            "tenant refused at its site: %s",
            message,
            extra=fields(job=self.name, region=self.region, tenant=tenant),
        )
        return web.json_response({"recorded": True, "tenant": tenant})

    async def handle_evaluation(self, request: web.Request) -> web.Response:
        """A client's evaluation of the model it was asked to evaluate (JSON, checked)."""
        tenant = "unknown"
        try:
            tenant = self._authenticate(request)
            result = await self.evaluations.receive(tenant, await json_body(request))
        except UpdateRejected as exc:
            if exc.reason != Reason.duplicate.value:
                log.warning(
                    "evaluation report rejected: %s",
                    exc.detail,
                    extra=fields(job=self.name, region=self.region, tenant=tenant),
                )
            return json_error(exc.status, exc.reason, exc.detail)
        async with self._changed:
            self._changed.notify_all()
        return web.json_response(result)

    async def handle_failure(self, request: web.Request) -> web.Response:
        """A client's task failed this round (``fedkube.failures``): recorded, not waited for.

        Once every selected client of the region has sent its update or said
        that its task failed, the region's partial goes up without waiting for
        the deadline. Under secure aggregation the protocol's own deadlines
        decide; the failure is still recorded for the round's record.
        """
        tenant = "unknown"
        try:
            tenant = self._authenticate(request)
            report = check_failure(await json_body(request))
            check_client(self.clients, report.client, tenant, self.region)
            current = self.current
            if current is None or report.round != current.info.round:
                raise UpdateRejected(
                    Reason.wrong_round.value, f"round {report.round} is not open", 409
                )
            if report.client not in current.selected or report.client in current.folded:
                raise UpdateRejected(
                    Reason.not_selected.value,
                    f"{report.client} has no update owed in round {report.round}",
                    409,
                )
            try:
                await self.store.record_task_failure(report.round, report.client, report.message)
            except RedisError as exc:
                raise UpdateRejected(
                    Reason.unavailable.value, f"round state unavailable: {exc}", 503
                ) from None
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        log.warning(
            "the client's task failed the round: %s",
            report.message,
            extra=fields(
                job=self.name,
                round=report.round,
                region=self.region,
                tenant=tenant,
                client=report.client,
            ),
        )
        async with self._lock:
            current.failed.add(report.client)
            complete = (
                self.secure is None
                and current.info.state == RoundState.collecting
                and current.folded | current.failed >= current.selected
            )
        if complete:
            self._schedule_flush(current)
        return web.json_response({"recorded": True})

    async def _accept_update(self, request: web.Request, tenant: str) -> dict[str, object]:
        client = request.headers.get(H_CLIENT, "")
        if request.headers.get(H_JOB) != self.name:
            raise UpdateRejected(
                Reason.metadata_mismatch.value,
                f"job {request.headers.get(H_JOB)!r} is not {self.name!r}",
            )
        if request.headers.get(H_CODEC, codec.CODEC) != codec.CODEC:
            raise UpdateRejected(
                Reason.malformed.value,
                f"codec {request.headers.get(H_CODEC)!r} is not supported",
                415,
            )
        number = parse_int(request.headers.get(H_ROUND), "round")
        weight = self._capped_weight(request.headers.get(H_WEIGHT), client, tenant)
        current = self.current
        if self.secure is None:
            self._check_round(current, number, client)
        elif current is None or number != current.info.round:
            raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
        assert current is not None
        # Missing or malformed: refused before the body is read.
        signature = signing.parse_signature(request.headers.get(H_SIGNATURE), tenant)
        buffer, length = await read_body(request, self.max_bytes, self._buffers)
        try:
            body = memoryview(buffer)[:length]
            await self._verify(tenant, client, number, signature, body)
            if self.secure is not None:
                return await self._fold_masked(tenant, client, number, weight, current, body)
            return await self._fold(tenant, client, number, weight, current, body)
        finally:
            self._buffers.give(buffer)

    def _capped_weight(self, value: str | None, client: str, tenant: str) -> float:
        """The weight a client claims, refused above its tenant's cap."""
        weight = parse_weight(value)
        cap = self.weight_caps.get(client)
        if cap is not None and weight > cap:
            raise UpdateRejected(
                Reason.weight_above_cap.value,
                f"weight {weight:g} is above the cap of {cap} samples for tenant {tenant!r} "
                "(spec.tenants[].maxWeight or spec.participation.maxWeight)",
            )
        return weight

    async def _verify(
        self, tenant: str, client: str, number: int, signature: bytes, body: memoryview
    ) -> None:
        """Refuse an update that the tenant's key did not sign for this job, round and client.

        The round comes from the request, checked above, so an update replayed
        from an earlier round fails here even though its bytes are unchanged.
        """
        loop = asyncio.get_running_loop()
        # hashlib releases the GIL: the loop goes on reading other updates.
        digest = await loop.run_in_executor(None, signing.payload_digest, (body,))
        signing.verify(
            self.config.tenant_keys[tenant],
            signature,
            self.name,
            number,
            client,
            digest,
            tenant=tenant,
        )

    def _decode(
        self, body: memoryview, kind: str, tenant: str, client: str, number: int, weight: float
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A payload's tensors and metadata, once its metadata agrees with its request's."""
        try:
            tensors, metadata = codec.decode(body)
        except CodecError as exc:
            raise UpdateRejected(Reason.malformed.value, str(exc)) from None
        check_metadata(
            metadata,
            {
                M_JOB: self.name,
                M_ROUND: str(number),
                M_TENANT: tenant,
                M_CLIENT: client,
                M_KIND: kind,
            },
        )
        if parse_weight(metadata.get(M_WEIGHT)) != weight:
            raise UpdateRejected(Reason.metadata_mismatch.value, "weight differs from header")
        return tensors, metadata

    async def _fold(
        self,
        tenant: str,
        client: str,
        number: int,
        weight: float,
        current: _Round,
        body: memoryview,
    ) -> dict[str, object]:
        """Decode, check and fold one update whose request checks have passed."""
        tensors, metadata = self._decode(body, "update", tenant, client, number, weight)
        steps = parse_steps(metadata.get(M_STEPS), required=self.needs_local_steps)
        if self.template is None:
            await self.model_bytes(current.info.version)
        assert self.template is not None
        loop = asyncio.get_running_loop()
        # In a worker thread (numpy releases the GIL): the loop keeps reading
        # the next updates meanwhile.
        update, norm = await loop.run_in_executor(
            None, self._inspect, self.template, tensors, metadata
        )
        clip = 1.0
        if self.strategy.robust.norm_bound is not None:
            # Applied as a factor inside the fold (or the buffer's copy): no clipped copy.
            clip = norm_bound.clip_scale(norm, self.strategy.robust.norm_bound)
            if clip < 1.0:
                self.metrics.updates_clipped.labels(self.name, self.region, tenant).inc()
        started = time.perf_counter()
        async with self._lock:
            # Re-check under the lock: a flush or a new round may have happened.
            self._check_round(self.current, number, client)
            faults.reached(f"combiner.{self.region}.update{len(current.folded) + 1}", number)
            if self.robust_rule is not None and current.buffer is None:
                current.buffer = UpdateBuffer.for_template(
                    self.template, len(current.selected), self.strategy.robust.max_buffer_bytes
                )
            if current.buffer is not None:
                current.buffer.check_room()
            # Recorded before folded. The record may exist already: written by
            # an earlier incarnation whose sum died (a resend), or by a try
            # whose fold failed. `folded` (checked above) is what decides.
            try:
                await self.store.record_report(number, client, weight)
            except RedisError as exc:
                raise UpdateRejected(
                    Reason.unavailable.value, f"round state unavailable: {exc}", 503
                ) from None
            counted = privacy.counted_weight(self.dp, weight)
            scale = self.fold_scale(counted, steps) * clip
            if current.buffer is not None:
                await loop.run_in_executor(
                    None, current.buffer.add, update, scale / counted, counted, steps
                )
            else:
                if current.sum is None:
                    current.sum = WeightedSum.zeros(self.template)
                await loop.run_in_executor(None, current.sum.fold, update, counted, scale, steps)
            current.folded.add(client)
            recovered = client in current.owed
            current.owed.discard(client)
            complete = current.folded | current.failed >= current.selected
        if recovered:
            self.metrics.updates_recovered.labels(self.name, self.region, tenant).inc()
        self.metrics.aggregation_seconds.labels(self.name, TIER, self.region).observe(
            time.perf_counter() - started
        )
        self.metrics.updates_accepted.labels(self.name, TIER, self.region, tenant).inc()
        self.metrics.bytes_up.labels(self.name, TIER, self.region, tenant).inc(len(body))
        self.metrics.clients_reported.labels(self.name, self.region).set(len(current.folded))
        await self._count(number, bytes_up=len(body))
        log.info(
            "update folded",
            extra=fields(
                job=self.name, round=number, region=self.region, tenant=tenant, client=client
            ),
        )
        if complete:
            self._schedule_flush(current)
        return {"status": "accepted", "round": number}

    # -- secure aggregation ------------------------------------------------------
    # The combiner runs the server side of fedkube.secagg for its region: the
    # steps' timing is aggregator/secure_region.py's, every message is checked
    # by secagg.ServerSession, and the sum it decodes goes up as the partial.
    async def handle_secagg(self, request: web.Request) -> web.Response:
        """``POST /v1/secagg/{keys,shares,unmask}``: one client's message for one step."""
        tenant = "unknown"
        step = request.match_info["step"]
        try:
            tenant = self._authenticate(request)
            if step not in ("keys", "shares", "unmask") or self.secure is None:
                raise UpdateRejected(
                    Reason.malformed.value, f"no secure aggregation step {step!r} here", 404
                )
            client, number, document, size = await self._secagg_request(request)
            async with self._lock:
                current = self.current
                if current is None or number != current.info.round:
                    raise UpdateRejected(
                        Reason.wrong_round.value, f"round {number} is not open", 409
                    )
                if current.flushed:
                    raise UpdateRejected(
                        Reason.late.value, f"round {number} no longer collects", 410
                    )
                if step == "keys":
                    await self._receive_keys(current, tenant, client, document)
                else:
                    region = current.secure
                    if region is None:
                        raise UpdateRejected(
                            Reason.late.value, f"{client}: round {number} has no keys yet", 409
                        )
                    if step == "shares":
                        region.session.receive_shares(client, document)
                    else:
                        region.session.receive_unmasking(client, document)
                await self._secure_tick(current)
        except UpdateRejected as exc:
            self.metrics.updates_rejected.labels(
                self.name, TIER, self.region, tenant, exc.reason
            ).inc()
            log.warning(
                "secure aggregation %s refused: %s",
                step,
                exc.detail,
                extra=fields(
                    job=self.name,
                    region=self.region,
                    tenant=tenant,
                    client=request.headers.get(H_CLIENT),
                    reason=exc.reason,
                ),
            )
            return json_error(exc.status, exc.reason, exc.detail)
        # Key material, counted apart from the masked updates (bytes_up).
        await self._count(number, secagg_bytes=size)
        return web.json_response({"status": "accepted", "round": number})

    async def _secagg_request(self, request: web.Request) -> tuple[str, int, dict[str, Any], int]:
        """The checked JSON of one protocol message: its client, round, body and size."""
        client = request.headers.get(H_CLIENT, "")
        raw = await request.read()
        try:
            document = json.loads(raw)
        except ValueError:
            raise UpdateRejected(Reason.malformed.value, "the body is not JSON") from None
        if not isinstance(document, dict):
            raise UpdateRejected(Reason.malformed.value, "expected a JSON object")
        number = document.get("round")
        if isinstance(number, bool) or not isinstance(number, int):
            raise UpdateRejected(Reason.malformed.value, "round must be an integer")
        if document.get("client") != client or client not in self.clients:
            raise UpdateRejected(
                Reason.metadata_mismatch.value,
                f"body client {document.get('client')!r} but request says {client!r}",
            )
        return client, number, document, len(raw)

    async def _receive_keys(
        self, current: _Round, tenant: str, client: str, document: dict[str, Any]
    ) -> None:
        """Step 1: a client that trained joins the round with its keys and weight."""
        assert self.secure is not None
        if client not in current.selected:
            raise UpdateRejected(
                Reason.not_selected.value,
                f"{client} was not selected for round {current.info.round}",
                403,
            )
        weight = self._capped_weight(str(document.get("weight")), client, tenant)
        raw_steps = document.get("steps")
        steps = parse_steps(
            None if raw_steps is None else str(raw_steps), required=self.needs_local_steps
        )
        if current.secure is None:
            if self.template is None:
                await self.model_bytes(current.info.version)
            assert self.template is not None
            length = sum(int(np.prod(shape)) for shape, _dtype in self.template.values())
            session = secagg.ServerSession(self.name, current.info.round, self.secure, length)
            current.secure = SecureRegion(session, set(current.selected), self.secure)
        counted = privacy.counted_weight(self.dp, weight)
        current.secure.session.receive_keys(client, document, self.fold_scale(counted, steps))
        try:
            await self.store.record_report(current.info.round, client, weight)
        except RedisError as exc:
            del current.secure.session.members[client]
            raise UpdateRejected(
                Reason.unavailable.value, f"round state unavailable: {exc}", 503
            ) from None
        current.secure.claims[client] = Claim(weight, counted, steps)
        self.metrics.clients_reported.labels(self.name, self.region).set(
            len(current.secure.session.members)
        )

    async def _fold_masked(
        self,
        tenant: str,
        client: str,
        number: int,
        weight: float,
        current: _Round,
        body: memoryview,
    ) -> dict[str, object]:
        """Step 3: add one masked update (uint32, the model's shapes) to the region's total."""
        tensors, _metadata = self._decode(body, "masked", tenant, client, number, weight)
        assert self.template is not None
        check_structure(
            tensors,
            {name: (shape, np.dtype(np.uint32)) for name, (shape, _) in self.template.items()},
        )
        async with self._lock:
            region = current.secure
            if region is None or self.current is not current:
                raise UpdateRejected(Reason.late.value, f"round {number} no longer collects", 410)
            claim = region.claims.get(client)
            if claim is not None and weight != claim.weight:
                raise UpdateRejected(
                    Reason.metadata_mismatch.value,
                    f"weight {weight:g} differs from the {claim.weight:g} sent with the keys",
                )
            region.session.receive_masked(client, secagg.flatten(tensors))
            await self._secure_tick(current)
        self.metrics.updates_accepted.labels(self.name, TIER, self.region, tenant).inc()
        self.metrics.bytes_up.labels(self.name, TIER, self.region, tenant).inc(len(body))
        await self._count(number, bytes_up=len(body))
        log.info(
            "masked update added",
            extra=fields(
                job=self.name, round=number, region=self.region, tenant=tenant, client=client
            ),
        )
        return {"status": "accepted", "round": number}

    def _secure_tasks_for(
        self, current: _Round, clients: set[str], after: int
    ) -> dict[str, Any] | None:
        region = current.secure
        task = _task_fields(current)
        tasks: list[dict[str, Any]] = []
        for client in sorted(current.selected & clients):
            step = region.task(client) if region is not None else None
            if step is not None:
                tasks.append({**task, **step, "client": client})
            elif (
                current.info.round > after
                and (region is None or region.step == "advertise")
                and (region is None or client not in region.session.members)
                and current.info.state == RoundState.collecting
            ):
                tasks.append({"status": "train", "client": client, **task})
        if not tasks:
            return None
        return {"status": "tasks", "round": current.info.round, "tasks": tasks}

    async def _secure_tick(self, current: _Round) -> None:
        """Move the region's protocol on if its step is done or out of time (under the lock)."""
        if current.flushed:
            return
        flush = current.info.state == RoundState.aggregating
        region = current.secure
        if region is None:
            if flush and current.selected:  # nobody here sent keys by the deadline
                self._schedule_flush(current)
            return
        now = time.monotonic()
        before = region.step
        try:
            while region.due(now, flush):
                region.advance(now)
        except SecureAggregationFailed as exc:
            await self._secure_failed(current, str(exc))
            return
        if region.step == "finish":
            self._schedule_flush(current)
        if region.step != before:
            log.info(
                "secure aggregation: step %s (%d clients in)",
                region.step,
                len(region.session.members),
                extra=fields(job=self.name, round=current.info.round, region=self.region),
            )
            async with self._changed:
                self._changed.notify_all()

    async def _secure_failed(self, current: _Round, message: str) -> None:
        """The region sends no partial this round: its reports go, the global tier learns why."""
        current.flushed = True
        number = current.info.round
        self.metrics.secagg_failures.labels(self.name, self.region).inc()
        log.error(
            "secure aggregation failed: %s",
            message,
            extra=fields(job=self.name, round=number, region=self.region),
        )
        members = sorted(current.secure.session.members) if current.secure else []
        current.secure = None
        try:
            await self.store.forget_reports(number, members)
            await self.store.record_region_failure(number, self.region, message)
            await self.store.publish({"type": "region_failed", "round": number})
        except RedisError as exc:
            log.warning("region failure not recorded: %s", exc, extra=fields(job=self.name))
        async with self._changed:
            self._changed.notify_all()

    def _secure_partial(
        self, region: SecureRegion
    ) -> tuple[dict[str, np.ndarray], float, int, float]:
        """The decoded region sum as tensors, its weight, count and weighted steps (executor)."""
        assert self.template is not None
        flat, survivors = region.session.finish()
        shapes = {name: shape for name, (shape, _dtype) in self.template.items()}
        tensors = secagg.unflatten(flat, shapes)
        weight = sum(region.claims[c].counted for c in survivors)
        steps = sum(region.claims[c].counted * region.claims[c].steps for c in survivors)
        return tensors, weight, len(survivors), steps

    def _inspect(
        self, template: Template, tensors: dict[str, np.ndarray], metadata: dict[str, str]
    ) -> tuple[dict[str, np.ndarray | compression.Part], float]:
        """The update in the form it is folded from, checked, and its L2 norm."""
        bound = self.job.spec.transport.norm_bound
        if self.compression.up.scheme == "none":
            norm = check_update(tensors, template, bound)
            dp = self.dp
            # Local DP updates carry their noise: only a central one can be checked.
            if dp is not None and dp.mode is DpMode.central:
                if norm > dp.clip_norm * (1 + privacy.CLIP_TOLERANCE):
                    raise UpdateRejected(
                        Reason.over_clip_norm.value,
                        f"update L2 norm {norm:.6g} > spec.privacy.dp.clipNorm {dp.clip_norm}: "
                        "the worker must clip it",
                    )
            return dict(tensors), norm
        # Checked in its wire form and folded from it: no dense copy per update.
        shapes = {name: shape for name, (shape, _dtype) in template.items()}
        update = dict(compression.parse(tensors, metadata, shapes, self.compression.up))
        norm = l2_norm(update)
        check_bound(norm, bound)
        return update, norm

    async def _count(self, number: int, **deltas: int) -> None:
        """Add to the round's counters; they are statistics, so Redis being away is logged."""
        try:
            await self.store.add_counters(number, **deltas)
        except RedisError as exc:
            log.warning(
                "round counters not updated: %s", exc, extra=fields(job=self.name, round=number)
            )

    def _check_round(self, current: _Round | None, number: int, client: str) -> None:
        if current is None or number > current.info.round:
            raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
        if number == current.info.round and client in current.folded:
            # A retry of an accepted update (its answer was lost): harmless, and
            # said so even after the region flushed.
            raise UpdateRejected(Reason.duplicate.value, f"{client} already reported", 409)
        # A resend of what a dead incarnation had accepted still counts after
        # the global tier asked for the flush: it was in before the deadline.
        collecting = current.info.state == RoundState.collecting or client in current.owed
        if number < current.info.round or current.flushed or not collecting:
            raise UpdateRejected(Reason.late.value, f"round {number} no longer collects", 410)
        if client not in current.selected:
            raise UpdateRejected(
                Reason.not_selected.value, f"{client} was not selected for round {number}", 403
            )

    # -- flushing the partial ------------------------------------------------
    def _schedule_flush(self, current: _Round) -> None:
        if current.flushed:
            return
        current.flushed = True
        self._background(self._flush(current))

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a task that stop() waits for or cancels (and that is not GC'd early)."""
        task = asyncio.create_task(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _forget_owed(self, current: _Round) -> None:
        """Clients that never resent after a restart: not in the sum, so not reported."""
        lost, current.owed = sorted(current.owed), set()
        if not lost:
            return
        log.error(
            "%d updates folded before a restart were not sent again (%s): they count as dropped",
            len(lost),
            ", ".join(lost),
            extra=fields(job=self.name, round=current.info.round, region=self.region),
        )
        try:
            await self.store.forget_reports(current.info.round, lost)
        except RedisError as exc:
            log.warning("reports not forgotten: %s", exc, extra=fields(job=self.name))

    async def _flush(self, current: _Round) -> None:
        """Send the partial; retry until the global tier has it or moved on."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            await self._forget_owed(current)
            if current.secure is not None:
                region, current.secure = current.secure, None
                try:
                    tensors, weight, count, steps = await loop.run_in_executor(
                        None, self._secure_partial, region
                    )
                except SecureAggregationFailed as exc:
                    current.secure = region
                    await self._secure_failed(current, str(exc))
                    return
                dropped = sorted(region.session.members.keys() - region.session.masked)
                if dropped:
                    self.metrics.secagg_dropouts.labels(self.name, self.region).inc(len(dropped))
                    log.warning(
                        "secure aggregation: %d clients dropped out (%s); the sum is the others'",
                        len(dropped),
                        ", ".join(dropped),
                        extra=fields(job=self.name, round=current.info.round, region=self.region),
                    )
                    with contextlib.suppress(RedisError):
                        await self.store.forget_reports(current.info.round, dropped)
            elif current.buffer is not None:
                assert self.robust_rule is not None
                started = time.perf_counter()
                tensors, weight, count, steps = await loop.run_in_executor(
                    None, current.buffer.reduce, self.robust_rule, self.strategy.robust
                )
                self.metrics.aggregation_seconds.labels(self.name, TIER, self.region).observe(
                    time.perf_counter() - started
                )
                current.buffer = None  # the region's copies go as soon as they are reduced
            else:
                partial = current.sum
                tensors = partial.sums if partial else {}
                weight = partial.weight if partial else 0.0
                count = partial.count if partial else 0
                steps = partial.steps if partial else 0.0
            envelope = Envelope(self.name, current.info.round, self.region, "", weight)
            metadata = {
                **envelope.metadata("partial"),
                "fedkube.count": str(count),
                M_WEIGHTED_STEPS: repr(float(steps)),
            }
            encoded = codec.encode_parts(tensors, metadata)
        headers = {
            H_JOB: self.name,
            H_ROUND: str(current.info.round),
            H_REGION: self.region,
            H_CODEC: codec.CODEC,
        }
        assert self._http is not None
        delay = 0.2
        while not self.stopped.is_set():
            body, framing = upload(encoded)
            try:
                async with self._http.post(
                    f"{self.config.global_url}/v1/partial",
                    data=body,
                    headers={**headers, **framing},
                ) as response:
                    answer = await response.text()
                    if response.status < 300 or response.status in (409, 410):
                        log.info(
                            "partial sent: %d updates, weight %.0f (%s)",
                            count,
                            weight,
                            response.status,
                            extra=fields(
                                job=self.name, round=current.info.round, region=self.region
                            ),
                        )
                        return
                    log.error(
                        "global refused partial: %s %s",
                        response.status,
                        answer,
                        extra=fields(job=self.name, round=current.info.round),
                    )
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.warning(
                    "global unreachable (%s); retrying",
                    exc,
                    extra=fields(job=self.name, round=current.info.round),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


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
