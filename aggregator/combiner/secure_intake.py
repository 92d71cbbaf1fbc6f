"""The secure mode: the server side of :mod:`fedkube.wire.secagg` for one region.

The combiner routes its clients' keys and sealed shares, adds their masked
updates into a uint32 total it cannot read, and decodes the region's sum once
the survivors revealed the shares that remove the masks. Every message is
checked by :class:`fedkube.wire.secagg.ServerSession`; when each step is due is
:mod:`.secure_region`'s. The decoded sum goes up as the region's partial, as
in the clear; if too few clients are left the region sends none, and the
global tier learns why from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
from aiohttp import web
from redis.exceptions import RedisError

from fedkube.aggregator.combiner.accumulators import RegionSum
from fedkube.aggregator.combiner.admission import Admission, Sender
from fedkube.aggregator.combiner.model_cache import ModelCache
from fedkube.aggregator.combiner.region import RegionRound, RegionState, task_fields
from fedkube.aggregator.combiner.secure_region import Claim, SecureRegion
from fedkube.aggregator.strategies import REGISTRY
from fedkube.aggregator.validation import Template, check_structure
from fedkube.errors import SecureAggregationFailed, UpdateRejected
from fedkube.service.bodies import json_body_sized
from fedkube.service.logs import fields
from fedkube.spec import FederatedJob, SecureAggregation
from fedkube.training import privacy
from fedkube.wire import masking, secagg
from fedkube.wire.protocol import H_CLIENT, Reason, RoundState, parse_steps

log = logging.getLogger("fedkube.combiner")

TIER = "combiner"
STEPS = ("keys", "shares", "unmask")


class SecureIntake:
    """Keys, shares, masked updates and unmasking; the partial is the decoded sum."""

    closes_on_failures = False  # the protocol's own deadlines decide

    def __init__(
        self,
        job: FederatedJob,
        secure: SecureAggregation,
        state: RegionState,
        admission: Admission,
        models: ModelCache,
    ):
        self.job = job
        self.secure = secure
        self.state = state
        self.admission = admission
        self.models = models
        self.dp = job.spec.privacy.dp
        self.fold_scale = REGISTRY[job.spec.strategy.name].fold_scale
        self.needs_local_steps = REGISTRY[job.spec.strategy.name].needs_local_steps

    # -- the round's tasks ---------------------------------------------------
    def tasks_for(
        self, current: RegionRound, clients: set[str], after: int
    ) -> list[dict[str, Any]]:
        secure = current.secure
        task = task_fields(current)
        tasks: list[dict[str, Any]] = []
        for client in sorted(current.selected & clients):
            step = secure.task(client) if secure is not None else None
            if step is not None:
                tasks.append({**task, **step, "client": client})
            elif (
                current.info.round > after
                and (secure is None or secure.step == "advertise")
                and (secure is None or client not in secure.session.members)
                and current.info.state == RoundState.collecting
            ):
                tasks.append({"status": "train", "client": client, **task})
        return tasks

    def check_open(self, current: RegionRound | None, sender: Sender) -> None:
        if current is None or sender.round != current.info.round:
            raise UpdateRejected(Reason.wrong_round.value, f"round {sender.round} is not open", 409)

    async def on_sync(self, current: RegionRound) -> None:
        async with self.state.lock:
            await self.tick(current)

    # -- the protocol's messages ---------------------------------------------
    async def message(self, request: web.Request, tenant: str, step: str) -> tuple[int, int]:
        """``POST /v1/secagg/{step}``: one client's message; its round and size once taken."""
        if step not in STEPS:
            raise UpdateRejected(
                Reason.malformed.value, f"no secure aggregation step {step!r} here", 404
            )
        client, number, document, size = await self._read(request)
        state = self.state
        async with state.lock:
            current = state.current
            if current is None or number != current.info.round:
                raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
            if current.flushed:
                raise UpdateRejected(Reason.late.value, f"round {number} no longer collects", 410)
            if step == "keys":
                await self._receive_keys(current, tenant, client, document)
            else:
                secure = current.secure
                if secure is None:
                    raise UpdateRejected(
                        Reason.late.value, f"{client}: round {number} has no keys yet", 409
                    )
                if step == "shares":
                    secure.session.receive_shares(client, document)
                else:
                    secure.session.receive_unmasking(client, document)
            await self.tick(current)
        return number, size

    async def _read(self, request: web.Request) -> tuple[str, int, dict[str, Any], int]:
        """The checked JSON of one protocol message: its client, round, body and size."""
        client = request.headers.get(H_CLIENT, "")
        document, size = await json_body_sized(request)
        if not isinstance(document, dict):
            raise UpdateRejected(Reason.malformed.value, "expected a JSON object")
        number = document.get("round")
        if isinstance(number, bool) or not isinstance(number, int):
            raise UpdateRejected(Reason.malformed.value, "round must be an integer")
        if document.get("client") != client or client not in self.admission.clients:
            raise UpdateRejected(
                Reason.metadata_mismatch.value,
                f"body client {document.get('client')!r} but request says {client!r}",
            )
        return client, number, document, size

    async def _receive_keys(
        self, current: RegionRound, tenant: str, client: str, document: dict[str, Any]
    ) -> None:
        """Step 1: a client that trained joins the round with its keys and weight."""
        if client not in current.selected:
            raise UpdateRejected(
                Reason.not_selected.value,
                f"{client} was not selected for round {current.info.round}",
                403,
            )
        weight = self.admission.capped_weight(str(document.get("weight")), client, tenant)
        raw_steps = document.get("steps")
        steps = parse_steps(
            None if raw_steps is None else str(raw_steps), required=self.needs_local_steps
        )
        if current.secure is None:
            template = await self.models.template_for(current.info.version)
            length = sum(int(np.prod(shape)) for shape, _dtype in template.values())
            session = secagg.ServerSession(self.job.name, current.info.round, self.secure, length)
            current.secure = SecureRegion(session, set(current.selected), self.secure)
        counted = privacy.counted_weight(self.dp, weight)
        current.secure.session.receive_keys(client, document, self.fold_scale(counted, steps))
        try:
            await self.state.store.record_report(current.info.round, client, weight)
        except RedisError as exc:
            del current.secure.session.members[client]
            raise UpdateRejected(
                Reason.unavailable.value, f"round state unavailable: {exc}", 503
            ) from None
        current.secure.claims[client] = Claim(weight, counted, steps)
        self.state.metrics.clients_reported.labels(self.job.name, self.state.region).set(
            len(current.secure.session.members)
        )

    async def accept(
        self, sender: Sender, current: RegionRound, body: memoryview
    ) -> dict[str, object]:
        """Step 3: add one masked update (uint32, the model's shapes) to the region's total."""
        state = self.state
        tensors, _metadata = self.admission.decode(body, "masked", sender)
        template = self.models.template
        assert template is not None  # fetched when the first keys came in
        check_structure(
            tensors,
            {name: (shape, np.dtype(np.uint32)) for name, (shape, _) in template.items()},
        )
        async with state.lock:
            secure = current.secure
            if secure is None or state.current is not current:
                raise UpdateRejected(
                    Reason.late.value, f"round {sender.round} no longer collects", 410
                )
            claim = secure.claims.get(sender.client)
            if claim is not None and sender.weight != claim.weight:
                raise UpdateRejected(
                    Reason.metadata_mismatch.value,
                    f"weight {sender.weight:g} differs from the {claim.weight:g} sent with the"
                    " keys",
                )
            secure.session.receive_masked(sender.client, masking.flatten(tensors))
            await self.tick(current)
        name, here = state.name, state.region
        state.metrics.updates_accepted.labels(name, TIER, here, sender.tenant).inc()
        state.metrics.bytes_up.labels(name, TIER, here, sender.tenant).inc(len(body))
        await state.count(sender.round, bytes_up=len(body))
        log.info(
            "masked update added",
            extra=fields(
                job=name,
                round=sender.round,
                region=here,
                tenant=sender.tenant,
                client=sender.client,
            ),
        )
        return {"status": "accepted", "round": sender.round}

    # -- moving the protocol on ----------------------------------------------
    async def tick(self, current: RegionRound) -> None:
        """Move the region's protocol on if its step is done or out of time (under the lock)."""
        if current.flushed:
            return
        flush = current.info.state == RoundState.aggregating
        secure = current.secure
        if secure is None:
            if flush and current.selected:  # nobody here sent keys by the deadline
                self.state.schedule_flush(current)
            return
        now = time.monotonic()
        before = secure.step
        try:
            while secure.due(now, flush):
                secure.advance(now)
        except SecureAggregationFailed as exc:
            await self._failed(current, str(exc))
            return
        if secure.step == "finish":
            self.state.schedule_flush(current)
        if secure.step != before:
            log.info(
                "secure aggregation: step %s (%d clients in)",
                secure.step,
                len(secure.session.members),
                extra=fields(
                    job=self.state.name, round=current.info.round, region=self.state.region
                ),
            )
            await self.state.changes.notify()

    async def _failed(self, current: RegionRound, message: str) -> None:
        """The region sends no partial this round: its reports go, the global tier learns why."""
        state = self.state
        current.flushed = True
        number = current.info.round
        state.metrics.secagg_failures.labels(state.name, state.region).inc()
        log.error(
            "secure aggregation failed: %s",
            message,
            extra=fields(job=state.name, round=number, region=state.region),
        )
        members = sorted(current.secure.session.members) if current.secure else []
        current.secure = None
        try:
            await state.store.forget_reports(number, members)
            await state.store.record_region_failure(number, state.region, message)
            await state.store.publish({"type": "region_failed", "round": number})
        except RedisError as exc:
            log.warning("region failure not recorded: %s", exc, extra=fields(job=state.name))
        await state.changes.notify()

    async def reduce(self, current: RegionRound) -> RegionSum | None:
        secure, current.secure = current.secure, None
        if secure is None:  # nobody here sent keys by the deadline
            return RegionSum()
        template = self.models.template
        assert template is not None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, _decoded, secure, template)
        except SecureAggregationFailed as exc:
            current.secure = secure
            await self._failed(current, str(exc))
            return None
        dropped = sorted(secure.session.members.keys() - secure.session.masked)
        if dropped:
            state = self.state
            state.metrics.secagg_dropouts.labels(state.name, state.region).inc(len(dropped))
            log.warning(
                "secure aggregation: %d clients dropped out (%s); the sum is the others'",
                len(dropped),
                ", ".join(dropped),
                extra=fields(job=state.name, round=current.info.round, region=state.region),
            )
            with contextlib.suppress(RedisError):
                await state.store.forget_reports(current.info.round, dropped)
        return result


def _decoded(secure: SecureRegion, template: Template) -> RegionSum:
    """The decoded region sum as tensors, its weight, count and weighted steps (in a thread)."""
    flat, survivors = secure.session.finish()
    shapes = {name: shape for name, (shape, _dtype) in template.items()}
    tensors = masking.unflatten(flat, shapes)
    weight = sum(secure.claims[c].counted for c in survivors)
    steps = sum(secure.claims[c].counted * secure.claims[c].steps for c in survivors)
    return RegionSum(tensors, weight, len(survivors), steps)
