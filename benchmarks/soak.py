"""Soak: does the global aggregator's or a combiner's memory grow over many rounds?

Runs the bundled digits job (``examples/digits.yaml``: six tenants in two
regions, its model and data) for ``--rounds`` rounds (500) through the
machinery of ``fedkube run``: ``LocalRun`` with the process runtime, so a real
``redis-server``, the global aggregator, one combiner per region and one worker
per tenant, each in its own OS process, over loopback HTTP. Only what makes a
round short changes (``soak_manifest``): 1 local epoch in batches of 64 (3 to 6
steps per worker), a generous 120 s round deadline, and evaluation every
warm-up length (50 rounds) instead of every round.

Every ``--every`` closed rounds (10) it reads the resident set size (``VmRSS``
in ``/proc/<pid>/status``) of the global aggregator and of each combiner, whose
process ids the runner writes to ``<run dir>/pids/<name>``. It follows the run
by polling the job's history in Redis (``LocalRun.history``) every 50 ms and
labels a sample with the number of rounds closed when it was taken. A service
that exits mid-soak ends it with an error: a restart would hide growth.

Warm-up: the first 10 % of the rounds, at most 50. One-off allocations land in
it: imports, connection pools, the combiner's body buffers, and the held-out
split and torch's evaluation path, which the global tier loads at its first
evaluation (evaluation runs every warm-up length, so the first one is inside
it). After the warm-up a least-squares line of RSS against round is fitted per
component; its slope, in MB (10^6 bytes) per 100 rounds, is judged against the
goal: growth under 1 MB per 100 rounds. Rounds/s is measured from the close of
round 1 to the close of the last round (start-up excluded).

Run:  .venv/bin/python benchmarks/soak.py   (``make bench``; about a minute on
2 cores). ``--quick``: 30 rounds sampled every 3 after a 3-round warm-up, a
smoke test, not a measurement. tests/integration/test_soak.py runs 100 rounds
with these same functions and fails on clear growth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkube.local.launcher import ProcessLauncher
from fedkube.local.runner import LocalRun, RunOptions

ROOT = Path(__file__).resolve().parents[1]
DIGITS_JOB = ROOT / "examples" / "digits.yaml"

MB = 1e6
GOAL_MB_PER_100_ROUNDS = 1.0
MAX_WARM_UP_ROUNDS = 50
POLL_S = 0.05
ROUND_TIMEOUT_S = 120
# No round closed for this long: something is stuck (a round that loses a
# client still closes at its deadline, well within it).
STALL_S = 2 * ROUND_TIMEOUT_S + 60


def warm_up_rounds(rounds: int) -> int:
    """The first 10 % of the rounds, at most 50 (and at least 1)."""
    return max(1, min(rounds // 10, MAX_WARM_UP_ROUNDS))


def soak_manifest(rounds: int, evaluate_every: int) -> dict[str, Any]:
    """``examples/digits.yaml`` with short rounds: the same tenants, model and data."""
    document: dict[str, Any] = yaml.safe_load(DIGITS_JOB.read_text())
    spec = document["spec"]
    document["metadata"]["name"] = "digits-soak"
    spec["rounds"] = rounds
    spec["training"] = {**spec["training"], "epochs": 1, "batchSize": 64}
    spec["participation"] = {**spec["participation"], "roundTimeoutSeconds": ROUND_TIMEOUT_S}
    spec["evaluation"] = {"everyRounds": evaluate_every}
    return document


def write_manifest(directory: Path, rounds: int, evaluate_every: int) -> Path:
    path = directory / "digits-soak.yaml"
    path.write_text(yaml.safe_dump(soak_manifest(rounds, evaluate_every), sort_keys=False))
    return path


# -- measuring ------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process (``VmRSS``); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None  # a zombie has no memory left to report


def aggregator_pids(run_dir: Path) -> dict[str, int]:
    """The global aggregator's and each combiner's process id, from ``<run dir>/pids``."""
    folder = run_dir / "pids"
    names = ["global", *sorted(p.name for p in folder.glob("combiner-*"))]
    return {name: int((folder / name).read_text()) for name in names}


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through the points (xs, ys)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least 2 points for a slope, got {len(xs)}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("every point is at the same round")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


@dataclass
class Series:
    """One component's RSS samples: (closed rounds when sampled, bytes)."""

    component: str
    pid: int
    points: list[tuple[int, int]] = field(default_factory=list)

    def after(self, warm_up: int) -> list[tuple[int, int]]:
        return [(r, b) for r, b in self.points if r >= warm_up]

    def rss_at_warm_up_mb(self, warm_up: int) -> float:
        return self.after(warm_up)[0][1] / MB

    def rss_at_end_mb(self) -> float:
        return self.points[-1][1] / MB

    def slope_mb_per_100_rounds(self, warm_up: int) -> float:
        points = self.after(warm_up)
        rounds = [float(r) for r, _ in points]
        rss = [b / MB for _, b in points]
        return least_squares_slope(rounds, rss) * 100


@dataclass
class SoakResult:
    rounds: int
    every: int
    warm_up: int
    status: str
    message: str
    series: list[Series]
    history: list[dict[str, Any]]
    wall_s: float
    rounds_per_s: float

    def incomplete_rounds(self) -> list[int]:
        """Rounds that closed without every selected client: the soak was not at full load."""
        return [r["round"] for r in self.history if r["reported"] != r["selected"]]


def run_soak(
    rounds: int,
    every: int,
    workdir: Path,
    on_sample: Callable[[int, dict[str, int]], None] | None = None,
) -> SoakResult:
    """Run the soak job in ``workdir`` and sample RSS every ``every`` closed rounds."""
    warm_up = warm_up_rounds(rounds)
    manifest = write_manifest(workdir, rounds, evaluate_every=warm_up)
    run = LocalRun(
        RunOptions(job_path=manifest, out_dir=workdir / "run", quiet=True), ProcessLauncher()
    )
    started = time.monotonic()
    series: list[Series] = []
    closed_at: dict[int, float] = {}
    try:
        run.start()
        series = [Series(name, pid) for name, pid in aggregator_pids(run.out).items()]
        closed = 0
        last_close = time.monotonic()
        while closed < rounds:
            new = len(run.history(start=closed))
            now = time.monotonic()
            if new:
                for number in range(closed + 1, closed + new + 1):
                    closed_at[number] = now
                crossed = (closed + new) // every > closed // every
                closed, last_close = closed + new, now
                if crossed:
                    sample = _sample(series, closed)
                    if on_sample is not None:
                        on_sample(closed, sample)
                continue
            if run.handles["global"].poll() is not None:
                break  # the job ended early: follow() below says why
            _check_alive(run)
            if now - last_close > STALL_S:
                raise RuntimeError(f"no round closed for {STALL_S:.0f}s after round {closed}")
            time.sleep(POLL_S)
        status, message = run.follow(lambda _record: None)
        history = run.history()
    finally:
        run.stop()
    first, last = closed_at.get(1), closed_at.get(rounds)
    rate = (rounds - 1) / (last - first) if first and last and last > first else 0.0
    return SoakResult(
        rounds=rounds,
        every=every,
        warm_up=warm_up,
        status=status,
        message=message,
        series=series,
        history=history,
        wall_s=time.monotonic() - started,
        rounds_per_s=rate,
    )


def _sample(series: list[Series], closed: int) -> dict[str, int]:
    taken = {}
    for one in series:
        rss = rss_bytes(one.pid)
        if rss is not None:  # after the last round a service may already have exited
            one.points.append((closed, rss))
            taken[one.component] = rss
    return taken


def _check_alive(run: LocalRun) -> None:
    """A service that died mid-soak makes the rest meaningless: say which, at once."""
    for name, handle in run.handles.items():
        code = handle.poll()
        if code is not None:
            log = run.out / "logs" / f"{name}.log"
            raise RuntimeError(f"{name} exited with code {code} mid-soak; its log: {log}")


# -- report ---------------------------------------------------------------------
def table(result: SoakResult) -> list[str]:
    """One row per component: RSS at the end of warm-up and at the end, slope, verdict."""
    cols = [
        ("component", 16),
        ("fitted samples", 14),
        ("RSS MB, warm-up end", 19),
        ("RSS MB, end", 11),
        ("slope MB/100 rounds", 19),
        (f"goal < {GOAL_MB_PER_100_ROUNDS:g} MB/100 rounds", 26),
    ]
    header = " | ".join(
        f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(cols)
    )
    lines = [header, "-" * len(header)]
    for one in result.series:
        fitted = len(one.after(result.warm_up))
        if fitted < 2:  # the run ended early: nothing to fit
            cells = [one.component, str(fitted), "-", "-", "-", "no fit"]
        else:
            slope = one.slope_mb_per_100_rounds(result.warm_up)
            cells = [
                one.component,
                str(fitted),
                f"{one.rss_at_warm_up_mb(result.warm_up):.2f}",
                f"{one.rss_at_end_mb():.2f}",
                f"{slope:+.3f}",
                "MET" if slope < GOAL_MB_PER_100_ROUNDS else "NOT MET",
            ]
        lines.append(
            " | ".join(
                f"{cell:>{width}}" if i else f"{cell:<{width}}"
                for i, (cell, (_, width)) in enumerate(zip(cells, cols, strict=True))
            )
        )
    return lines


def report(result: SoakResult) -> list[str]:
    incomplete = result.incomplete_rounds()
    lines = [
        f"\nSoak: digits job (6 tenants in 2 regions, 1 local epoch in batches of 64), "
        f"{result.rounds} rounds, RSS (VmRSS) sampled every {result.every} closed rounds; "
        f"slope = least squares from round {result.warm_up} (end of warm-up) on",
        f"status {result.status} ({result.message}); {result.rounds_per_s:.2f} rounds/s "
        f"(round 1 closed -> round {result.rounds} closed); wall {result.wall_s:.1f}s; "
        f"rounds without every selected client: {len(incomplete)}",
        "",
        *table(result),
    ]
    stride = max(1, max((len(one.points) for one in result.series), default=0) // 10)
    every = f", one sample in {stride}" if stride > 1 else ""
    lines.append(f"\nRSS MB by closed round (r<round>:<MB>{every}):")
    for one in result.series:
        shown = " ".join(f"r{r}:{b / MB:.1f}" for r, b in one.points[::stride])
        lines.append(f"  {one.component:<16} {shown}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 500, quick 30)")
    parser.add_argument("--every", type=int, help="sample every N closed rounds (default 10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="30 rounds sampled every 3: a smoke test, not a measurement",
    )
    parser.add_argument(
        "--out", type=Path, help="keep the manifest and run directory here (default: a temp dir)"
    )
    args = parser.parse_args()
    rounds = args.rounds or (30 if args.quick else 500)
    every = args.every or (3 if args.quick else 10)
    if every < 1:
        parser.error("--every must be at least 1")
    if (rounds - warm_up_rounds(rounds)) // every < 1:
        parser.error(f"--rounds {rounds} with --every {every} leaves under 2 samples to fit")

    def progress(closed: int, sample: dict[str, int]) -> None:
        rss = ", ".join(f"{name} {value / MB:.1f}" for name, value in sample.items())
        print(f"round {closed:>5}/{rounds}: RSS MB {rss}", file=sys.stderr, flush=True)

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_soak(rounds, every, args.out, on_sample=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="fedkube-soak-") as tmp:
            result = run_soak(rounds, every, Path(tmp), on_sample=progress)
    print("\n".join(report(result)))
    if args.quick:
        print("\n--quick: a smoke test; the slopes of so few rounds mean nothing")
    if result.status != "succeeded":
        sys.exit(1)


if __name__ == "__main__":
    main()
