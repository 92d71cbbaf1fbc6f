"""What survives the global tier: checkpoints, a restart's restore, a Redis outage's resync.

The checkpoint volume is ahead of Redis, never behind: a round is
checkpointed (its record in the checkpoint's metadata) before it is closed in
Redis, and a partial is written to the volume before it is acknowledged. So
``--resume`` continues the same round with none of its partials lost, and
closes from its checkpoint a round that Redis never saw closed.

Redis going away (a restart, a failover) pauses the round loop instead of
ending it: :func:`ride_out_outage` waits for Redis with backoff, finishes in
Redis whatever had been done in memory, continues the open round and gives
it back the time the outage took. :func:`publish_model` keeps the encoded
model the combiners fetch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from fedkube.aggregator.global_aggregator.common import POLL_INTERVAL_S, TIER, log
from fedkube.aggregator.global_aggregator.wire import decode_partial, encode_model
from fedkube.service.backoff import Backoff
from fedkube.service.logs import fields
from fedkube.state import checkpoint
from fedkube.state.roundstate import SOCKET_TIMEOUT_S
from fedkube.wire.protocol import RoundState

if TYPE_CHECKING:
    from fedkube.aggregator.global_aggregator.service import GlobalAggregator

# The longest wait between two pings of an unreachable Redis.
REDIS_RETRY_MAX_S = 5.0


async def restore(agg: GlobalAggregator) -> None:
    """Fresh start, or continue from the checkpoint and Redis (``--resume``)."""
    directory = agg.config.checkpoint_dir
    spec = agg.spec
    if not agg.config.resume:
        checkpoint.clear(directory)
        await agg.store.delete_all(keep_live=True)
        await agg.store.start_job(spec.rounds)
        return
    saved = checkpoint.load_latest(directory, agg.name)
    interrupted = await agg.store.evaluation()
    if interrupted is not None and interrupted.open:
        # The round it belonged to closes without it (its checkpoint is the record).
        await agg.store.close_evaluation(interrupted.round, spec.state.key_ttl_seconds)
    closed_in_redis, _ = await agg.store.last_record()
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
            extra=fields(job=agg.name),
        )
    last_closed = 0
    if saved is not None:
        agg.weights, last_closed = saved.weights, saved.round
        if saved.state.keys() == agg.server_state.keys():
            agg.server_state = saved.state
        elif agg.server_state:
            log.error(
                "checkpoint of round %d has no %s state; it starts again from its initial value",
                saved.round,
                spec.strategy.name,
                extra=fields(job=agg.name),
            )
        agg.version = last_closed + 1
        await finish_close(agg, saved)
    agg.round_no = last_closed
    current = await agg.store.current_round()
    info = await agg.store.round_info(current) if current else None
    if (
        info is not None
        and current == last_closed + 1
        and info.state in (RoundState.collecting, RoundState.aggregating)
    ):
        agg.continuing = info
        for region, body in checkpoint.load_partials(directory, current).items():
            agg.partials[region] = decode_partial(body, agg.name, current, region, agg.template)
            await agg.store.record_partial(current, region, agg.partials[region].count)
    else:
        await agg.store.trim_history(last_closed)
    await agg.store.start_job(spec.rounds)
    if agg.accountant is not None:
        # The privacy spent is in the history: one sampling rate per closed round.
        agg.accountant.rates = [
            float(r["dp_rate"]) for r in await agg.store.history() if "dp_rate" in r
        ]
    log.info(
        "resuming after round %d (%d partials kept)",
        last_closed,
        len(agg.partials),
        extra=fields(job=agg.name),
    )


async def finish_close(agg: GlobalAggregator, saved: checkpoint.Checkpoint) -> None:
    """Close in Redis a round that was checkpointed but not yet closed there.

    A round's close writes the checkpoint first and closes the round in Redis
    second; a crash between the two would otherwise lose that round's
    history record. The checkpoint's metadata is that record.
    """
    info = await agg.store.round_info(saved.round)
    if info is not None and info.state != RoundState.closed:
        record = {key: value for key, value in saved.metadata.items() if key != "job"}
        await agg.store.close_round(saved.round, record, agg.spec.state.key_ttl_seconds)
        log.warning(
            "round %d was checkpointed but not closed in Redis; closed it now",
            saved.round,
            extra=fields(job=agg.name, round=saved.round),
        )


def publish_model(agg: GlobalAggregator) -> None:
    """Encode model ``v`` once (in ``compression.down``'s form) for every combiner.

    The previous version stays served a while: a combiner may still be fetching it.
    """
    agg.model_bytes = {v: b for v, b in agg.model_bytes.items() if v >= agg.version - 1}
    agg.model_bytes[agg.version] = encode_model(
        agg.name,
        agg.version,
        agg.strategy.downlink(agg.weights, agg.server_state),
        agg.spec.compression.down,
        agg.spec.seed,
    )


async def ride_out_outage(agg: GlobalAggregator, cause: RedisError) -> None:
    """Wait for Redis with backoff, then pick the rounds up where they stood."""
    started = time.time()
    if isinstance(cause, RedisTimeout):
        started -= SOCKET_TIMEOUT_S  # the call that timed out had been waiting that long
    agg.metrics.state_store_up.labels(agg.name, TIER, "").set(0)
    log.error(
        "round state (Redis) unreachable: %s; rounds pause until it is back",
        cause,
        extra=fields(job=agg.name, round=agg.round_no + 1),
    )
    backoff, logged = Backoff(POLL_INTERVAL_S, REDIS_RETRY_MAX_S), started
    while True:
        agg.check_stopping()
        await backoff.wait()
        try:
            await agg.store.redis.ping()
            break
        except RedisError as exc:
            if time.time() - logged >= 30:
                logged = time.time()
                log.error(
                    "round state (Redis) unreachable for %.0fs: %s",
                    logged - started,
                    exc,
                    extra=fields(job=agg.name, round=agg.round_no + 1),
                )
    outage = time.time() - started
    agg.metrics.state_store_up.labels(agg.name, TIER, "").set(1)
    log.warning(
        "round state (Redis) back after %.1fs; resuming",
        outage,
        extra=fields(job=agg.name, round=agg.round_no + 1),
    )
    await resync(agg, started, outage)


async def resync(agg: GlobalAggregator, outage_started: float, outage_s: float) -> None:
    """Make Redis agree with this process again after an outage.

    Memory is ahead of Redis, never behind: a round checkpointed but not
    yet closed there is closed from its checkpoint; an open round is
    continued (with the time the outage took added to its deadline, if
    the deadline had not passed before); otherwise the loop opens the
    next round.
    """
    last = agg.round_no
    info = await agg.store.round_info(last) if last else None
    if info is not None and info.state != RoundState.closed:
        saved = checkpoint.load_latest(agg.config.checkpoint_dir, agg.name)
        if saved is not None and saved.round == last:
            await finish_close(agg, saved)
            checkpoint.drop_partials(agg.config.checkpoint_dir, last)
            agg.partials = {}
    current = await agg.store.current_round()
    info = await agg.store.round_info(current) if current == last + 1 else None
    if info is not None and info.state in (RoundState.collecting, RoundState.aggregating):
        agg.continuing = info
        if info.deadline > outage_started:
            await agg.store.set_deadline(current, info.deadline + outage_s)
