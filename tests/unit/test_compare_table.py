"""``fedkube compare --strategies``: the table and curve arithmetic, without running jobs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedkube.errors import SpecError
from fedkube.spec import Evaluation, dump_job, parse_job
from fedkube.tools.baselines import variant
from fedkube.tools.compare_report import (
    SeedBaselines,
    Spread,
    StrategyComparison,
    StrategyRun,
    bytes_moved,
    default_target,
    metric_curves,
    plot_curves,
    rounds_to_target,
    strategy_rows,
)
from tests.support import small_job_dict


def history(accuracies: list[float | None], up: int = 100, down: int = 50) -> list[dict]:
    return [
        {"round": i + 1, "accuracy": acc, "loss": 1.0, "bytes_up": up, "bytes_down": down}
        for i, acc in enumerate(accuracies)
    ]


RUNS = [
    StrategyRun("fedavg", 7, "succeeded", history([0.2, 0.5, 0.4])),
    StrategyRun("fedavg", 8, "succeeded", history([0.3, 0.6, 0.6])),
    StrategyRun("scaffold", 7, "succeeded", history([0.4, 0.8, 0.9], up=200)),
    StrategyRun("scaffold", 8, "succeeded", history([0.5, 0.7, 0.7], up=200)),
]
BASELINES = [
    SeedBaselines(7, 0.9, {"a": 0.3, "b": 0.35}),
    SeedBaselines(8, 0.8, {"a": 0.25, "b": 0.2}),
]


def test_spread_is_mean_sample_std_min_and_max():
    spread = Spread.of([0.4, 0.6, 0.8])
    assert spread.mean == pytest.approx(0.6)
    assert spread.std == pytest.approx(0.2)  # sample standard deviation (n - 1)
    assert (spread.low, spread.high, spread.count) == (0.4, 0.8, 3)
    assert Spread.of([0.5]).std == 0.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_rounds_to_target_is_the_first_round_at_or_above_it():
    records = history([0.2, None, 0.5, 0.7])
    assert rounds_to_target(records, 0.5) == 3
    assert rounds_to_target(records, 0.2) == 1
    assert rounds_to_target(records, 0.71) is None
    assert rounds_to_target([], 0.1) is None


def test_bytes_moved_adds_up_and_down_over_every_round():
    assert bytes_moved(history([0.1, 0.2], up=1000, down=30)) == 2060
    assert bytes_moved([{"round": 1}]) == 0


def test_default_target_is_ninety_percent_of_the_mean_centralised_accuracy():
    assert default_target(BASELINES) == pytest.approx(0.9 * 0.85)


def test_rows_aggregate_each_strategy_over_its_seeds():
    rows = {row.strategy: row for row in strategy_rows(RUNS, BASELINES, target=0.6)}
    assert list(rows) == ["fedavg", "scaffold"]
    fedavg, scaffold = rows["fedavg"], rows["scaffold"]
    # final: last evaluated round; best: max over rounds; per seed, then over seeds.
    assert fedavg.final is not None and fedavg.final.mean == pytest.approx(0.5)
    assert (fedavg.final.low, fedavg.final.high) == (0.4, 0.6)
    assert fedavg.best is not None and fedavg.best.mean == pytest.approx(0.55)
    assert scaffold.final is not None and scaffold.final.mean == pytest.approx(0.8)
    assert scaffold.best is not None and scaffold.best.mean == pytest.approx(0.8)
    # gap: centralised of the same seed minus final (0.9-0.4, 0.8-0.6) and (0.9-0.9, 0.8-0.7)
    assert fedavg.gap is not None and fedavg.gap.mean == pytest.approx(0.35)
    assert scaffold.gap is not None and scaffold.gap.mean == pytest.approx(0.05)
    assert fedavg.rounds_to_target == [None, 2]
    assert scaffold.rounds_to_target == [2, 2]
    assert fedavg.bytes_moved.mean == 3 * 150
    assert scaffold.bytes_moved.mean == 3 * 250
    assert fedavg.runs == 2 and fedavg.failed == 0


def test_a_failed_run_is_counted_and_a_run_without_evaluations_adds_no_accuracy():
    runs = [
        StrategyRun("fedprox", 7, "failed", []),
        StrategyRun("fedprox", 8, "succeeded", history([0.1, 0.3])),
        StrategyRun("fednova", 7, "failed", []),
    ]
    rows = {row.strategy: row for row in strategy_rows(runs, BASELINES, target=0.5)}
    assert rows["fedprox"].failed == 1 and rows["fedprox"].runs == 2
    assert rows["fedprox"].final == Spread.of([0.3])
    assert rows["fedprox"].rounds_to_target == [None, None]
    assert rows["fednova"].final is None and rows["fednova"].gap is None


def test_curves_average_each_round_over_seeds_with_a_min_max_band():
    runs = [*RUNS, StrategyRun("scaffold", 9, "failed", history([0.3]))]
    curves = metric_curves(runs)
    fedavg, scaffold = curves["fedavg"], curves["scaffold"]
    assert fedavg.rounds == [1, 2, 3]
    assert fedavg.mean == pytest.approx([0.25, 0.55, 0.5])
    assert fedavg.low == [0.2, 0.5, 0.4] and fedavg.high == [0.3, 0.6, 0.6]
    # Round 1 has three seeds, the later rounds the two that got that far.
    assert scaffold.mean[0] == pytest.approx(0.4) and scaffold.low[0] == 0.3
    assert scaffold.mean[1:] == pytest.approx([0.75, 0.8])


def comparison(**overrides: object) -> StrategyComparison:
    fields: dict = {
        "job": "synthetic",
        "seeds": [7, 8],
        "rounds": 3,
        "epochs_per_round": 5,
        "runs": RUNS,
        "baselines": BASELINES,
        "target": 0.6,
        "target_is_default": False,
    }
    fields.update(overrides)
    return StrategyComparison(**fields)  # type: ignore[arg-type]


def test_the_table_has_one_row_per_strategy_and_the_baselines():
    table = comparison().table()
    lines = table.splitlines()
    assert "2 strategies x 2 seeds (7, 8), 3 rounds x 5 local epochs" in lines[0]
    assert "sample standard deviation" in lines[1] and "target 60.0%" in lines[1]
    fedavg = next(line for line in lines if line.strip().startswith("fedavg"))
    scaffold = next(line for line in lines if line.strip().startswith("scaffold"))
    # final, best, rounds to target (one of two seeds), bytes up, bytes moved, gap
    assert re.search(
        r"50\.0 ± 14\.1\s+55\.0 ± 7\.1\s+2 \(1/2 seeds\)\s+300 B\s+450 B\s+\+35\.0", fedavg
    )
    assert re.search(
        r"80\.0 ± 14\.1\s+80\.0 ± 14\.1\s+2\s+600 B\s+750 B\s+\+5\.0 ± 7\.1$", scaffold
    )
    central = next(line for line in lines if "centralised, pooled data" in line)
    assert "85.0 ± 7.1" in central
    alone = next(line for line in lines if "best tenant alone" in line)
    # best alone per seed: 0.35 and 0.25; gap per seed 0.55 and 0.55
    assert re.search(r"30\.0 ± 7\.1\s+\+55\.0 ± 0\.0", alone)
    assert "best strategy: scaffold; it beats every tenant alone: yes" in table


def test_a_target_never_reached_shows_a_dash_and_one_seed_shows_no_spread():
    one_seed = [run for run in RUNS if run.seed == 7]
    table = comparison(
        runs=one_seed, baselines=BASELINES[:1], seeds=[7], target=0.95, target_is_default=True
    ).table()
    fedavg = next(line for line in table.splitlines() if line.strip().startswith("fedavg"))
    assert "—" in fedavg and "±" not in fedavg
    assert "target 95.0% (90% of centralised)" in table


def test_a_failed_run_is_flagged_in_its_row():
    runs = [*RUNS, StrategyRun("fedprox", 7, "failed", [])]
    table = comparison(runs=runs).table()
    row = next(line for line in table.splitlines() if line.strip().startswith("fedprox"))
    assert "(1/1 failed)" in row and "n/a" in row
    assert not comparison(runs=runs).all_succeeded and comparison().all_succeeded


def test_the_plot_is_a_png(tmp_path: Path):
    path = plot_curves(metric_curves(RUNS), tmp_path / "compare.png", "synthetic", BASELINES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_replaces_only_the_strategy_name_and_the_seed():
    document = small_job_dict(strategy={"name": "fedavg", "proximalMu": 0.3})
    job = parse_job(document)
    changed = variant(job, "fedprox", 11)
    original = dump_job(job)
    assert changed["spec"]["strategy"]["name"] == "fedprox" and changed["spec"]["seed"] == 11
    assert changed["spec"]["strategy"]["proximalMu"] == 0.3
    changed["spec"]["strategy"]["name"] = original["spec"]["strategy"]["name"]
    changed["spec"]["seed"] = original["spec"]["seed"]
    assert changed == original
    # What compare writes parses back to the same job.
    again = parse_job(yaml.safe_load(yaml.safe_dump(variant(job, "scaffold", 3))))
    assert again.spec.strategy.name == "scaffold" and again.spec.seed == 3


def test_an_unknown_strategy_is_refused_before_anything_runs():
    with pytest.raises(SpecError, match="spec.strategy.name"):
        variant(parse_job(small_job_dict()), "fedmagic", 1)


def test_a_metric_where_lower_is_better_turns_best_target_gap_and_baselines_around():
    # prepare: mean absolute error; centralised 0.40 and 0.50, the tenants alone worse
    mae = Evaluation(metric="mae", goal="minimize")
    runs = [
        StrategyRun("fedavg", 7, "succeeded", history_of("mae", [0.9, 0.5, 0.6])),
        StrategyRun("fedavg", 8, "succeeded", history_of("mae", [0.8, 0.7, 0.55])),
    ]
    baselines = [
        SeedBaselines(7, 0.40, {"a": 0.8, "b": 0.7}),
        SeedBaselines(8, 0.50, {"a": 0.9, "b": 1.2}),
    ]
    # execute
    target = default_target(baselines, mae)
    (row,) = strategy_rows(runs, baselines, target=0.6, evaluation=mae)
    table = comparison(
        runs=runs, baselines=baselines, target=target, evaluation=mae, target_is_default=True
    ).table()
    # assert: best is the lowest, the gap is final minus centralised, the target is above it
    assert target == pytest.approx(0.45 / 0.9)
    assert row.best is not None and row.best.mean == pytest.approx((0.5 + 0.55) / 2)
    assert row.final is not None and row.final.mean == pytest.approx((0.6 + 0.55) / 2)
    assert row.gap is not None and row.gap.mean == pytest.approx((0.2 + 0.05) / 2)
    assert row.rounds_to_target == [2, 3]
    assert [b.best_alone(mae) for b in baselines] == [0.7, 0.9]
    assert "held-out mae (lower is better)" in table and "target 0.500 (centralised / 0.9)" in table
    assert re.search(r"fedavg\s+0\.575 ± 0\.035\s+0\.525 ± 0\.035", table)
    assert "best strategy: fedavg; it beats every tenant alone: yes" in table


def history_of(metric: str, values: list[float]) -> list[dict]:
    return [{"round": i + 1, "metrics": {metric: v}} for i, v in enumerate(values)]
