"""Every benchmark still runs: ``--quick`` of each, to the end, with its table.

A benchmark is only run by hand (``make bench``), so a change to the services
can break it without any test noticing. These smoke tests run each one as a
user would, with ``--quick`` (every scenario, smaller), and check that it
exits 0 and prints its table with figures in it. They check no figure against
a threshold: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration

NUMBER = re.compile(r"\d+\.\d+")


def run_benchmark(script: str, *args: str, timeout: float = 300) -> str:
    """Run ``benchmarks/SCRIPT ARGS`` with this interpreter; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def table_rows(output: str, column: str) -> list[str]:
    """The lines under the table header that names ``column``, up to the next blank line."""
    lines = output.splitlines()
    headers = [i for i, line in enumerate(lines) if column in line]
    assert headers, f"no table header with {column!r} in:\n{output}"
    rows = []
    for line in lines[headers[0] + 1 :]:
        if not line.strip():
            break
        if set(line.strip()) != {"-"}:  # the rule under the header
            rows.append(line)
    return rows


def figure_rows(rows: list[str], label: str) -> list[str]:
    """The rows that start with ``label`` and carry at least one figure."""
    return [row for row in rows if row.strip().startswith(label) and NUMBER.search(row)]


def test_fold_benchmark_prints_bandwidths_fold_rates_and_memory():
    output = run_benchmark("fold.py", "--quick")
    rows = table_rows(output, "best GB/s")
    for label in (
        "(a) memcpy",
        "(b) numpy in-place add",
        "(c) WeightedSum.fold, owned",
        "(c) WeightedSum.fold, safetensors",
        "context: naive",
        "context: unweighted",
    ):
        assert figure_rows(rows, label), f"no figures for {label!r} in:\n{output}"
    assert re.search(r"fold/in-place-add traffic ratio \(safetensors views\): best\s+\d", output)
    assert re.search(r"fold/unweighted-add ratio \(safetensors views\): best\s+\d", output)
    for label in (
        "int8, one scale per tensor",
        "int8, 4096-value blocks",
        "top-k 1 %, scatter-add",
    ):
        assert re.search(rf"\(e\) fold of {label}\s+[\d.]+ GB/s", output), output
    assert re.search(r"^WeightedSum.fold\s+tracemalloc peak\s+\d", output, re.M), output
    assert "correctness spot check" in output


def test_round_overhead_benchmark_runs_every_scenario_to_the_end():
    output = run_benchmark("round_overhead.py", "--quick")
    rows = table_rows(output, "med overhead s")
    for label in (
        "8 tenants, real Worker training (digits)",
        "8 tenants, no training, clients in 2nd process",
        "100 clients, no training, clients in 2nd proc",
        "100 clients, no training, all in one process",
    ):
        assert figure_rows(rows, label), f"no figures for {label!r} in:\n{output}"
    assert output.count("status=succeeded") == 4, output
    assert "refused updates" not in output, output


def test_strategies_benchmark_prints_every_strategy_beside_the_fold():
    output = run_benchmark("strategies.py", "--quick", timeout=120)
    rows = [row.strip("| ") for row in table_rows(output, "x fold time")]
    for label in (
        "fedavg fold",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "normBound clip+fold",
        "normBound scale in fold",
        "median",
        "trimmedMean",
        "krum",
        "multiKrum",
    ):
        assert figure_rows(rows, label + " "), f"no figures for {label!r} in:\n{output}"


def test_the_flower_comparison_runs_both_systems_and_prints_the_side_by_side_table():
    # Flower's own virtualenv (make test builds it: scripts/flower-venv.sh). One case of
    # each kind: case 2 runs case 1's code at other sizes, the 100k row case 3's, and the
    # plain deployment rows those under TLS without the certificates.
    output = run_benchmark("vs_flower.py", "--quick", "--cases", "1,3,startup,tls", timeout=600)
    rows = table_rows(output, "fedkube median")
    for label in (
        "4 clients x 10k, all/round: median round",
        "50 clients, 5/round, 10k: median round",
        "50 clients, 5/round, 10k: peak memory (PSS)",
        "start-up to end of round 1",
        "deployment under TLS: 2 clients x 10k, a process each: median round",
    ):
        found = [row for row in rows if label in row]
        assert found and "n/a" not in found[0], f"no figures for {label!r} in:\n{output}"
        assert len(NUMBER.findall(found[0])) >= 3, found[0]  # both sides and the ratio


def test_the_secure_aggregation_benchmark_prints_both_jobs_side_by_side():
    output = run_benchmark("secagg.py", "--quick", timeout=600)
    rows = table_rows(output, "| measure | clear | secure |")
    for label in ("| round time", "| update upload per client", "| key material per client"):
        assert figure_rows(rows, label), f"no {label!r} row with figures in:\n{output}"


def test_the_hostile_load_benchmark_keeps_every_round_exact_under_attack():
    output = run_benchmark("hostile_load.py", "--quick", timeout=600)
    rows = table_rows(output, "| scenario | clients | status |")
    for label in ("| baseline (mallory honest)", "| under attack"):
        found = figure_rows(rows, label)
        assert found, f"no {label!r} row with figures in:\n{output}"
        # succeeded, every client every round, model bit-identical
        cells = [cell.strip() for cell in found[0].split("|")]
        assert "succeeded" in cells and cells.count("yes") == 2, found[0]
    for answer in ("429 busy", "408 slow_body", "400 malformed", "413 oversized"):
        assert re.search(rf"^  {answer}\s+\d+$", output, re.M), f"no {answer!r} in:\n{output}"
    assert "5xx other than busy: 0" in output, output
