"""fedkube run's progress line: one line per round, perplexity for a language model."""

from __future__ import annotations

import math

from fedkube.local.report import ProgressPrinter
from fedkube.spec import parse_job
from tests.support import small_job_dict

RECORD = {
    "round": 2,
    "reported": 3,
    "selected": 4,
    "participation": 0.75,
    "loss": 4.2,
    "accuracy": 0.25,
    "bytes_up": 2048,
    "bytes_down": 1024,
    "duration_s": 1.5,
    "missing_regions": ["us"],
}


def test_a_round_line_says_participation_loss_accuracy_and_a_missing_region(capsys):
    ProgressPrinter(parse_job(small_job_dict())).round(RECORD)
    line = capsys.readouterr().out
    assert "round   2/3  clients 3/4 (75%)  loss 4.2000  acc 25.00%" in line
    assert "ppl" not in line and line.rstrip().endswith("no partial from us")


def test_a_lora_jobs_line_adds_the_perplexity(capsys):
    job = parse_job(small_job_dict(training={"peft": {"rank": 2}}))
    ProgressPrinter(job).round(RECORD)
    assert f"loss 4.2000  ppl {math.exp(4.2):.2f}  acc 25.00%" in capsys.readouterr().out


def test_a_job_judged_by_another_metric_shows_that_metric(capsys):
    job = parse_job(small_job_dict(evaluation={"metric": "mae", "goal": "minimize"}))
    ProgressPrinter(job).round({**RECORD, "metrics": {"mae": 12.3456, "loss": 4.2}})
    line = capsys.readouterr().out
    assert "loss 4.2000  mae 12.35  " in line and "acc" not in line
