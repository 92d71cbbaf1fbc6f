"""``fedkube compare --strategies``: one real run per strategy, one table, one plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.support import fedkube_cli

pytestmark = pytest.mark.integration

SIZES = {"samples": 1200, "features": 16, "informative": 8, "classes": 6, "clusters": 2}


def short_synthetic_job(path: Path) -> Path:
    """examples/synthetic.yaml in miniature: 2 tenants, 1 region, 3 rounds.

    compare runs the whole job once per row: few processes keep each run short.
    """
    document = {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "synthetic-short"},
        "spec": {
            "rounds": 3,
            "seed": 7,
            "model": {
                "entrypoint": "fedkube.examples.synthetic:make_model",
                "kwargs": {"features": 16, "classes": 6, "hidden": 32},
            },
            "data": {
                "entrypoint": "fedkube.examples.synthetic:make_data",
                "kwargs": SIZES,
                "partition": {"scheme": "dirichlet", "alpha": 0.1},
            },
            "regions": [{"name": "eu"}],
            "tenants": [{"name": "a", "region": "eu"}, {"name": "b", "region": "eu"}],
            "training": {"epochs": 2, "batchSize": 32, "learningRate": 0.1, "momentum": 0.0},
            "participation": {"minFraction": 0.5, "roundTimeoutSeconds": 30},
            "strategy": {"name": "fedavg", "proximalMu": 0.01},
        },
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_compare_runs_every_strategy_and_writes_one_table_and_a_plot(tmp_path: Path):
    manifest = short_synthetic_job(tmp_path / "synthetic-short.yaml")
    out = tmp_path / "compare"
    done = fedkube_cli(
        "compare",
        str(manifest),
        "--strategies",
        "fedavg,fedprox",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--quiet",
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "2 strategies x 1 seeds (7), 3 rounds x 2 local epochs" in lines[0]
    rows = {
        name: [line for line in lines if line.strip().startswith(name + " ")]
        for name in ("fedavg", "fedprox")
    }
    assert all(len(found) == 1 for found in rows.values()), done.stdout
    for (row,) in rows.values():
        # final and best accuracy, rounds to target (a number or a dash), bytes moved
        assert re.search(r"\d+\.\d\s+\d+\.\d\s+(\d+(\.\d)?|—)\s+[\d.]+ [KM]?B\s", row), row
    assert any("centralised, pooled data" in line for line in lines)
    assert any("best tenant alone" in line for line in lines)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.txt").read_text().strip() in done.stdout
    for name in ("fedavg", "fedprox"):
        run = out / "seed-7" / name
        strategy = yaml.safe_load((run / "manifest.yaml").read_text())["spec"]["strategy"]
        assert strategy["name"] == name and strategy["proximalMu"] == 0.01
        assert (run / "history.jsonl").exists()


def test_compare_refuses_an_unknown_strategy_before_running_anything(tmp_path: Path):
    manifest = short_synthetic_job(tmp_path / "synthetic-short.yaml")
    done = fedkube_cli(
        "compare",
        str(manifest),
        "--strategies",
        "fedavg,fedmagic",
        "--out",
        str(tmp_path / "o"),
        timeout=60,
    )
    assert done.returncode == 2
    assert "fedmagic" in done.stderr and "fedavg" in done.stderr
    assert not (tmp_path / "o").exists()


def test_compare_dp_runs_the_job_at_each_epsilon_beside_no_privacy(tmp_path: Path):
    # prepare: the short job with client-level DP (clip 1.0), two target epsilons
    manifest = short_synthetic_job(tmp_path / "synthetic-short.yaml")
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["privacy"] = {"dp": {"clipNorm": 1.0, "noiseMultiplier": 1.0}}
    manifest.write_text(yaml.safe_dump(document))
    out = tmp_path / "compare"
    # execute
    done = fedkube_cli(
        "compare", str(manifest), "--dp", "2,8", "--out", str(out), "--quiet", timeout=300
    )
    # assert: a row per budget and one without privacy, each run at its target
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 privacy budgets x 1 seeds" in done.stdout
    for label in ("no DP", "ε = 2", "ε = 8"):
        assert any(line.strip().startswith(label) for line in done.stdout.splitlines()), label
    plain = yaml.safe_load((out / "seed-7" / "epsilon-none" / "manifest.yaml").read_text())
    assert "dp" not in plain["spec"].get("privacy", {})
    for epsilon in (2, 8):
        run = out / "seed-7" / f"epsilon-{epsilon}"
        dp = yaml.safe_load((run / "manifest.yaml").read_text())["spec"]["privacy"]["dp"]
        assert dp["epsilon"] == epsilon and "noiseMultiplier" not in dp
        history = [
            yaml.safe_load(line) for line in (run / "history.jsonl").read_text().splitlines()
        ]
        assert history[-1]["epsilon"] == pytest.approx(epsilon, rel=0.01)


def test_compare_dp_needs_the_manifests_privacy_block(tmp_path: Path):
    manifest = short_synthetic_job(tmp_path / "synthetic-short.yaml")
    done = fedkube_cli("compare", str(manifest), "--dp", "4", "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "spec.privacy.dp" in done.stderr
