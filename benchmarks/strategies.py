"""Aggregation cost of every strategy beside plain FedAvg's fold, in one run.

One round of a region: ``--updates`` client updates (100) of a
``--params``-parameter float32 model (1,000,000, in two tensors). Rows:

* ``fedavg fold``: ``WeightedSum.fold`` of every update into a running sum
  (what a combiner does per accepted update), the baseline of the ratio column.
* ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``: one ``server_step`` on
  the model (the global tier, once per round, on the mean delta).
* ``normBound clip+fold``: ``norms.clip`` (a scaled copy) then the fold,
  with the bound below every update's norm so every update is scaled (worst
  case); ``normBound scale in fold`` is the copy-free form, ``clip_scale`` of the
  norm passed to ``fold(scale=w·s)``.
* ``median``, ``trimmedMean`` (β = 0.1), ``krum``, ``multiKrum`` (f = n/10): the
  robust estimate over the region's buffered ``(n, d)`` float32 matrix.

Time: ``time.perf_counter`` over the timed part only (the accumulator or server
state is built before), ``--repeats`` times, cases interleaved so that load
from other tenants of the machine hits all alike; best and median shown, the
ratio is best vs the fold's best. Memory: a separate, untimed run of each case
under ``tracemalloc`` (numpy reports its buffers to it): the peak of what was
allocated beyond the inputs (updates, matrix, model, mean delta), the
accumulator, server state and result included; ``x model`` divides it by the
model's size. Krum's matrix products run on ``krum.BLAS_THREADS`` BLAS threads
(see krum.py); nothing else here uses BLAS.

Run:  .venv/bin/python benchmarks/strategies.py   (``--quick``: 10 updates of
10,000 parameters, a couple of seconds, every row exercised; not a measurement)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedkube.aggregator.strategies import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    krum,
    median,
    trimmed_mean,
)
from fedkube.aggregator.strategies.sums import RoundAggregate, Tensors, WeightedSum
from fedkube.spec import Robust, Strategy
from fedkube.training import norms
from fedkube.training.norms import l2_norm

MB = 1e6

Run = Callable[[], object]


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    setup: Callable[[], Run]  # builds what the round starts with; returns the timed part


def split(row: np.ndarray) -> Tensors:
    """One update as two named tensors: views into its row of the matrix."""
    cut = row.size * 9 // 10
    return {"layer0.weight": row[:cut], "layer1.weight": row[cut:]}


def build_cases(n: int, d: int, seed: int) -> tuple[list[Case], int]:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, d), dtype=np.float32)
    matrix.setflags(write=False)  # read-only, as the combiner's buffer is
    updates = [split(matrix[i]) for i in range(n)]
    counts = np.array([float(10 + i % 7) for i in range(n)], np.float64)
    model = split(rng.standard_normal(d, dtype=np.float32))
    mean = split(np.ascontiguousarray(matrix.mean(axis=0)))
    aggregate = RoundAggregate(
        delta=mean, weight=float(counts.sum()), count=n, mean_local_steps=1.0, population=n
    )
    bound = 0.5 * min(l2_norm(u) for u in updates)  # every update gets clipped
    robust = Robust(trim_fraction=0.1, byzantine=max(1, n // 10), norm_bound=bound)

    def fold() -> Run:
        acc = WeightedSum.zeros_like(updates[0])

        def run() -> object:
            for update, weight in zip(updates, counts, strict=True):
                acc.fold(update, float(weight))
            return acc

        return run

    def clip_fold() -> Run:
        acc = WeightedSum.zeros_like(updates[0])

        def run() -> object:
            for update, weight in zip(updates, counts, strict=True):
                clipped, _ = norms.clip(update, bound)
                acc.fold(clipped, float(weight))
            return acc

        return run

    def scale_in_fold() -> Run:
        acc = WeightedSum.zeros_like(updates[0])

        def run() -> object:
            for update, weight in zip(updates, counts, strict=True):
                scale = norms.clip_scale(l2_norm(update), bound)
                acc.fold(update, float(weight), scale=float(weight) * scale)
            return acc

        return run

    def server(module) -> Callable[[], Run]:
        params = Strategy(name=module.NAME)

        def setup() -> Run:
            state = module.init_state(model, params)
            return lambda: module.server_step(model, aggregate, state, params)

        return setup

    def robust_rule(estimate) -> Callable[[], Run]:
        return lambda: lambda: estimate(matrix, counts, robust)

    cases = [
        Case("fedavg fold", f"{n} x WeightedSum.fold", fold),
        Case("fedavgm", "1 server_step", server(fedavgm)),
        Case("fedadam", "1 server_step", server(fedadam)),
        Case("fedyogi", "1 server_step", server(fedyogi)),
        Case("fedadagrad", "1 server_step", server(fedadagrad)),
        Case("normBound clip+fold", f"{n} x clip, fold", clip_fold),
        Case("normBound scale in fold", f"{n} x clip_scale, fold(scale)", scale_in_fold),
        Case("median", "estimate (n, d)", robust_rule(median.estimate)),
        Case("trimmedMean", "estimate (n, d), beta 0.1", robust_rule(trimmed_mean.estimate)),
        Case("krum", f"estimate (n, d), f={robust.byzantine}", robust_rule(krum.estimate_krum)),
        Case(
            "multiKrum",
            f"estimate (n, d), f={robust.byzantine}, m=n-f",
            robust_rule(krum.estimate_multi_krum),
        ),
    ]
    return cases, d * 4


def timed(case: Case) -> float:
    run = case.setup()
    gc.collect()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def peak_extra(case: Case) -> int:
    """Peak bytes allocated by setup and run together, beyond what existed before."""
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    run = case.setup()
    result = run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result, run
    return peak - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="10 updates x 10,000 params, 1 repeat: a smoke run"
    )
    args = parser.parse_args()
    if args.quick:
        args.updates, args.params, args.repeats = 10, 10_000, 1

    n, d = args.updates, args.params
    cases, model_bytes = build_cases(n, d, args.seed)
    for case in cases:  # warm-up: page faults, allocator caches, BLAS start-up
        timed(case)
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:
            samples[case.name].append(timed(case))
    peaks = {case.name: peak_extra(case) for case in cases}

    print(
        f"strategy aggregation benchmark: {n} updates of a {d:,}-parameter float32 model "
        f"({model_bytes / MB:.2f} MB each, {n * model_bytes / MB:.1f} MB in all); "
        f"{args.repeats} repeats, {os.cpu_count()} CPUs, krum BLAS threads {krum.BLAS_THREADS}"
    )
    print()
    header = (
        f"| {'strategy':<24} | {'what is timed':<32} | {'best ms':>9} | {'median ms':>9} "
        f"| {'peak extra MB':>13} | {'x model':>7} | {'x fold time':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    fold_best = min(samples["fedavg fold"])
    for case in cases:
        times = samples[case.name]
        best, med = min(times), statistics.median(times)
        print(
            f"| {case.name:<24} | {case.what:<32} | {best * 1e3:9.1f} | {med * 1e3:9.1f} "
            f"| {peaks[case.name] / MB:13.1f} | {peaks[case.name] / model_bytes:7.2f} "
            f"| {best / fold_best:11.2f} |"
        )


if __name__ == "__main__":
    main()
