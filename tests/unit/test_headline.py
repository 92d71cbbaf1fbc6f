"""The headline metric: which number a job is judged by, and which round was best."""

from __future__ import annotations

from fedkube.spec import Evaluation
from fedkube.training import headline

HISTORY = [
    {"round": 1, "metrics": {"mae": 0.9, "loss": 1.2}},
    {"round": 2, "metrics": {}},  # not evaluated that round
    {"round": 3, "metrics": {"mae": 0.4, "loss": 0.5}},
    {"round": 4, "metrics": {"mae": 0.4, "loss": 0.6}},
    {"round": 5, "metrics": {"mae": 0.7, "loss": 0.4}},
]


def test_the_best_round_follows_the_goal_and_the_earliest_wins_a_tie():
    lower = Evaluation(metric="mae", goal="minimize")
    higher = Evaluation(metric="mae", goal="maximize")

    assert headline.best(HISTORY, lower) == (3, 0.4)
    assert headline.best(HISTORY, higher) == (1, 0.9)
    assert headline.evaluated(HISTORY, lower) == [(1, 0.9), (3, 0.4), (4, 0.4), (5, 0.7)]


def test_records_from_before_task_metrics_are_read_by_their_accuracy_field():
    old = [{"round": 1, "accuracy": 0.8, "loss": 0.5}, {"round": 2, "accuracy": None}]

    assert headline.best(old, Evaluation()) == (1, 0.8)
    assert headline.value(old[1], Evaluation()) is None


def test_accuracy_shows_as_a_percentage_and_other_metrics_as_four_digits():
    assert headline.show(0.975, Evaluation()) == "97.50%"
    assert headline.show(0.123456, Evaluation(metric="auroc")) == "0.1235"
    assert headline.show(None, Evaluation(metric="auroc")) == "n/a"
    assert (
        headline.label(Evaluation()) == "acc" and headline.label(Evaluation(metric="mae")) == "mae"
    )
