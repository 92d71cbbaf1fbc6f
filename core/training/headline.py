"""The job's headline metric: ``spec.evaluation.metric``, better up or down (``goal``).

Pure functions over history records, shared by everything that shows one
number for a model (the progress line, the run summary, the plot, the
operator's status and printer column), so that they all agree on which
round was best.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedkube.spec import Evaluation

# Shown as a percentage, as the built-in classifier's accuracy always was.
PERCENT = frozenset({"accuracy"})


def value(record: Mapping[str, Any], evaluation: Evaluation) -> float | None:
    """The headline metric of one history record (None: not evaluated that round).

    The central evaluation's where the global tier has held-out data; else
    the sites' example-weighted mean over every client that evaluated.
    """
    sites = record.get("sites")
    for metrics in (
        record.get("metrics"),
        sites.get("metrics") if isinstance(sites, Mapping) else None,
    ):
        if isinstance(metrics, Mapping) and metrics.get(evaluation.metric) is not None:
            return float(metrics[evaluation.metric])
    # Records written before tasks had metrics of their own: loss and accuracy only.
    legacy = record.get(evaluation.metric)
    return float(legacy) if isinstance(legacy, int | float) else None


def evaluated(
    history: Sequence[Mapping[str, Any]], evaluation: Evaluation
) -> list[tuple[int, float]]:
    """(round, headline) of every record that has one, in order."""
    found = [(int(r["round"]), value(r, evaluation)) for r in history]
    return [(number, v) for number, v in found if v is not None]


def best(history: Sequence[Mapping[str, Any]], evaluation: Evaluation) -> tuple[int, float] | None:
    """(round, headline) of the best evaluated round; the earliest among equals."""
    points = evaluated(history, evaluation)
    if not points:
        return None
    up = sign(evaluation)
    return max(points, key=lambda point: (up * point[1], -point[0]))


def sign(evaluation: Evaluation) -> float:
    """+1 when higher is better, -1 when lower is: ``sign * value`` always grows with quality."""
    return 1.0 if evaluation.goal == "maximize" else -1.0


def better(a: float, b: float, evaluation: Evaluation) -> bool:
    """Whether ``a`` is strictly better than ``b``."""
    return sign(evaluation) * (a - b) > 0


def best_of(values: Iterable[float], evaluation: Evaluation) -> float:
    """The best of ``values``: the highest, or the lowest when lower is better."""
    up = sign(evaluation)
    return up * max(up * value for value in values)


def best_name(scores: Mapping[str, float], evaluation: Evaluation) -> str:
    """The key of the best score (the first among equals)."""
    up = sign(evaluation)
    return max(scores, key=lambda name: up * scores[name])


def reaches(value: float, target: float, evaluation: Evaluation) -> bool:
    """Whether ``value`` is at least as good as ``target``."""
    return sign(evaluation) * (value - target) >= 0


def percent(evaluation: Evaluation) -> bool:
    """Whether the metric is shown in percent (accuracy)."""
    return evaluation.metric in PERCENT


def scale(evaluation: Evaluation) -> float:
    """100 for a metric shown in percent, else 1."""
    return 100.0 if percent(evaluation) else 1.0


def show(number: float | None, evaluation: Evaluation) -> str:
    """``97.50%`` for accuracy, else four significant digits; ``n/a`` when missing."""
    if number is None:
        return "n/a"
    if percent(evaluation):
        return f"{100 * number:5.2f}%"
    return f"{number:.4g}"


def label(evaluation: Evaluation) -> str:
    """The metric's short name in the progress line (``acc`` for accuracy, as always)."""
    return "acc" if evaluation.metric == "accuracy" else evaluation.metric
