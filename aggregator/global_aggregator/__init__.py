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

One seam per module:

* :mod:`.service`: :class:`GlobalAggregator` (state, wiring, start/stop, the
  lease) and :func:`run_global`;
* :mod:`.decision`: when a round opens, waits, closes or fails (pure);
* :mod:`.rounds`: the round loop, the I/O around those decisions;
* :mod:`.close`: the close's maths and record (noise, evaluation, history);
* :mod:`.persistence`: checkpoints, restore, a Redis outage, the model served;
* :mod:`.routes`: the HTTP handlers;
* :mod:`.wire`: the model's and the partials' bytes.
"""

from fedkube.aggregator.global_aggregator.service import (
    GlobalAggregator,
    GlobalConfig,
    run_global,
)

__all__ = ["GlobalAggregator", "GlobalConfig", "run_global"]
