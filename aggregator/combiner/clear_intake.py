"""The clear mode: each update is read, checked and folded into the region's accumulator.

The path of one update once its request and signature passed: decode and
match its metadata (:mod:`.admission`), inspect its tensors against the
model in a thread, clip it to ``strategy.robust.normBound``, record the
report in Redis, then fold it under the region's lock. The report is written
before the fold so that a restarted combiner knows whose update died with the
sum (:mod:`.region`); ``folded`` decides whether an update is in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from fedkube.aggregator.combiner.accumulators import RegionSum, new_accumulator
from fedkube.aggregator.combiner.admission import Admission, Sender
from fedkube.aggregator.combiner.model_cache import ModelCache
from fedkube.aggregator.combiner.region import RegionRound, RegionState, check_open, task_fields
from fedkube.aggregator.strategies import REGISTRY
from fedkube.errors import UpdateRejected
from fedkube.service import faults
from fedkube.service.logs import fields
from fedkube.spec import FederatedJob
from fedkube.training import norms, privacy
from fedkube.wire.protocol import M_STEPS, Reason, RoundState, parse_steps

log = logging.getLogger("fedkube.combiner")

TIER = "combiner"


class ClearIntake:
    """Updates folded as they come; the partial is the accumulator's sum."""

    closes_on_failures = True

    def __init__(
        self, job: FederatedJob, state: RegionState, admission: Admission, models: ModelCache
    ):
        self.job = job
        self.state = state
        self.admission = admission
        self.models = models
        self.strategy = job.spec.strategy
        self.dp = job.spec.privacy.dp
        self.fold_scale = REGISTRY[self.strategy.name].fold_scale
        self.needs_local_steps = REGISTRY[self.strategy.name].needs_local_steps

    def tasks_for(
        self, current: RegionRound, clients: set[str], after: int
    ) -> list[dict[str, Any]]:
        task = task_fields(current)
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
        return tasks

    def check_open(self, current: RegionRound | None, sender: Sender) -> None:
        check_open(current, sender.round, sender.client)

    async def on_sync(self, current: RegionRound) -> None:
        # The global tier asked for the flush (the deadline passed): go, unless a
        # restarted combiner still gives its owed clients time to resend.
        if (
            current.selected
            and not current.flushed
            and current.info.state == RoundState.aggregating
            and not current.waits_for_resends(time.monotonic())
        ):
            self.state.schedule_flush(current)

    async def accept(
        self, sender: Sender, current: RegionRound, body: memoryview
    ) -> dict[str, object]:
        """Decode, check and fold one update whose request checks have passed."""
        state, metrics = self.state, self.state.metrics
        name, here, tenant, client, number = (
            state.name,
            state.region,
            sender.tenant,
            sender.client,
            sender.round,
        )
        tensors, metadata = self.admission.decode(body, "update", sender)
        steps = parse_steps(metadata.get(M_STEPS), required=self.needs_local_steps)
        template = await self.models.template_for(current.info.version)
        loop = asyncio.get_running_loop()
        # In a worker thread (numpy releases the GIL): the loop keeps reading
        # the next updates meanwhile.
        update, norm = await loop.run_in_executor(
            None, self.admission.inspect, template, tensors, metadata
        )
        clip = 1.0
        if self.strategy.robust.norm_bound is not None:
            # Applied as a factor inside the fold (or the buffer's copy): no clipped copy.
            clip = norms.clip_scale(norm, self.strategy.robust.norm_bound)
            if clip < 1.0:
                metrics.updates_clipped.labels(name, here, tenant).inc()
        started = time.perf_counter()
        async with state.lock:
            # Re-check under the lock: a flush or a new round may have happened.
            check_open(state.current, number, client)
            faults.reached(f"combiner.{here}.update{len(current.folded) + 1}", number)
            if current.accumulator is None:
                current.accumulator = new_accumulator(
                    self.strategy, template, len(current.selected)
                )
            current.accumulator.check_room()
            # Recorded before folded. The record may exist already: written by
            # an earlier incarnation whose sum died (a resend), or by a try
            # whose fold failed. `folded` (checked above) is what decides.
            try:
                await state.store.record_report(number, client, sender.weight)
            except RedisError as exc:
                raise UpdateRejected(
                    Reason.unavailable.value, f"round state unavailable: {exc}", 503
                ) from None
            counted = privacy.counted_weight(self.dp, sender.weight)
            scale = self.fold_scale(counted, steps) * clip
            await loop.run_in_executor(None, current.accumulator.add, update, counted, scale, steps)
            current.folded.add(client)
            recovered = client in current.owed
            current.owed.discard(client)
            complete = current.heard_from_all()
        if recovered:
            metrics.updates_recovered.labels(name, here, tenant).inc()
        metrics.aggregation_seconds.labels(name, TIER, here).observe(time.perf_counter() - started)
        metrics.updates_accepted.labels(name, TIER, here, tenant).inc()
        metrics.bytes_up.labels(name, TIER, here, tenant).inc(len(body))
        metrics.clients_reported.labels(name, here).set(len(current.folded))
        await state.count(number, bytes_up=len(body))
        log.info(
            "update folded",
            extra=fields(job=name, round=number, region=here, tenant=tenant, client=client),
        )
        if complete:
            state.schedule_flush(current)
        return {"status": "accepted", "round": number}

    async def reduce(self, current: RegionRound) -> RegionSum | None:
        accumulator, current.accumulator = current.accumulator, None
        if accumulator is None:  # nobody's update came in
            return RegionSum()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        # The region's copies go as soon as they are reduced.
        result = await loop.run_in_executor(None, accumulator.reduce)
        if accumulator.timed_reduce:
            self.state.metrics.aggregation_seconds.labels(
                self.state.name, TIER, self.state.region
            ).observe(time.perf_counter() - started)
        return result
