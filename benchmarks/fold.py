"""FedAvg fold rate beside this machine's memcpy and numpy in-place add bandwidth.

What the combiner does per accepted update is ``WeightedSum.fold(delta, w)``:
``sum += w * delta`` over every tensor, one cache-sized chunk at a time (the
product rounded, then added: a fused multiply-add, BLAS ``saxpy``, rounds once,
which makes a two-update sum depend on arrival order and breaks the
bit-identical model after a restart that the chaos tests check). The floor for
that loop is numpy's own ``a += b`` (read a, read b, write a), so the fold is
reported both as "update bytes folded per second" and as effective memory
traffic (3 x update bytes), which is directly comparable to ``a += b``. The
target (fold >= 90 % of ``a += b``) compares the fold with the unweighted
``np.add`` loop over the same cycled updates, the same access pattern; (b)
re-adds one pair that stays in cache and is shown for context.

Everything is measured in the same run, on the same machine, with
``time.perf_counter``. Each measurement is repeated ``--repeats`` times; the
table shows the best (the least disturbed by other load on the machine) and the
median; the ratio against the target uses best vs best, and the median ratio is
printed as well.

Run:  .venv/bin/python benchmarks/fold.py   (``make bench``)

Compressed updates (``spec.compression.up``) fold from their wire form: int8
is dequantised chunk by chunk into the sum (one scale per tensor, and with
4096-value blocks), top-k 1 % is one scatter-add. Their rates are given on the
dense equivalent (parameters x 4 bytes per second), so that they compare with
the dense fold and with ``a += b``; the target is int8 >= 50 % of the in-place
add's bandwidth.

``--quick`` runs every measurement on a 1,000,000-parameter model with 10
updates and 2 repeats: seconds, not a measurement. The smoke test in
tests/integration/test_benchmarks.py runs it so that a change to the fold
breaks ``make test``, not only ``make bench``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.aggregator.strategies.sums import FOLD_CHUNK, WeightedSum
from fedkube.spec import WireCompression
from fedkube.wire import codec, compression
from fedkube.wire.protocol import Envelope

MB = 1e6
GB = 1e9
FULL_WIDTH = 2000  # 10,000,000 parameters (40 MB)
QUICK_WIDTH = 500  # 1,000,000 parameters (4 MB), --quick

Shapes = dict[str, tuple[int, ...]]


def model_shapes(width: int) -> Shapes:
    """Several "layers" of ``2·width² + 1000·width`` float32 parameters in all."""
    return {
        "layer0.weight": (width, width),
        "layer0.bias": (width,),
        "layer1.weight": (width, width),
        "layer1.bias": (width,),
        "layer2.weight": (998, width),
    }


def param_count(shapes: Shapes) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


assert param_count(model_shapes(FULL_WIDTH)) == 10_000_000
assert param_count(model_shapes(QUICK_WIDTH)) == 1_000_000


def make_update(seed: int, shapes: Shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def timed(fn: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def l3_size() -> str:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return "unknown"


def naive_fold(acc: dict[str, np.ndarray], delta: Mapping[str, np.ndarray], w: float) -> None:
    for name, total in acc.items():
        total += np.float32(w) * delta[name]  # allocates a layer-sized temporary


def plain_add(acc: dict[str, np.ndarray], delta: Mapping[str, np.ndarray], _w: float) -> None:
    for name, total in acc.items():
        np.add(total, delta[name], out=total)  # unweighted: the a += b floor over the model dict


def memory_child(mode: str, n_updates: int, n_distinct: int, width: int) -> dict[str, int]:
    """Run the memory measurement in a fresh interpreter; returns its JSON answer."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            mode,
            "--updates",
            str(n_updates),
            "--distinct",
            str(n_distinct),
            "--width",
            str(width),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_main(mode: str, n_updates: int, n_distinct: int, width: int) -> None:
    """Child: peak memory of one fold of ``n_updates`` updates, beyond the updates."""
    blobs = []
    for i in range(n_distinct):
        update = make_update(100 + i, model_shapes(width))
        meta = Envelope("bench", 1, f"c{i}", "t", 10.0).metadata("update")
        blobs.append(codec.encode(update, meta))
        del update
    views = [codec.decode(b)[0] for b in blobs]
    weights = [float(10 + (i % 7)) for i in range(n_updates)]
    gc.collect()
    hwm_ok = peak_rss_reset()
    rss_before = rss_kib("VmRSS")
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    acc = WeightedSum.zeros_like(views[0])
    for i in range(n_updates):
        if mode == "fold":
            acc.fold(views[i % n_distinct], weights[i])
        else:
            naive_fold(acc.sums, views[i % n_distinct], weights[i])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    growth = (rss_kib("VmHWM") - rss_before) * 1024 if hwm_ok else -1
    print(json.dumps({"traced_peak": peak - base, "rss_growth": growth}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, help="updates per fold (default 100, quick 10)")
    parser.add_argument(
        "--distinct",
        type=int,
        help="distinct update dicts generated and cycled through (default 4, quick 2)",
    )
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 5, quick 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every measurement, smaller (1,000,000-parameter model): a smoke test",
    )
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=["fold", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_updates = args.updates or (10 if args.quick else 100)
    n_distinct = args.distinct or (2 if args.quick else 4)
    repeats = args.repeats or (2 if args.quick else 5)
    width = args.width or (QUICK_WIDTH if args.quick else FULL_WIDTH)
    if args.memory_child:
        memory_main(args.memory_child, n_updates, n_distinct, width)
        return

    shapes = model_shapes(width)
    params = param_count(shapes)
    model_bytes = params * 4
    size = f"{model_bytes / MB:.0f} MB float32"
    weights = [float(10 + (i % 7)) for i in range(n_updates)]

    # -- data: a model-sized pair for memcpy/add; updates as owned arrays and as
    #    zero-copy read-only views of safetensors bytes (what the combiner folds)
    src = np.random.default_rng(0).standard_normal(params, dtype=np.float32)
    dst = np.empty_like(src)
    other = np.random.default_rng(1).standard_normal(params, dtype=np.float32)
    np.copyto(dst, src)  # fault the pages in before timing
    inner = 10  # memcpy / add operations per timed sample

    updates = [make_update(100 + i, shapes) for i in range(n_distinct)]
    blobs = [
        codec.encode(u, Envelope("bench", 1, f"client-{i}", "tenant", 10.0).metadata("update"))
        for i, u in enumerate(updates)
    ]
    views = [codec.decode(b)[0] for b in blobs]
    assert all(not a.flags.writeable for v in views for a in v.values())
    assert all(not a.flags.owndata for v in views for a in v.values())

    def memcpy() -> None:
        for _ in range(inner):
            np.copyto(dst, src)

    def inplace_add() -> None:
        for _ in range(inner):
            dst.__iadd__(other)  # a += b

    def compressed(scheme: WireCompression) -> list[dict[str, compression.Part]]:
        """The updates as the combiner receives them in ``scheme``: parsed wire views."""
        parsed = []
        for i, update in enumerate(updates):
            wire, meta, _ = compression.encode(update, scheme, np.random.default_rng(i))
            blob = codec.encode(wire, meta)
            tensors, metadata = codec.decode(blob)
            parsed.append(compression.parse(tensors, metadata, shapes, scheme))
        return parsed

    schemes = {
        "int8": WireCompression(scheme="int8"),
        "int8-block": WireCompression(scheme="int8", block_size=4096),
        "topk": WireCompression(scheme="topk", fraction=0.01),
    }
    compressed_updates = {name: compressed(scheme) for name, scheme in schemes.items()}

    def run_fold(source: list[Any], fold: Callable[..., None] | None = None):
        # The accumulator is allocated and its pages touched outside the timed region.
        acc = WeightedSum.zeros(
            {name: (shape, np.dtype(np.float32)) for name, shape in shapes.items()}
        )

        def go() -> None:
            for i in range(n_updates):
                if fold is None:
                    acc.fold(source[i % len(source)], weights[i])
                else:
                    fold(acc.sums, source[i % len(source)], weights[i])

        return go

    cases = {
        "memcpy": memcpy,
        "add": inplace_add,
        "fold": run_fold(updates),
        "view": run_fold(views),
        "naive": run_fold(updates, naive_fold),
        "plain": run_fold(updates, plain_add),
        **{name: run_fold(parts) for name, parts in compressed_updates.items()},
    }
    for fn in cases.values():  # warm-up: page faults, allocator caches
        fn()
    # Interleaved repeats: each round runs every case once, so a burst of load
    # from other tenants of this shared machine hits all cases alike.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name] += timed(fn, 1)
    memcpy_bw = [2 * model_bytes * inner / t for t in samples["memcpy"]]
    add_bw = [3 * model_bytes * inner / t for t in samples["add"]]
    fold_t, view_t = samples["fold"], samples["view"]
    naive_t, plain_t = samples["naive"], samples["plain"]

    # Correctness spot check: the fold equals the reference weighted sum.
    checked = min(n_updates, 8)
    acc = WeightedSum.zeros_like(updates[0])
    ref = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
    for i in range(checked):
        acc.fold(views[i % n_distinct], weights[i])
        for name in ref:
            ref[name] += weights[i] * updates[i % n_distinct][name]
    max_err = max(float(np.max(np.abs(acc.sums[n] - ref[n]))) for n in ref)
    del acc, ref

    # -- (d) extra memory during one fold of all the updates -------------------
    mem_fold = memory_child("fold", n_updates, n_distinct, width)
    mem_naive = memory_child("naive", n_updates, n_distinct, width)

    # -- report ----------------------------------------------------------------
    def bw_cells(values: list[float]) -> str:
        return f"{max(values) / GB:8.2f} {statistics.median(values) / GB:8.2f}"

    folded = model_bytes * n_updates
    fold_rate = [folded / t for t in fold_t]
    view_rate = [folded / t for t in view_t]
    naive_rate = [folded / t for t in naive_t]
    plain_rate = [folded / t for t in plain_t]

    print(
        f"FedAvg fold benchmark: {n_updates} updates of a {params:,}-parameter float32 model "
        f"({model_bytes / MB:.0f} MB per update, {folded / GB:.2f} GB folded per run)"
    )
    print(
        f"updates: {n_distinct} distinct update dicts generated and cycled "
        f"(working set {n_distinct * model_bytes / MB:.0f} MB + accumulator, L3 {l3_size()}, so "
        f"every fold streams from memory); WeightedSum chunk = {FOLD_CHUNK} elements"
    )
    print(
        f"timing: time.perf_counter, {repeats} repeats each, interleaved across cases; "
        f"'best' = fastest repeat, 'median' = median repeat; memcpy/add: {inner} ops per "
        f"repeat; folds: {n_updates} updates per repeat into a pre-touched accumulator"
    )
    print()
    header = (
        f"{'measurement':<52} {'best GB/s':>9} {'med GB/s':>8} {'traffic best':>13} "
        f"{'traffic med':>12}  note"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{'(a) memcpy np.copyto, ' + size:<52} {'':>18} {bw_cells(memcpy_bw)}   "
        f"  traffic = 2 x size (read+write)"
    )
    print(
        f"{'(b) numpy in-place add a += b, ' + size:<52} {'':>18} {bw_cells(add_bw)}   "
        f"  traffic = 3 x size (read a, read b, write a)"
    )

    def fold_row(label: str, rates: list[float], note: str) -> None:
        traffic = [3 * r for r in rates]
        print(
            f"{label:<52} {max(rates) / GB:9.2f} {statistics.median(rates) / GB:8.2f} "
            f"{max(traffic) / GB:13.2f} {statistics.median(traffic) / GB:12.2f}  {note}"
        )

    fold_row(
        "(c) WeightedSum.fold, owned float32 arrays",
        fold_rate,
        "GB/s = update bytes folded per second; traffic = 3 x that",
    )
    fold_row(
        "(c) WeightedSum.fold, safetensors zero-copy views",
        view_rate,
        "what the combiner folds (codec.decode read-only views)",
    )
    fold_row("    context: naive acc += w * delta", naive_rate, "allocates a temporary per layer")
    fold_row(
        "    context: unweighted np.add(acc, d, out=acc)",
        plain_rate,
        "same dict loop, no weight: the a += b floor",
    )
    print()

    best_add = max(add_bw)
    med_add = statistics.median(add_bw)
    for label, rates in (("owned arrays", fold_rate), ("safetensors views", view_rate)):
        ratio_best = 3 * max(rates) / best_add
        ratio_med = 3 * statistics.median(rates) / med_add
        print(
            f"fold/in-place-add traffic ratio ({label}): best {ratio_best:6.1%}, "
            f"median {ratio_med:6.1%} of (b), whose 8 MB pair stays in cache"
        )
    # The target compares like with like: a += b over the same cycled updates.
    for label, rates in (("owned arrays", fold_rate), ("safetensors views", view_rate)):
        ratio_best = max(rates) / max(plain_rate)
        ratio_med = statistics.median(rates) / statistics.median(plain_rate)
        verdict = "MET" if ratio_best >= 0.90 else "NOT MET"
        print(
            f"fold/unweighted-add ratio ({label}): best {ratio_best:6.1%}, "
            f"median {ratio_med:6.1%}   target fold >= 90 % of a += b over the same updates: "
            f"{verdict} (best vs best)"
        )
    print()
    for name, label in (
        ("int8", "int8, one scale per tensor"),
        ("int8-block", "int8, 4096-value blocks"),
        ("topk", "top-k 1 %, scatter-add"),
    ):
        rates = [folded / t for t in samples[name]]
        ratio_best = 3 * max(rates) / best_add
        ratio_med = 3 * statistics.median(rates) / med_add
        line = (
            f"(e) fold of {label:<28} {max(rates) / GB:7.2f} GB/s dense-equivalent best, "
            f"{statistics.median(rates) / GB:7.2f} median = {ratio_best:6.1%} of in-place add "
            f"bandwidth (median {ratio_med:6.1%})"
        )
        if name == "int8":
            line += f"   target >= 50 %: {'MET' if ratio_best >= 0.5 else 'NOT MET'}"
        print(line)
    naive_ratio = 3 * max(naive_rate) / best_add
    print(
        f"naive acc += w * delta for context: {naive_ratio:6.1%} of in-place add bandwidth "
        f"(its real traffic is higher: it also writes and re-reads the temporary); "
        f"WeightedSum.fold is {max(view_rate) / max(naive_rate):.2f}x the naive rate"
    )
    print(
        f"for context, same access pattern: WeightedSum.fold (views) reaches "
        f"{max(view_rate) / max(plain_rate):6.1%} of the unweighted dict np.add over the same "
        f"cycled updates (best vs best); (b) re-adds one {model_bytes / MB:.0f} MB pair "
        f"({2 * model_bytes / MB:.0f} MB working set, L3 here {l3_size()})"
    )
    print()

    def mem_line(label: str, mem: dict[str, int], target: bool) -> None:
        traced = mem["traced_peak"] / model_bytes
        rss = mem["rss_growth"]
        rss_txt = (
            f"peak RSS growth {rss / MB:6.1f} MB = {rss / model_bytes:4.2f}"
            if rss >= 0
            else "peak RSS growth n/a (no /proc/self/clear_refs)"
        )
        line = (
            f"{label:<34} tracemalloc peak {mem['traced_peak'] / MB:6.1f} MB = {traced:4.2f}"
            f" | {rss_txt}"
        )
        if target:
            worst = max(traced, rss / model_bytes)
            line += f"   target <= 2: {'MET' if worst <= 2 else 'NOT MET'}"
        print(line)

    print(
        f"extra model-sized buffers during one {n_updates}-update fold, beyond the updates "
        f"themselves (the accumulator is included and counts as one):"
    )
    print(
        f"  measured in a fresh child process (MALLOC_MMAP_THRESHOLD_=65536 so freed blocks "
        f"leave RSS); updates are safetensors views of {n_distinct} cycled payloads"
    )
    mem_line("WeightedSum.fold", mem_fold, True)
    mem_line("naive acc += w * delta (context)", mem_naive, False)
    print(
        f"\ncorrectness spot check (first {checked} folds vs float64 reference): max abs error "
        f"{max_err:.2e}"
    )


if __name__ == "__main__":
    main()
