"""The global aggregator: drives rounds, reduces regional partials, checkpoints.

For each round it selects participants (seeded), opens the round in Redis,
serves model version ``v_r`` to the combiners (with whatever the strategy
sends down beside it, e.g. SCAFFOLD's control variate), waits for one partial
per region that has selected clients (or the deadline), reduces them to the
round's mean delta, applies the strategy's server step (FedAvg, server
momentum, FedAdam/Yogi/Adagrad, SCAFFOLD, FedNova), evaluates on the held-out
split, checkpoints the model with the strategy's state, appends the round's
record to the history and opens the next round.

Deadline rule: at the deadline, if at least ``quorum`` clients reported the
combiners are asked to flush (state ``aggregating``); otherwise the spec's
``onQuorumMissed`` extends the deadline or fails the job with a status that
says why. Partials are written to the checkpoint volume before they are
acknowledged, so ``--resume`` after a crash continues the same round with
none of them lost.

Redis going away (a restart, a failover) pauses the round loop instead of
ending it: the aggregator waits for Redis with backoff, finishes in Redis
whatever it had done in memory (a round checkpointed but not yet closed
there), continues the open round and gives it back the time the outage took.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from fedkube import codec, compression, evaluation, faults, headline, privacy
from fedkube.aggregator import checkpoint
from fedkube.aggregator.site_evaluation import evaluate_at_sites
from fedkube.aggregator.strategies import REGISTRY
from fedkube.aggregator.strategies.fedavg import (
    Partial,
    RoundAggregate,
    Tensors,
    aggregate_partials,
)
from fedkube.aggregator.validation import Template, check_finite, check_structure, template_of
from fedkube.errors import CodecError, QuorumNotReached, UpdateRejected
from fedkube.failures import describe as describe_failures
from fedkube.learning import build_model, float_state, load_data, load_float_state
from fedkube.logs import fields
from fedkube.metrics import Metrics
from fedkube.protocol import (
    H_JOB,
    H_REGION,
    H_ROUND,
    M_JOB,
    M_KIND,
    M_REGION,
    M_ROUND,
    M_WEIGHTED_STEPS,
    Reason,
    RoundState,
    check_metadata,
    parse_int,
)
from fedkube.roundstate import SOCKET_TIMEOUT_S, RoundInfo, RoundStore, select_clients
from fedkube.spec import MAX_METRICS, DpMode, FederatedJob, quorum
from fedkube.task import TaskContext, TaskFailed, load_task
from fedkube.web import bearer, json_error, send_payload, start_site, token_matches

log = logging.getLogger("fedkube.global")

TIER = "global"
POLL_INTERVAL_S = 0.25
LEASE_TTL_MS = 5000
REDIS_RETRY_MAX_S = 5.0


@dataclass
class GlobalConfig:
    job: FederatedJob
    redis_url: str
    checkpoint_dir: Path
    aggregator_digest: str
    host: str = "127.0.0.1"
    port: int = 0
    resume: bool = False
    lease_ttl_ms: int = LEASE_TTL_MS


class GlobalAggregator:
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
        self._arrived = asyncio.Event()
        self._lease = secrets.token_hex(8)
        self._test_data: Any = None
        self._site_metric_names: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._continue: RoundInfo | None = None
        self.stopping = asyncio.Event()
        self.port = config.port

    # -- lifecycle ---------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.spec.transport.max_update_bytes * 4)
        app.router.add_get("/v1/model/{version}", self.handle_model)
        app.router.add_post("/v1/partial", self.handle_partial)
        app.router.add_get("/v1/status", self.handle_status)
        app.router.add_get("/metrics", self.metrics.handle)
        app.router.add_get("/healthz", self.handle_health)
        return app

    async def start(self) -> None:
        while not await self.store.acquire_lease("global", self._lease, self.config.lease_ttl_ms):
            log.info("waiting for the global lease", extra=fields(job=self.name))
            await asyncio.sleep(self.config.lease_ttl_ms / 4000)
        await self._restore()
        # A resumed round is open from the start: show it (the stalled-round
        # alert watches this gauge), not only once the next round opens.
        current = self._continue.round if self._continue is not None else self.round_no
        if current:
            self.metrics.round_current.labels(self.name, TIER, "").set(current)
        self.metrics.strategy_info.labels(
            self.name, self.spec.strategy.name, self.spec.strategy.robust.rule
        ).set(1)
        self._show_state()
        self._publish_model()
        self._runner, self.port = await start_site(self.app(), self.config.host, self.config.port)
        self._tasks.append(asyncio.create_task(self._keep_lease()))
        log.info(
            "global aggregator serving on port %d, next round %d",
            self.port,
            self.round_no + 1 if self._continue is None else self._continue.round,
            extra=fields(job=self.name),
        )

    async def stop(self) -> None:
        # Loops check `stopping` too: a cancellation racing with a timeout can
        # be lost on Python 3.11, and shutdown must not hang on it.
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self._runner.cleanup()
        await self.store.release_lease("global", self._lease)
        await self.store.close()

    async def _keep_lease(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.config.lease_ttl_ms / 3000)
            try:
                await self.store.renew_lease("global", self._lease, self.config.lease_ttl_ms)
            except RedisError as exc:  # transient: the next tick tries again
                log.warning("lease renewal failed: %s", exc, extra=fields(job=self.name))

    async def _restore(self) -> None:
        """Fresh start, or continue from the checkpoint and Redis (``--resume``)."""
        directory = self.config.checkpoint_dir
        if not self.config.resume:
            checkpoint.clear(directory)
            await self.store.delete_all(keep_leases=True)
            await self.store.start_job(self.spec.rounds)
            return
        saved = checkpoint.load_latest(directory, self.name)
        interrupted = await self.store.evaluation()
        if interrupted is not None and interrupted.open:
            # The round it belonged to closes without it (its checkpoint is the record).
            await self.store.close_evaluation(interrupted.round, self.spec.state.key_ttl_seconds)
        closed_in_redis, _ = await self.store.last_record()
        if (saved.round if saved is not None else 0) < closed_in_redis:
            # Redis is ahead of the model: the checkpoints were lost (an emptyDir
            # under a rescheduled pod) or are older. Resuming from what is here is
            # consistent (history is trimmed to match), but the rounds in between
            # are trained again: say so loudly instead of doing it silently.
            log.error(
                "Redis records %d closed rounds but the newest checkpoint in %s is round %d: "
                "rounds %d to %d are lost and will be trained again. Keep checkpoints on a "
                "volume that outlives the pod (spec.state.checkpointClaim)",
                closed_in_redis,
                directory,
                saved.round if saved is not None else 0,
                (saved.round if saved is not None else 0) + 1,
                closed_in_redis,
                extra=fields(job=self.name),
            )
        last_closed = 0
        if saved is not None:
            self.weights, last_closed = saved.weights, saved.round
            if saved.state.keys() == self.server_state.keys():
                self.server_state = saved.state
            elif self.server_state:
                log.error(
                    "checkpoint of round %d has no %s state; it starts again from its "
                    "initial value",
                    saved.round,
                    self.spec.strategy.name,
                    extra=fields(job=self.name),
                )
            self.version = last_closed + 1
            await self._finish_close(saved)
        self.round_no = last_closed
        current = await self.store.current_round()
        info = await self.store.round_info(current) if current else None
        if (
            info is not None
            and current == last_closed + 1
            and info.state in (RoundState.collecting, RoundState.aggregating)
        ):
            self._continue = info
            for region, body in checkpoint.load_partials(directory, current).items():
                self.partials[region] = self._decode_partial(body, current, region)
                await self.store.record_partial(current, region, self.partials[region].count)
        else:
            await self.store.trim_history(last_closed)
        await self.store.start_job(self.spec.rounds)
        if self.accountant is not None:
            # The privacy spent is in the history: one sampling rate per closed round.
            self.accountant.rates = [
                float(r["dp_rate"]) for r in await self.store.history() if "dp_rate" in r
            ]
        log.info(
            "resuming after round %d (%d partials kept)",
            last_closed,
            len(self.partials),
            extra=fields(job=self.name),
        )

    async def _finish_close(self, saved: checkpoint.Checkpoint) -> None:
        """Close in Redis a round that was checkpointed but not yet closed there.

        ``_close`` writes the checkpoint first and closes the round in Redis
        second; a crash between the two would otherwise lose that round's
        history record. The checkpoint's metadata is that record.
        """
        info = await self.store.round_info(saved.round)
        if info is not None and info.state != RoundState.closed:
            record = {key: value for key, value in saved.metadata.items() if key != "job"}
            await self.store.close_round(saved.round, record, self.spec.state.key_ttl_seconds)
            log.warning(
                "round %d was checkpointed but not closed in Redis; closed it now",
                saved.round,
                extra=fields(job=self.name, round=saved.round),
            )

    def _publish_model(self) -> None:
        """Encode model ``v`` once (in ``compression.down``'s form) for every combiner."""
        self.model_bytes = {v: b for v, b in self.model_bytes.items() if v >= self.version - 1}
        rng = np.random.default_rng([self.spec.seed, self.version])
        wire, meta, _decoded = compression.encode(
            self.strategy.downlink(self.weights, self.server_state),
            self.spec.compression.down,
            rng,
            with_shapes=True,
        )
        self.model_bytes[self.version] = codec.encode(
            wire,
            {
                **meta,
                "fedkube.job": self.name,
                "fedkube.version": str(self.version),
                M_KIND: "model",
            },
        )

    # -- the round loop ------------------------------------------------------
    async def run(self) -> str:
        """Drive rounds to the end; returns the job's final status."""
        self.metrics.state_store_up.labels(self.name, TIER, "").set(1)
        while True:
            try:
                return await self._drive()
            except RedisError as exc:
                await self._ride_out_outage(exc)

    async def _ride_out_outage(self, cause: RedisError) -> None:
        """Wait for Redis with backoff, then pick the rounds up where they stood."""
        started = time.time()
        if isinstance(cause, RedisTimeout):
            started -= SOCKET_TIMEOUT_S  # the call that timed out had been waiting that long
        self.metrics.state_store_up.labels(self.name, TIER, "").set(0)
        log.error(
            "round state (Redis) unreachable: %s; rounds pause until it is back",
            cause,
            extra=fields(job=self.name, round=self.round_no + 1),
        )
        delay, logged = POLL_INTERVAL_S, started
        while True:
            self._check_stopping()
            await asyncio.sleep(delay)
            try:
                await self.store.redis.ping()
                break
            except RedisError as exc:
                delay = min(delay * 2, REDIS_RETRY_MAX_S)
                if time.time() - logged >= 30:
                    logged = time.time()
                    log.error(
                        "round state (Redis) unreachable for %.0fs: %s",
                        logged - started,
                        exc,
                        extra=fields(job=self.name, round=self.round_no + 1),
                    )
        outage = time.time() - started
        self.metrics.state_store_up.labels(self.name, TIER, "").set(1)
        log.warning(
            "round state (Redis) back after %.1fs; resuming",
            outage,
            extra=fields(job=self.name, round=self.round_no + 1),
        )
        await self._resync(started, outage)

    async def _resync(self, outage_started: float, outage_s: float) -> None:
        """Make Redis agree with this process again after an outage.

        Memory is ahead of Redis, never behind: a round checkpointed but not
        yet closed there is closed from its checkpoint; an open round is
        continued (with the time the outage took added to its deadline, if
        the deadline had not passed before); otherwise the loop opens the
        next round.
        """
        last = self.round_no
        info = await self.store.round_info(last) if last else None
        if info is not None and info.state != RoundState.closed:
            saved = checkpoint.load_latest(self.config.checkpoint_dir, self.name)
            if saved is not None and saved.round == last:
                await self._finish_close(saved)
                checkpoint.drop_partials(self.config.checkpoint_dir, last)
                self.partials = {}
        current = await self.store.current_round()
        info = await self.store.round_info(current) if current == last + 1 else None
        if info is not None and info.state in (RoundState.collecting, RoundState.aggregating):
            self._continue = info
            if info.deadline > outage_started:
                await self.store.set_deadline(current, info.deadline + outage_s)

    async def _drive(self) -> str:
        try:
            while self.round_no < self.spec.rounds:
                if self._continue is None and (stop := self._privacy_budget_spent()):
                    return await self._end_for_budget(stop)
                info = self._continue or await self._open(self.round_no + 1)
                self._continue = None
                partials = await self._collect(info)
                await self._close(info, partials)
        except QuorumNotReached as exc:
            log.error("%s", exc, extra=fields(job=self.name, round=self.round_no + 1))
            await self.store.finish_job("failed", str(exc), self.spec.state.key_ttl_seconds)
            return "failed"
        message = f"{self.spec.rounds} rounds completed"
        await self.store.finish_job("succeeded", message, self.spec.state.key_ttl_seconds)
        log.info("job succeeded", extra=fields(job=self.name))
        return "succeeded"

    def _privacy_budget_spent(self) -> str | None:
        """Why the next round may not run (its ε would pass the budget), or None."""
        if self.dp is None or self.dp.budget is None or self.accountant is None:
            return None
        rate = privacy.sampling_rate(self.spec, len(self.clients))
        after = self.accountant.epsilon_after(rate)
        if after <= self.dp.budget:
            return None
        return (
            f"privacy budget reached: round {self.round_no + 1} would bring ε to {after:.3f} "
            f"(δ={self.dp.delta:g}), over spec.privacy.dp.budget {self.dp.budget:g}; "
            f"{self.round_no} rounds ran, ε {self.accountant.epsilon():.3f}"
        )

    async def _end_for_budget(self, message: str) -> str:
        assert self.dp is not None
        status = "succeeded" if self.dp.on_budget_exhausted == "stop" else "failed"
        log.warning("%s", message, extra=fields(job=self.name, round=self.round_no))
        await self.store.finish_job(status, message, self.spec.state.key_ttl_seconds)
        return status

    async def _open(self, number: int) -> RoundInfo:
        ids = [c.id for c in self.clients]
        selected = select_clients(ids, self.spec.participation.fraction, self.spec.seed, number)
        needed = quorum(self.spec.participation, len(selected))
        await self._await_clients(number, selected, needed)
        # Clients whose site refused the job stay counted in the quorum (they
        # are absent) but are not waited on: the round opens without them.
        refused = await self.store.refused_tenants()
        # Likewise clients whose workers stopped polling (registration
        # expired): the round does not wait for them; they count as dropped.
        gone = await self._gone(selected)
        selected = [c for c in selected if self.tenant_of[c] not in refused and c not in gone]
        if gone:
            log.warning(
                "opening without %d selected clients that stopped polling: %s",
                len(gone),
                ", ".join(sorted(gone)),
                extra=fields(job=self.name, round=number),
            )
        self.partials = {}
        self._arrived.clear()
        info = await self.store.open_round(
            number, selected, needed, self.spec.participation.round_timeout_seconds, self.version
        )
        self.metrics.round_current.labels(self.name, TIER, "").set(number)
        for region in self.regions:
            here = sum(1 for c in selected if self.region_of[c] == region)
            self.metrics.clients_selected.labels(self.name, region).set(here)
        log.info(
            "round opened: %d selected, quorum %d",
            len(selected),
            needed,
            extra=fields(job=self.name, round=number),
        )
        return info

    async def _gone(self, clients: Sequence[str]) -> set[str]:
        """Clients that registered once but not within ``registrationTtlSeconds``."""
        seen = await self.store.registrations(clients)
        limit = time.time() - self.spec.participation.registration_ttl_seconds
        return {c for c in clients if c in seen and seen[c] <= limit}

    async def _await_clients(self, number: int, selected: list[str], needed: int) -> None:
        """Open a round only once a quorum of its selected clients has registered."""
        limit = self.spec.participation.start_timeout_seconds
        started = time.monotonic()
        logged = 0.0
        while True:
            self._check_stopping()
            if await self.store.is_paused():
                started = time.monotonic()  # a suspended job's workers are gone on purpose
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            refused = await self.store.refused_tenants()
            eligible = {c for c in selected if self.tenant_of[c] not in refused}
            if len(eligible) < needed:
                names = sorted({self.tenant_of[c] for c in selected} & refused.keys())
                raise QuorumNotReached(
                    f"round {number}: quorum is {needed} of the {len(selected)} selected "
                    f"clients, but only {len(eligible)} can take part: refused at their site: "
                    + "; ".join(f"tenant {t}: {refused[t]}" for t in names)
                )
            ttl = self.spec.participation.registration_ttl_seconds
            ready = len(await self.store.registered_clients(ttl, sorted(eligible)))
            if ready >= needed:
                return
            waited = time.monotonic() - started
            if waited >= limit:
                raise QuorumNotReached(
                    f"round {number}: only {ready} of the {len(selected)} selected clients "
                    f"registered within {limit:.0f}s (quorum is {needed})"
                )
            if waited - logged >= 10:
                logged = waited
                log.info(
                    "waiting for clients: %d of %d registered, need %d",
                    ready,
                    len(selected),
                    needed,
                    extra=fields(job=self.name, round=number),
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _collect(self, info: RoundInfo) -> list[Partial]:
        number = info.round
        selected = await self.store.selected(number)
        expected = {self.region_of[c] for c in selected}
        flush_deadline: float | None = None
        timeout = self.spec.participation.round_timeout_seconds
        secure = self.spec.privacy.secure_aggregation
        # After the flush request a secure region still runs three steps.
        flush_timeout = timeout + (3 * secure.phase_timeout_seconds if secure else 0)
        while True:
            self._check_stopping()
            if expected <= self.partials.keys():
                return await self._every_region_in(info, len(selected))
            now = time.time()
            current = await self.store.round_info(number)
            assert current is not None
            if self.spec.privacy.secure_aggregation is not None:
                closing = await self._without_failed_regions(current, expected, len(selected))
                if closing is not None:
                    return closing
            if current.state == RoundState.collecting and await self.store.is_paused():
                # Suspended: its workers were stopped on purpose. The round keeps
                # what it has and gets a whole deadline again once resumed.
                await self.store.postpone(number, timeout)
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            if current.state == RoundState.collecting and now >= current.deadline:
                reported = await self.store.reported_count(number)
                if reported >= current.quorum:
                    await self.store.transition(
                        number, RoundState.collecting, RoundState.aggregating
                    )
                    await self.store.publish({"type": "round_flush", "round": number})
                    flush_deadline = now + flush_timeout
                    log.info(
                        "deadline: %d reported, asking combiners to flush",
                        reported,
                        extra=fields(job=self.name, round=number),
                    )
                else:
                    offline = [
                        f"region {region} has no running combiner (its lease lapsed)"
                        for region in sorted(expected)
                        if not await self.store.lease_held(f"combiner-{region}")
                    ]
                    await self._quorum_missed(current, reported, len(selected), offline)
            elif current.state == RoundState.aggregating:
                flush_deadline = flush_deadline or now + flush_timeout
                if now >= flush_deadline:
                    got = sum(p.count for p in self.partials.values())
                    if got >= current.quorum and got > 0:
                        log.warning(
                            "regions %s sent no partial; closing without them",
                            sorted(expected - self.partials.keys()),
                            extra=fields(job=self.name, round=number),
                        )
                        return list(self.partials.values())
                    await self.store.transition(
                        number, RoundState.aggregating, RoundState.collecting
                    )
                    silent = [
                        f"no partial from region {region} (is its combiner running?)"
                        for region in sorted(expected - self.partials.keys())
                    ]
                    await self._quorum_missed(current, got, len(selected), silent)
                    flush_deadline = None
            wait = max(0.01, min(POLL_INTERVAL_S, current.deadline - now))
            # asyncio.wait, not wait_for: wait_for can swallow a cancellation
            # that races with the event (Python 3.11).
            arrival = asyncio.ensure_future(self._arrived.wait())
            await asyncio.wait({arrival}, timeout=wait)
            arrival.cancel()
            self._arrived.clear()

    async def _every_region_in(self, info: RoundInfo, selected: int) -> list[Partial]:
        """The round's partials, now that every region sent one; nobody else can report.

        A region sends its partial early once each of its clients reported or
        said that its task failed (fedkube.failures): if that leaves the round
        short of its quorum, waiting longer cannot help, and the job fails
        naming the tenants whose task failed and how.
        """
        got = sum(p.count for p in self.partials.values())
        if got >= info.quorum and got > 0:
            return list(self.partials.values())
        failures = await self.store.task_failures(info.round)
        raise QuorumNotReached(
            f"round {info.round}: {got} of {selected} selected clients reported, quorum is "
            f"{info.quorum}{self._failures_text(failures)}"
        )

    def _failures_text(self, failures: Mapping[str, str]) -> str:
        if not failures:
            return ""
        return "; the task failed at " + describe_failures(failures, self.tenant_of)

    async def _without_failed_regions(
        self, info: RoundInfo, expected: set[str], selected: int
    ) -> list[Partial] | None:
        """Once every region sent its partial or failed its secure aggregation: the round's
        partials if they still make the quorum; else the round fails, saying why."""
        failures = await self.store.region_failures(info.round)
        if not failures or not expected <= self.partials.keys() | failures.keys():
            return None
        got = sum(p.count for p in self.partials.values())
        causes = "; ".join(f"region {r}: {failures[r]}" for r in sorted(failures))
        if got >= info.quorum and got > 0:
            log.warning(
                "closing without regions whose secure aggregation failed: %s",
                causes,
                extra=fields(job=self.name, round=info.round),
            )
            return list(self.partials.values())
        raise QuorumNotReached(
            f"round {info.round}: {got} of {selected} selected clients in the regions' sums, "
            f"quorum is {info.quorum}; secure aggregation failed in {causes}"
        )

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise asyncio.CancelledError("the global aggregator is stopping")

    async def _quorum_missed(
        self, info: RoundInfo, reported: int, selected: int, causes: Sequence[str] = ()
    ) -> None:
        """Extend the deadline or fail the job; ``causes`` name regions that cannot report."""
        policy = self.spec.participation
        regions = "".join(f"; {cause}" for cause in causes)
        regions += self._failures_text(await self.store.task_failures(info.round))
        if policy.on_quorum_missed == "extend" and info.extensions < policy.max_extensions:
            await self.store.extend(info.round, policy.round_timeout_seconds)
            log.warning(
                "quorum missed (%d of %d, need %d): deadline extended (%d/%d)%s",
                reported,
                selected,
                info.quorum,
                info.extensions + 1,
                policy.max_extensions,
                regions,
                extra=fields(job=self.name, round=info.round),
            )
            return
        raise QuorumNotReached(
            f"round {info.round}: {reported} of {selected} selected clients reported, "
            f"quorum is {info.quorum} (after {info.extensions} deadline extensions){regions}"
        )

    async def _close(self, info: RoundInfo, partials: list[Partial]) -> None:
        number = info.round
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        aggregate = await loop.run_in_executor(
            None, aggregate_partials, partials, len(self.clients)
        )
        selected = await self.store.selected(number)
        spent = await self._privatise(len(selected), aggregate)
        if spent is not None:
            aggregate, privacy_record = spent
        else:
            privacy_record = {}
        self.weights, self.server_state = await loop.run_in_executor(
            None,
            self.strategy.module.server_step,
            self.weights,
            aggregate,
            self.server_state,
            self.spec.strategy,
        )
        faults.reached("global.after_reduce", number)
        summary = self._show_state()
        self.metrics.aggregation_seconds.labels(self.name, TIER, "").observe(
            time.perf_counter() - started
        )
        evaluated: Mapping[str, float] = {}
        due = number % self.spec.evaluation.every_rounds == 0 or number == self.spec.rounds
        if due and self.spec.evaluation.central and self.task.has("evaluate"):
            evaluated = await loop.run_in_executor(None, self._evaluate, number)
        loss, accuracy = evaluated.get("loss"), evaluated.get("accuracy")
        if loss is not None:
            self.metrics.model_loss.labels(self.name).set(loss)
        if accuracy is not None:
            self.metrics.model_accuracy.labels(self.name).set(accuracy)
        for metric, score in evaluated.items():
            self.metrics.eval_metric.labels(self.name, "central", "", metric).set(score)
        counters = await self.store.counters(number)
        by_region: dict[str, dict[str, int]] = {}
        missing: list[str] = []
        for region in sorted(self.regions):
            chosen = sum(1 for c in selected if self.region_of[c] == region)
            if chosen and region not in self.partials:
                missing.append(region)
            got = self.partials[region].count if region in self.partials else 0
            by_region[region] = {"selected": chosen, "reported": got}
            if chosen:
                self.metrics.participation.labels(self.name, region).set(got / chosen)
                self.metrics.clients_dropped.labels(self.name, region).inc(chosen - got)
            self.metrics.clients_reported.labels(self.name, region).set(got)
        reported = sum(p.count for p in partials)
        record = {
            "round": number,
            "loss": loss,
            "accuracy": accuracy,
            "metrics": dict(evaluated),
            "selected": len(selected),
            "reported": reported,
            "dropped": len(selected) - reported,
            "participation": reported / len(selected) if selected else 0.0,
            "weight": sum(p.weight for p in partials),
            "duration_s": time.time() - info.opened_at,
            "bytes_up": counters.get("bytes_up", 0),
            "bytes_down": counters.get("bytes_down", 0),
            "duplicates": counters.get("duplicate", 0),
            "late": counters.get("late", 0),
            "regions": by_region,
            # Regions with selected clients whose combiner sent no partial.
            "missing_regions": missing,
            "extensions": (await self.store.round_info(number) or info).extensions,
            # Clients whose task failed the round, with the failure's first line.
            "task_failures": await self.store.task_failures(number),
            "strategy": self.spec.strategy.name,
            "robust": self.spec.strategy.robust.rule,
            "server_state": summary,
            **privacy_record,
        }
        if self.spec.privacy.secure_aggregation is not None:
            # Its keys and shares, sent beside the masked updates (bytes_up).
            record["secagg_bytes"] = counters.get("secagg_bytes", 0)
        checkpoint.save(
            self.config.checkpoint_dir,
            self.name,
            number,
            self.weights,
            record,
            state=self.server_state,
        )
        faults.reached("global.after_checkpoint", number)
        self.round_no = number
        self.version = number + 1
        self._publish_model()
        if evaluation.due(self.job, number):
            record["sites"] = await self._evaluate_at_sites(number)
        await self.store.close_round(number, record, self.spec.state.key_ttl_seconds)
        checkpoint.drop_partials(self.config.checkpoint_dir, number)
        self.partials = {}
        self.metrics.round_duration.labels(self.name).observe(record["duration_s"])
        self.metrics.rounds_completed.labels(self.name).inc()
        settings = self.spec.evaluation
        log.info(
            "round closed: %d/%d reported, %s %s",
            reported,
            len(selected),
            settings.metric,
            headline.show(headline.value(record, settings), settings),
            extra=fields(job=self.name, round=number),
        )

    async def _evaluate_at_sites(self, number: int) -> dict[str, Any]:
        """The new model (``self.version``) evaluated by the clients, summed per tenant.

        After the last round (cross-site) or with ``sites: all``: every client
        that polls and whose site did not refuse the job. Otherwise the
        round's reporters: they are alive, and the model is the one they
        train on next.
        """
        if evaluation.everyone(self.job, number):
            refused = await self.store.refused_tenants()
            ttl = self.spec.participation.registration_ttl_seconds
            alive = await self.store.registered_clients(ttl, [c.id for c in self.clients])
            clients = sorted(c for c in alive if self.tenant_of[c] not in refused)
        else:
            clients = sorted(await self.store.reported(number))
        summary = await evaluate_at_sites(
            self.store, self.job, number, self.version, clients, self.stopping
        )
        self._site_gauges(summary)
        return summary

    def _site_gauges(self, summary: dict[str, Any]) -> None:
        """``fedkube_eval_metric{scope="site"}``: overall (tenant empty) and per tenant.

        At most :data:`fedkube.task.MAX_METRICS` names reach Prometheus over
        the job's life, whatever the tenants report.
        """
        scopes = [("", summary["metrics"])] + [
            (tenant, entry["metrics"]) for tenant, entry in summary["tenants"].items()
        ]
        for tenant, metrics in scopes:
            for name, score in metrics.items():
                if name not in self._site_metric_names:
                    if len(self._site_metric_names) >= MAX_METRICS:
                        continue
                    self._site_metric_names.add(name)
                self.metrics.eval_metric.labels(self.name, "site", tenant, name).set(score)

    async def _privatise(
        self, selected: int, aggregate: RoundAggregate
    ) -> tuple[RoundAggregate, dict[str, float]] | None:
        """Central DP: the round's mean with its Gaussian noise, once for the whole
        hierarchy; and the privacy spent so far (both modes). None without DP."""
        if self.dp is None or self.accountant is None:
            return None
        z = self.accountant.noise_multiplier
        if self.dp.mode is DpMode.central and aggregate.count:
            std = z * self.dp.clip_norm / aggregate.count
            noised = await asyncio.get_running_loop().run_in_executor(
                None, privacy.add_gaussian_noise, aggregate.delta, std, privacy.noise_rng()
            )
            aggregate = dataclasses.replace(aggregate, delta=noised)
        rate = selected / len(self.clients)
        epsilon = self.accountant.spend(rate)
        self.metrics.dp_epsilon.labels(self.name).set(epsilon)
        return aggregate, {
            "epsilon": round(epsilon, 6),
            "delta": self.dp.delta,
            "noise_multiplier": round(z, 6),
            "dp_rate": rate,
        }

    def _show_state(self) -> dict[str, float]:
        """The strategy's state as norms, on ``/metrics`` (and returned for the history)."""
        summary = {
            key: round(value, 6)
            for key, value in self.strategy.module.state_summary(self.server_state).items()
        }
        for quantity, value in summary.items():
            self.metrics.strategy_state.labels(self.name, self.spec.strategy.name, quantity).set(
                value
            )
        return summary

    def _evaluate(self, number: int) -> Mapping[str, float]:
        """The task's metrics of the new global model on the held-out split (role ``test``).

        A failure of the task's code is logged with its traceback and the
        round goes on unevaluated: the model is not lost for want of a number.
        """
        ctx = TaskContext(self.job, "test", round=number, seed=self.spec.seed)
        try:
            if self._test_data is None:
                self._test_data = load_data(self.job, "test", task=self.task)
            load_float_state(self.model, self.weights)
            return self.task.evaluate(self.model, self._test_data, ctx).metrics
        except TaskFailed as exc:
            log.error(
                "evaluation failed: %s\n%s",
                exc,
                exc.details.rstrip(),
                extra=fields(job=self.name, round=number),
            )
            return {}

    # -- handlers ------------------------------------------------------------
    def _authorised(self, request: web.Request) -> bool:
        return token_matches(bearer(request), self.config.aggregator_digest)

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "round": self.round_no})

    async def handle_status(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return json_error(401, Reason.unauthenticated.value, "bad or missing token")
        return web.json_response(
            {
                "job": self.name,
                "last_closed_round": self.round_no,
                "version": self.version,
                "partials": sorted(self.partials),
            }
        )

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return json_error(401, Reason.unauthenticated.value, "bad or missing token")
        try:
            version = int(request.match_info["version"])
        except ValueError:
            return json_error(400, Reason.malformed.value, "version must be an integer")
        data = self.model_bytes.get(version)
        if data is None:
            return json_error(
                404,
                "unknown_version",
                f"model version {version} is not served (current {self.version})",
            )
        region = request.query.get("region", "")
        self.metrics.bytes_down.labels(self.name, TIER, region, "").inc(len(data))
        return await send_payload(request, data)

    async def handle_partial(self, request: web.Request) -> web.Response:
        region = request.headers.get(H_REGION, "")
        label = region if region in self.regions else "unknown"
        try:
            if not self._authorised(request):
                raise UpdateRejected(Reason.unauthenticated.value, "bad or missing token", 401)
            partial, body = await self._accept_partial(request, region)
        except UpdateRejected as exc:
            self.metrics.updates_rejected.labels(self.name, TIER, label, "", exc.reason).inc()
            log.warning(
                "partial rejected: %s",
                exc.detail,
                extra=fields(job=self.name, region=label, reason=exc.reason),
            )
            return json_error(exc.status, exc.reason, exc.detail)
        self.metrics.bytes_up.labels(self.name, TIER, region, "").inc(len(body))
        self.metrics.updates_accepted.labels(self.name, TIER, region, "").inc()
        self._arrived.set()
        return web.json_response({"status": "accepted", "region": partial.region})

    async def _accept_partial(self, request: web.Request, region: str) -> tuple[Partial, bytes]:
        if request.headers.get(H_JOB) != self.name:
            raise UpdateRejected(Reason.metadata_mismatch.value, "partial for another job")
        if region not in self.regions:
            raise UpdateRejected(Reason.unknown_tenant.value, f"unknown region {region!r}", 403)
        number = parse_int(request.headers.get(H_ROUND), "round")
        open_round = self.round_no + 1
        if number < open_round:
            raise UpdateRejected(Reason.late.value, f"round {number} is closed", 410)
        if number > open_round:
            raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
        if region in self.partials:
            raise UpdateRejected(
                Reason.duplicate.value, f"{region} already sent round {number}", 409
            )
        body = await request.read()
        partial = self._decode_partial(body, number, region)
        # Durable before acknowledged: a restarted aggregator reloads it.
        await asyncio.get_running_loop().run_in_executor(
            None, checkpoint.save_partial, self.config.checkpoint_dir, number, region, body
        )
        self.partials[region] = partial
        try:
            # A combiner restarted after this point finds its region done here.
            await self.store.record_partial(number, region, partial.count)
        except RedisError as exc:  # it would send again, and hear "duplicate"
            log.warning("partial not recorded in Redis: %s", exc, extra=fields(job=self.name))
        return partial, body

    def _decode_partial(self, body: bytes, number: int, region: str) -> Partial:
        try:
            tensors, metadata = codec.decode(body)
        except CodecError as exc:
            raise UpdateRejected(Reason.malformed.value, str(exc)) from None
        check_metadata(
            metadata, {M_JOB: self.name, M_ROUND: str(number), M_REGION: region, M_KIND: "partial"}
        )
        try:
            weight = float(metadata["fedkube.weight"])
            count = int(metadata["fedkube.count"])
            steps = float(metadata.get(M_WEIGHTED_STEPS, weight))
        except (KeyError, ValueError):
            raise UpdateRejected(Reason.bad_weight.value, "partial lacks weight/count") from None
        if not (weight >= 0 and count >= 0) or (count > 0) != (weight > 0):
            raise UpdateRejected(Reason.bad_weight.value, f"weight {weight} with count {count}")
        # Every τ_i ≥ 1, so Σ w_i·τ_i ≥ Σ w_i (up to rounding in the two sums).
        if not steps >= (weight * (1 - 1e-9) if count else 0) or steps == float("inf"):
            raise UpdateRejected(
                Reason.bad_steps.value, f"weighted steps {steps} below weight {weight}"
            )
        if count:
            check_structure(tensors, self.template)
            check_finite(tensors)
        return Partial(region=region, sums=dict(tensors), weight=weight, count=count, steps=steps)


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
    lease = aggregator._tasks[0]  # noqa: SLF001 - the lease task ends only by LeaseLost
    done, _ = await asyncio.wait({runner, stopper, lease}, return_when=asyncio.FIRST_COMPLETED)
    status = "stopped"
    if runner in done:
        status = runner.result()
    else:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if lease in done and lease.exception() is not None:
            status = "lease-lost"
    stopper.cancel()
    await aggregator.stop()
    return status
