"""The round loop: open a round, collect its partials, close it; the I/O around the decisions.

For each round it selects participants (seeded), waits for a quorum of
them to register, opens the round in Redis, polls it until the partials are
in (or a deadline passes) and closes it. What to do at each poll is decided
by :mod:`.decision` from what was read; the maths of the close is in
:mod:`.close`. Redis errors propagate to :meth:`GlobalAggregator.run`, which
rides the outage out (:mod:`.persistence`) and calls :func:`drive` again.

A little over 400 lines on purpose: the close's I/O (its writes in order,
the checkpoint before Redis, the fault points between them) stays beside the
loop that calls it, so that the order of the writes reads in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from fedkube.aggregator.global_aggregator import close, decision
from fedkube.aggregator.global_aggregator.common import POLL_INTERVAL_S, TIER, log
from fedkube.aggregator.global_aggregator.decision import (
    Close,
    Closing,
    Extend,
    Fail,
    Flush,
    Hold,
    Missed,
    Open,
    RoundView,
)
from fedkube.aggregator.global_aggregator.persistence import publish_model
from fedkube.aggregator.site_evaluation import evaluate_at_sites
from fedkube.aggregator.strategies.sums import Partial, aggregate_partials
from fedkube.errors import QuorumNotReached
from fedkube.service import faults
from fedkube.service.logs import fields
from fedkube.spec import quorum
from fedkube.state import checkpoint
from fedkube.state.roundstate import RoundInfo, select_clients
from fedkube.training import evaluation, headline, privacy
from fedkube.wire.protocol import RoundState

if TYPE_CHECKING:
    from fedkube.aggregator.global_aggregator.service import GlobalAggregator


async def drive(agg: GlobalAggregator) -> str:
    """Rounds from where they stand to the end; the job's final status."""
    ttl = agg.spec.state.key_ttl_seconds
    try:
        while agg.round_no < agg.spec.rounds:
            if agg.continuing is None and (stop := privacy_budget_spent(agg)):
                return await end_for_budget(agg, stop)
            info = agg.continuing or await open_round(agg, agg.round_no + 1)
            agg.continuing = None
            partials = await collect(agg, info)
            await close_round(agg, info, partials)
    except QuorumNotReached as exc:
        log.error("%s", exc, extra=fields(job=agg.name, round=agg.round_no + 1))
        await agg.store.finish_job("failed", str(exc), ttl)
        return "failed"
    message = f"{agg.spec.rounds} rounds completed"
    await agg.store.finish_job("succeeded", message, ttl)
    log.info("job succeeded", extra=fields(job=agg.name))
    return "succeeded"


def privacy_budget_spent(agg: GlobalAggregator) -> str | None:
    """Why the next round may not run (its ε would pass the budget), or None."""
    dp, accountant = agg.dp, agg.accountant
    if dp is None or dp.budget is None or accountant is None:
        return None
    after = accountant.epsilon_after(privacy.sampling_rate(agg.spec, len(agg.clients)))
    return decision.over_budget(dp, agg.round_no, after, accountant.epsilon)


async def end_for_budget(agg: GlobalAggregator, message: str) -> str:
    assert agg.dp is not None
    status = "succeeded" if agg.dp.on_budget_exhausted == "stop" else "failed"
    log.warning("%s", message, extra=fields(job=agg.name, round=agg.round_no))
    await agg.store.finish_job(status, message, agg.spec.state.key_ttl_seconds)
    return status


# -- opening -------------------------------------------------------------------------
async def open_round(agg: GlobalAggregator, number: int) -> RoundInfo:
    policy = agg.spec.participation
    ids = [c.id for c in agg.clients]
    selected = select_clients(ids, policy.fraction, agg.spec.seed, number)
    needed = quorum(policy, len(selected))
    await await_clients(agg, number, selected, needed)
    # Clients whose site refused the job stay counted in the quorum (they
    # are absent) but are not waited on: the round opens without them.
    refused = await agg.store.refused_tenants()
    # Likewise clients whose workers stopped polling (registration
    # expired): the round does not wait for them; they count as dropped.
    seen = await agg.store.registrations(selected)
    gone = decision.gone(selected, seen, time.time(), policy.registration_ttl_seconds)
    selected = decision.participants(selected, agg.tenant_of, refused, gone)
    if gone:
        log.warning(
            "opening without %d selected clients that stopped polling: %s",
            len(gone),
            ", ".join(sorted(gone)),
            extra=fields(job=agg.name, round=number),
        )
    agg.partials = {}
    agg.arrived.clear()
    info = await agg.store.open_round(
        number, selected, needed, policy.round_timeout_seconds, agg.version
    )
    agg.metrics.round_current.labels(agg.name, TIER, "").set(number)
    for region in agg.regions:
        here = sum(1 for c in selected if agg.region_of[c] == region)
        agg.metrics.clients_selected.labels(agg.name, region).set(here)
    log.info(
        "round opened: %d selected, quorum %d",
        len(selected),
        needed,
        extra=fields(job=agg.name, round=number),
    )
    return info


async def await_clients(
    agg: GlobalAggregator, number: int, selected: list[str], needed: int
) -> None:
    """Open a round only once a quorum of its selected clients has registered."""
    policy = agg.spec.participation
    limit = policy.start_timeout_seconds
    started = time.monotonic()
    logged = 0.0
    while True:
        agg.check_stopping()
        if await agg.store.is_paused():
            started = time.monotonic()  # a suspended job's workers are gone on purpose
            await asyncio.sleep(POLL_INTERVAL_S)
            continue
        refused = await agg.store.refused_tenants()
        can = decision.eligible(selected, agg.tenant_of, refused)
        ttl = policy.registration_ttl_seconds
        ready = len(await agg.store.registered_clients(ttl, sorted(can)))
        waited = time.monotonic() - started
        verdict = decision.before_opening(
            number=number,
            selected=selected,
            needed=needed,
            tenant_of=agg.tenant_of,
            refused=refused,
            ready=ready,
            waited=waited,
            limit=limit,
        )
        if isinstance(verdict, Open):
            return
        if isinstance(verdict, Fail):
            raise QuorumNotReached(verdict.reason)
        if waited - logged >= 10:
            logged = waited
            log.info(
                "waiting for clients: %d of %d registered, need %d",
                ready,
                len(selected),
                needed,
                extra=fields(job=agg.name, round=number),
            )
        await asyncio.sleep(POLL_INTERVAL_S)


# -- collecting ----------------------------------------------------------------------
async def collect(agg: GlobalAggregator, info: RoundInfo) -> list[Partial]:
    """Poll round ``info`` until :func:`decision.decide` closes it; its partials."""
    number = info.round
    selected = await agg.store.selected(number)
    expected = frozenset(agg.region_of[c] for c in selected)
    flush_deadline: float | None = None
    timeout = agg.spec.participation.round_timeout_seconds
    secure = agg.spec.privacy.secure_aggregation
    # After the flush request a secure region still runs three steps.
    flush_timeout = timeout + (3 * secure.phase_timeout_seconds if secure else 0)
    while True:
        agg.check_stopping()
        now = time.time()
        current = await agg.store.round_info(number)
        assert current is not None
        collecting = current.state == RoundState.collecting
        if current.state == RoundState.aggregating:
            flush_deadline = flush_deadline or now + flush_timeout
        failures = await agg.store.region_failures(number) if secure else {}
        paused = collecting and await agg.store.is_paused()
        # Counted once the deadline passed: only then does it decide anything.
        past = collecting and now >= current.deadline
        reported = await agg.store.reported_count(number) if past else 0
        # The partials last, after the reads: one may have arrived meanwhile.
        view = RoundView(
            round=number,
            state=current.state,
            quorum=current.quorum,
            deadline=current.deadline,
            now=now,
            selected=len(selected),
            expected=expected,
            partials={region: p.count for region, p in agg.partials.items()},
            paused=paused,
            reported=reported,
            region_failures=failures,
            flush_deadline=flush_deadline,
        )
        verdict = decision.decide(view)
        if isinstance(verdict, Close):
            if verdict.because is Closing.secure_failed:
                log.warning(
                    "closing without regions whose secure aggregation failed: %s",
                    verdict.causes,
                    extra=fields(job=agg.name, round=number),
                )
            elif verdict.because is Closing.flush_expired:
                log.warning(
                    "regions %s sent no partial; closing without them",
                    list(verdict.missing),
                    extra=fields(job=agg.name, round=number),
                )
            return list(agg.partials.values())
        if isinstance(verdict, Fail):
            await fail(agg, number, verdict)
        if isinstance(verdict, Hold):
            # Suspended: its workers were stopped on purpose. The round keeps
            # what it has and gets a whole deadline again once resumed.
            await agg.store.postpone(number, timeout)
            await asyncio.sleep(POLL_INTERVAL_S)
            continue
        if isinstance(verdict, Flush):
            await agg.store.transition(number, RoundState.collecting, RoundState.aggregating)
            await agg.store.publish({"type": "round_flush", "round": number})
            flush_deadline = now + flush_timeout
            log.info(
                "deadline: %d reported, asking combiners to flush",
                verdict.reported,
                extra=fields(job=agg.name, round=number),
            )
        elif isinstance(verdict, Missed):
            if verdict.flushed:
                await agg.store.transition(number, RoundState.aggregating, RoundState.collecting)
                running: set[str] = set()
            else:
                running = {
                    region
                    for region in verdict.regions
                    if await agg.store.lease_held(f"combiner-{region}")
                }
            causes = decision.missed_causes(verdict, running)
            await quorum_missed(agg, current, verdict.reported, len(selected), causes)
            if verdict.flushed:
                flush_deadline = None
        wait = max(0.01, min(POLL_INTERVAL_S, current.deadline - now))
        # asyncio.wait, not wait_for: wait_for can swallow a cancellation
        # that races with the event (Python 3.11).
        arrival = asyncio.ensure_future(agg.arrived.wait())
        await asyncio.wait({arrival}, timeout=wait)
        arrival.cancel()
        agg.arrived.clear()


async def fail(agg: GlobalAggregator, number: int, verdict: Fail) -> NoReturn:
    """Raise QuorumNotReached with ``verdict``'s reason (and the round's task failures)."""
    reason = verdict.reason
    if verdict.name_task_failures:
        failures = await agg.store.task_failures(number)
        reason += decision.failures_text(failures, agg.tenant_of)
    raise QuorumNotReached(reason)


async def quorum_missed(
    agg: GlobalAggregator, info: RoundInfo, reported: int, selected: int, causes: list[str]
) -> None:
    """Extend the deadline or fail the job; ``causes`` name regions that cannot report."""
    policy = agg.spec.participation
    failures = decision.failures_text(await agg.store.task_failures(info.round), agg.tenant_of)
    verdict = decision.on_quorum_missed(
        policy,
        round=info.round,
        quorum=info.quorum,
        extensions=info.extensions,
        reported=reported,
        selected=selected,
        causes=causes,
        failures=failures,
    )
    if isinstance(verdict, Extend):
        await agg.store.extend(info.round, policy.round_timeout_seconds)
        log.warning(
            "quorum missed (%d of %d, need %d): deadline extended (%d/%d)%s",
            reported,
            selected,
            info.quorum,
            info.extensions + 1,
            policy.max_extensions,
            verdict.causes,
            extra=fields(job=agg.name, round=info.round),
        )
        return
    raise QuorumNotReached(verdict.reason)


# -- closing -------------------------------------------------------------------------
async def close_round(agg: GlobalAggregator, info: RoundInfo, partials: list[Partial]) -> None:
    """Reduce, noise, step, evaluate, checkpoint, then close in Redis (in that order:
    the checkpoint is ahead of Redis, see :mod:`.persistence`)."""
    number = info.round
    spec = agg.spec
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    aggregate = await loop.run_in_executor(None, aggregate_partials, partials, len(agg.clients))
    selected = await agg.store.selected(number)
    privacy_record: dict[str, float] = {}
    if agg.dp is not None and agg.accountant is not None:
        aggregate, epsilon, privacy_record = await close.privatise(
            agg.dp, agg.accountant, len(selected) / len(agg.clients), aggregate
        )
        agg.metrics.dp_epsilon.labels(agg.name).set(epsilon)
    agg.weights, agg.server_state = await loop.run_in_executor(
        None,
        agg.strategy.module.server_step,
        agg.weights,
        aggregate,
        agg.server_state,
        spec.strategy,
    )
    faults.reached("global.after_reduce", number)
    summary = agg.show_state()
    agg.metrics.aggregation_seconds.labels(agg.name, TIER, "").observe(
        time.perf_counter() - started
    )
    evaluated: Mapping[str, float] = {}
    if close.central_due(spec, number) and spec.evaluation.central and agg.task.has("evaluate"):
        evaluated = await loop.run_in_executor(None, agg.central_evaluation, agg.weights, number)
    loss, accuracy = evaluated.get("loss"), evaluated.get("accuracy")
    if loss is not None:
        agg.metrics.model_loss.labels(agg.name).set(loss)
    if accuracy is not None:
        agg.metrics.model_accuracy.labels(agg.name).set(accuracy)
    for metric, score in evaluated.items():
        agg.metrics.eval_metric.labels(agg.name, "central", "", metric).set(score)
    counters = await agg.store.counters(number)
    by_region, missing = close.participation(agg.regions, selected, agg.region_of, agg.partials)
    for region, seen in by_region.items():
        chosen, got = seen["selected"], seen["reported"]
        if chosen:
            agg.metrics.participation.labels(agg.name, region).set(got / chosen)
            agg.metrics.clients_dropped.labels(agg.name, region).inc(chosen - got)
        agg.metrics.clients_reported.labels(agg.name, region).set(got)
    duration_s = time.time() - info.opened_at
    record = close.history_record(
        number=number,
        evaluated=evaluated,
        selected=len(selected),
        partials=partials,
        duration_s=duration_s,
        counters=counters,
        regions=by_region,
        missing=missing,
        extensions=(await agg.store.round_info(number) or info).extensions,
        task_failures=await agg.store.task_failures(number),
        strategy=spec.strategy.name,
        robust=spec.strategy.robust.rule,
        server_state=summary,
        privacy=privacy_record,
        secure=spec.privacy.secure_aggregation is not None,
    )
    checkpoint.save(
        agg.config.checkpoint_dir,
        agg.name,
        number,
        agg.weights,
        record,
        state=agg.server_state,
    )
    faults.reached("global.after_checkpoint", number)
    agg.round_no = number
    agg.version = number + 1
    publish_model(agg)
    if evaluation.due(agg.job, number):
        record["sites"] = await evaluate_sites(agg, number)
    await agg.store.close_round(number, record, spec.state.key_ttl_seconds)
    checkpoint.drop_partials(agg.config.checkpoint_dir, number)
    agg.partials = {}
    agg.metrics.round_duration.labels(agg.name).observe(record["duration_s"])
    agg.metrics.rounds_completed.labels(agg.name).inc()
    settings = spec.evaluation
    log.info(
        "round closed: %d/%d reported, %s %s",
        record["reported"],
        len(selected),
        settings.metric,
        headline.show(headline.value(record, settings), settings),
        extra=fields(job=agg.name, round=number),
    )


async def evaluate_sites(agg: GlobalAggregator, number: int) -> dict[str, Any]:
    """The new model (``agg.version``) evaluated by the clients, summed per tenant.

    After the last round (cross-site) or with ``sites: all``: every client
    that polls and whose site did not refuse the job. Otherwise the
    round's reporters: they are alive, and the model is the one they
    train on next.
    """
    if evaluation.everyone(agg.job, number):
        refused = await agg.store.refused_tenants()
        ttl = agg.spec.participation.registration_ttl_seconds
        alive = await agg.store.registered_clients(ttl, [c.id for c in agg.clients])
        clients = sorted(c for c in alive if agg.tenant_of[c] not in refused)
    else:
        clients = sorted(await agg.store.reported(number))
    summary = await evaluate_at_sites(
        agg.store, agg.job, number, agg.version, clients, agg.stopping
    )
    agg.site_gauges.show(summary)
    return summary
