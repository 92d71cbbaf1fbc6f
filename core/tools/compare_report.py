"""What ``fedkube compare`` prints and draws, from runs that have finished.

Pure arithmetic and rendering over histories and baseline scores: the
single-job table (:class:`CompareReport`), the strategies' table over seeds
(:func:`strategy_rows`, :class:`StrategyComparison`) and the plot
(:func:`metric_curves`, :func:`plot_curves`). Nothing here trains or runs a
job (:mod:`.baselines` does), so the tables are unit-tested on made-up runs.

A little over 400 lines on purpose: both tables and the plot share the
formatting of the headline metric, and are read together.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkube.local.report import human_bytes
from fedkube.spec import (
    Evaluation,
)
from fedkube.training import headline

DEFAULT = Evaluation()  # accuracy, higher is better: what a job says when it names nothing


def _score(value: float | None, evaluation: Evaluation, signed: bool = False) -> str:
    """A metric as the tables show it: accuracy in percent (one decimal), else 3 decimals."""
    if value is None:
        return "n/a"
    scaled = headline.scale(evaluation) * value
    places = 1 if headline.percent(evaluation) else 3
    return f"{scaled:+.{places}f}" if signed else f"{scaled:.{places}f}"


def _unit(evaluation: Evaluation) -> str:
    return f"{evaluation.metric} in %" if headline.percent(evaluation) else evaluation.metric


@dataclass
class CompareReport:
    job: str
    federated_status: str
    federated: float | None
    central: float
    tenants: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    strategy: str = "fedavg"
    evaluation: Evaluation = field(default_factory=Evaluation)

    def table(self) -> str:
        fed, settings = self.federated, self.evaluation
        up = headline.sign(settings)
        best_name = headline.best_name(self.tenants, settings)
        best = self.tenants[best_name]
        rows = [
            (f"federated ({self.strategy})", fed),
            ("centralised, pooled data", self.central),
            (f"best tenant alone ({best_name})", best),
        ]
        lines = [
            f"fedkube compare {self.job}: held-out {_unit(settings)}, {self.epochs} local epochs "
            "of training for every model",
            "",
        ]
        lines += [f"  {name:<40} {_score(value, settings):>7}" for name, value in rows]
        lines.append("")
        lines += [
            f"    {name:<38} {_score(value, settings):>7}"
            for name, value in sorted(self.tenants.items())
        ]
        if fed is not None:
            gap = up * (self.central - fed)
            lines += [
                "",
                f"  gap to centralised: {_score(gap, settings, signed=True)}; federated beats "
                f"every tenant alone: {'yes' if headline.better(fed, best, settings) else 'no'}",
            ]
        return "\n".join(lines)


# fedkube compare --strategies: one run per (strategy, seed), one table.


@dataclass(frozen=True)
class StrategyRun:
    """One finished federated run: its strategy, seed, end state and history."""

    strategy: str
    seed: int
    status: str
    history: list[dict[str, Any]]
    out_dir: Path | None = None


@dataclass(frozen=True)
class SeedBaselines:
    """The strategy-independent baselines of one seed (the job's headline metric)."""

    seed: int
    central: float
    tenants: dict[str, float]

    def best_alone(self, evaluation: Evaluation) -> float:
        return headline.best_of(self.tenants.values(), evaluation)


@dataclass(frozen=True)
class Spread:
    """A value over seeds: mean, sample standard deviation (0 for one seed), min, max."""

    mean: float
    std: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("Spread.of needs at least one value")
        return cls(
            mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0,
            low=min(values),
            high=max(values),
            count=len(values),
        )


@dataclass(frozen=True)
class StrategyRow:
    """One strategy's line of the table, aggregated over its seeds.

    ``final``/``best``/``gap`` are over the runs that evaluated at least once
    (``None`` when none did). ``rounds_to_target`` holds, per run, the first
    round whose headline metric reached the target, ``None`` when it never
    did. ``gap`` is how far the final metric is behind the centralised one,
    per seed (positive: worse than centralised, whichever the goal).
    """

    strategy: str
    runs: int
    failed: int
    final: Spread | None
    best: Spread | None
    gap: Spread | None
    rounds_to_target: list[int | None]
    bytes_moved: Spread
    bytes_up: Spread


@dataclass(frozen=True)
class Curve:
    """The headline metric per round over seeds: mean and the min–max band."""

    rounds: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def rounds_to_target(
    history: Sequence[dict[str, Any]], target: float, evaluation: Evaluation = DEFAULT
) -> int | None:
    """The first round whose headline metric is at least as good as ``target``."""
    points = headline.evaluated(history, evaluation)
    return next((n for n, v in points if headline.reaches(v, target, evaluation)), None)


def bytes_moved(history: Sequence[dict[str, Any]]) -> int:
    """Bytes up plus bytes down over every closed round."""
    return sum(int(r.get("bytes_up", 0)) + int(r.get("bytes_down", 0)) for r in history)


def default_target(
    baselines: Sequence[SeedBaselines], evaluation: Evaluation = DEFAULT, share: float = 0.9
) -> float:
    """Nearly centralised: ``share`` of the mean centralised metric when higher is better,
    the mean divided by ``share`` when lower is (an error within 11 % of centralised)."""
    central = statistics.fmean(b.central for b in baselines)
    return share * central if evaluation.goal == "maximize" else central / share


def strategy_rows(
    runs: Sequence[StrategyRun],
    baselines: Sequence[SeedBaselines],
    target: float,
    evaluation: Evaluation = DEFAULT,
) -> list[StrategyRow]:
    """The table's strategy rows, in the order the strategies first appear in ``runs``."""
    central = {b.seed: b.central for b in baselines}
    up = headline.sign(evaluation)
    order = list(dict.fromkeys(run.strategy for run in runs))
    rows = []
    for name in order:
        mine = [run for run in runs if run.strategy == name]
        finals, bests, gaps = [], [], []
        for run in mine:
            points = headline.evaluated(run.history, evaluation)
            if not points:
                continue
            finals.append(points[-1][1])
            bests.append(headline.best_of((value for _, value in points), evaluation))
            if run.seed in central:
                gaps.append(up * (central[run.seed] - finals[-1]))
        rows.append(
            StrategyRow(
                strategy=name,
                runs=len(mine),
                failed=sum(run.status != "succeeded" for run in mine),
                final=Spread.of(finals) if finals else None,
                best=Spread.of(bests) if bests else None,
                gap=Spread.of(gaps) if gaps else None,
                rounds_to_target=[
                    rounds_to_target(run.history, target, evaluation) for run in mine
                ],
                bytes_moved=Spread.of([float(bytes_moved(run.history)) for run in mine]),
                bytes_up=Spread.of(
                    [float(sum(int(r.get("bytes_up", 0)) for r in run.history)) for run in mine]
                ),
            )
        )
    return rows


def metric_curves(
    runs: Sequence[StrategyRun], evaluation: Evaluation = DEFAULT
) -> dict[str, Curve]:
    """Per strategy, the headline metric per evaluated round: mean, min and max over seeds.

    A round counts the seeds that evaluated it, so a run that stopped early
    shortens nobody else's curve.
    """
    curves: dict[str, Curve] = {}
    for name in dict.fromkeys(run.strategy for run in runs):
        by_round: dict[int, list[float]] = {}
        for run in runs:
            if run.strategy == name:
                for number, value in headline.evaluated(run.history, evaluation):
                    by_round.setdefault(number, []).append(value)
        rounds = sorted(by_round)
        curves[name] = Curve(
            rounds=rounds,
            mean=[statistics.fmean(by_round[r]) for r in rounds],
            low=[min(by_round[r]) for r in rounds],
            high=[max(by_round[r]) for r in rounds],
        )
    return curves


def _spread(spread: Spread | None, evaluation: Evaluation, signed: bool = False) -> str:
    if spread is None:
        return "n/a"
    mean = _score(spread.mean, evaluation, signed)
    return mean if spread.count == 1 else f"{mean} ± {_score(spread.std, evaluation)}"


def _rounds(values: Sequence[int | None]) -> str:
    """Mean rounds over the runs that reached the target; "—" if none did."""
    reached = [v for v in values if v is not None]
    if not reached:
        return "—"
    text = f"{statistics.fmean(reached):.1f}".removesuffix(".0")
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


PLURAL = {"strategy": "strategies", "compression": "compressions", "dp": "privacy budgets"}


@dataclass
class StrategyComparison:
    """Everything ``fedkube compare --strategies`` (or ``--compression``) measured."""

    job: str
    seeds: list[int]
    rounds: int
    epochs_per_round: int
    runs: list[StrategyRun]
    baselines: list[SeedBaselines]
    target: float
    target_is_default: bool = True
    plot_path: Path | None = None
    axis: str = "strategy"  # or "compression" or "dp": what the rows vary
    evaluation: Evaluation = field(default_factory=Evaluation)  # the headline metric

    @property
    def all_succeeded(self) -> bool:
        return all(run.status == "succeeded" for run in self.runs)

    def rows(self) -> list[StrategyRow]:
        return strategy_rows(self.runs, self.baselines, self.target, self.evaluation)

    def table(self) -> str:
        settings = self.evaluation
        rows = self.rows()
        unit = "%" if headline.percent(settings) else ""
        target = _score(self.target, settings) + unit
        why = ""
        if self.target_is_default:
            why = " (90% of centralised)" if settings.goal == "maximize" else " (centralised / 0.9)"
        header = [
            self.axis,
            "final",
            "best",
            f"rounds to {target}",
            "bytes up",
            "bytes moved",
            "gap",
        ]
        body = [
            [
                row.strategy + (f" ({row.failed}/{row.runs} failed)" if row.failed else ""),
                _spread(row.final, settings),
                _spread(row.best, settings),
                _rounds(row.rounds_to_target),
                human_bytes(row.bytes_up.mean),
                human_bytes(row.bytes_moved.mean),
                _spread(row.gap, settings, signed=True),
            ]
            for row in rows
        ]
        up = headline.sign(settings)
        central = Spread.of([b.central for b in self.baselines])
        alone = Spread.of([b.best_alone(settings) for b in self.baselines])
        body.append(["centralised, pooled data", _spread(central, settings), "", "", "", "", ""])
        alone_gap = Spread.of([up * (b.central - b.best_alone(settings)) for b in self.baselines])
        body.append(
            [
                "best tenant alone",
                _spread(alone, settings),
                "",
                "",
                "",
                "",
                _spread(alone_gap, settings, signed=True),
            ]
        )
        for tenant in self.baselines[0].tenants:
            single = Spread.of([b.tenants[tenant] for b in self.baselines])
            body.append([f"  {tenant} alone", _spread(single, settings), "", "", "", "", ""])
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def render(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
            return "  " + "   ".join([first, *rest]).rstrip()

        seeds = ", ".join(str(seed) for seed in self.seeds)
        direction = "higher" if settings.goal == "maximize" else "lower"
        lines = [
            f"fedkube compare {self.job}: {len(rows)} {PLURAL[self.axis]} x "
            f"{len(self.seeds)} seeds "
            f"({seeds}), {self.rounds} rounds x {self.epochs_per_round} local epochs",
            f"held-out {_unit(settings)} ({direction} is better), mean ± sample standard "
            f"deviation over seeds; target {target}{why}",
            "gap: how far the final metric is behind centralised (positive: worse); rounds to "
            "target: mean over the seeds that reached it",
            "",
            render(header),
            *[render(line) for line in body],
        ]
        finals = {row.strategy: row.final.mean for row in rows if row.final is not None}
        if finals:
            best = headline.best_name(finals, settings)
            beats = all(
                headline.better(finals[best], value, settings)
                for value in (alone.mean, *self._tenant_means().values())
            )
            lines += [
                "",
                f"  best {self.axis}: {best}; it beats every tenant alone: "
                f"{'yes' if beats else 'no'}",
            ]
        if self.plot_path is not None:
            lines.append(f"  plot: {self.plot_path}")
        return "\n".join(lines)

    def _tenant_means(self) -> dict[str, float]:
        return {
            tenant: statistics.fmean(b.tenants[tenant] for b in self.baselines)
            for tenant in self.baselines[0].tenants
        }


def plot_curves(
    curves: dict[str, Curve],
    path: Path,
    title: str,
    baselines: Sequence[SeedBaselines] = (),
    evaluation: Evaluation = DEFAULT,
) -> Path:
    """One headline-metric-per-round line per strategy, with its min–max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scale = headline.scale(evaluation)
    fig, axis = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        (line,) = axis.plot(curve.rounds, [scale * a for a in curve.mean], marker="o", label=name)
        axis.fill_between(
            curve.rounds,
            [scale * a for a in curve.low],
            [scale * a for a in curve.high],
            color=line.get_color(),
            alpha=0.2,
        )
    if baselines:
        central = statistics.fmean(b.central for b in baselines)
        alone = statistics.fmean(b.best_alone(evaluation) for b in baselines)
        axis.axhline(scale * central, color="black", linestyle="--", label="centralised")
        axis.axhline(scale * alone, color="grey", linestyle=":", label="best tenant alone")
    better = "higher" if evaluation.goal == "maximize" else "lower"
    axis.set(
        title=f"held-out {evaluation.metric} ({better} is better)",
        xlabel="round",
        ylabel=evaluation.metric + (" (%)" if headline.percent(evaluation) else ""),
    )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend()
    fig.suptitle(f"fedkube compare: {title} (mean over seeds, min–max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
