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
    """examples/synthetic.yaml in miniature: 4 tenants, 2 regions, 3 rounds."""
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
            "regions": [{"name": "eu"}, {"name": "us"}],
            "tenants": [
                {"name": "a", "region": "eu"},
                {"name": "b", "region": "eu"},
                {"name": "c", "region": "us"},
                {"name": "d", "region": "us"},
            ],
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
