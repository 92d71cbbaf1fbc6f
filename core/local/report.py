"""What a person sees of a run: progress lines, summary, history file, plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkube.spec import Evaluation, FederatedJob
from fedkube.training import headline

if TYPE_CHECKING:
    from fedkube.local.runner import RunResult


def _epsilon(record: dict[str, Any]) -> str:
    """Differential privacy spent so far, where the job has it."""
    epsilon = record.get("epsilon")
    return "" if epsilon is None else f"ε {float(epsilon):.2f}  "


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


class ProgressPrinter:
    """One line per closed round, flushed as it happens."""

    def __init__(self, job: FederatedJob, enabled: bool = True):
        self.job = job
        self.enabled = enabled

    def header(self, out: Path, runtime: str) -> None:
        if not self.enabled:
            return
        spec = self.job.spec
        tls = spec.transport.tls.mode.value
        print(
            f"fedkube run {self.job.name}: {len(spec.tenants)} tenants, "
            f"{len(self.job.clients())} clients, {len(spec.regions)} regions, "
            f"{spec.rounds} rounds, strategy {spec.strategy.name}, runtime {runtime}"
            + ("" if tls == "disabled" else f", TLS {tls} (the run's own CA)"),
            flush=True,
        )
        print(f"run directory {out}", flush=True)

    def round(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        loss = record.get("loss")
        evaluation = self.job.spec.evaluation
        # A language model (LoRA) is read by its perplexity, e^loss.
        perplexity = (
            f"ppl {math.exp(min(loss, 700.0)):.2f}  "
            if loss is not None and self.job.spec.training.peft is not None
            else ""
        )
        print(
            f"round {record['round']:>3}/{self.job.spec.rounds}  "
            f"clients {record['reported']}/{record['selected']} "
            f"({100 * record['participation']:.0f}%)  "
            f"loss {'n/a' if loss is None else f'{loss:.4f}'}  "
            f"{perplexity}"
            f"{headline.label(evaluation)} "
            f"{headline.show(headline.value(record, evaluation), evaluation)}  "
            f"{_epsilon(record)}"
            f"up {human_bytes(record.get('bytes_up', 0))}  "
            f"down {human_bytes(record.get('bytes_down', 0))}  "
            f"{record['duration_s']:.2f}s"
            + (
                f"  no partial from {', '.join(record['missing_regions'])}"
                if record.get("missing_regions")
                else ""
            ),
            flush=True,
        )

    def event(self, message: str) -> None:
        """Something that happened to the run itself (a restart, an outage)."""
        if self.enabled:
            print(f"! {message}", flush=True)


def write_history(history: list[dict[str, Any]], out: Path, fmt: str) -> Path:
    if fmt == "csv":
        path = out / "history.csv"
        columns = [
            "round",
            "loss",
            "accuracy",
            "selected",
            "reported",
            "dropped",
            "participation",
            "duration_s",
            "bytes_up",
            "bytes_down",
            "duplicates",
            "late",
        ]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        return path
    path = out / "history.jsonl"
    path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in history))
    return path


def plot(
    history: list[dict[str, Any]], path: Path, title: str, evaluation: Evaluation | None = None
) -> Path:
    """The headline metric (left) and the held-out loss (right) per evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evaluation = evaluation or Evaluation()
    points = headline.evaluated(history, evaluation)
    scale = headline.scale(evaluation)
    losses = [r for r in history if r.get("loss") is not None]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(
        [n for n, _ in points], [scale * v for _, v in points], marker="o", color="tab:blue"
    )
    unit = " (%)" if headline.percent(evaluation) else ""
    better = "higher" if evaluation.goal == "maximize" else "lower"
    acc_ax.set(
        title=f"held-out {evaluation.metric} ({better} is better)",
        xlabel="round",
        ylabel=f"{evaluation.metric}{unit}",
    )
    acc_ax.grid(alpha=0.3)
    loss_ax.plot(
        [r["round"] for r in losses], [r["loss"] for r in losses], marker="o", color="tab:red"
    )
    loss_ax.set(title="held-out loss", xlabel="round", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    for axis in (acc_ax, loss_ax):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"fedkube: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(job: FederatedJob, result: RunResult) -> str:
    history = result.history
    lines = [
        f"fedkube run {job.name}: {result.status} in {result.wall_s:.1f}s"
        + (f" ({result.message})" if result.message else "")
    ]
    if history:
        last = history[-1]
        evaluation = job.spec.evaluation
        points = headline.evaluated(history, evaluation)
        best = headline.best(history, evaluation)
        losses = [r["loss"] for r in history if r.get("loss") is not None]
        name = evaluation.metric
        reported = sum(r["reported"] for r in history)
        selected = sum(r["selected"] for r in history)
        rows = [
            ("rounds closed", f"{last['round']} of {job.spec.rounds}"),
            (f"final {name}", headline.show(points[-1][1] if points else None, evaluation)),
            ("final loss", f"{losses[-1]:.4f}" if losses else "n/a"),
            (
                f"best {name}",
                f"{headline.show(best[1], evaluation)} (round {best[0]})" if best else "n/a",
            ),
            (
                "participation",
                f"{100 * reported / max(selected, 1):.1f}% "
                f"({reported}/{selected} updates, "
                f"{sum(r['dropped'] for r in history)} dropped)",
            ),
            (
                "bytes up / down",
                f"{human_bytes(sum(r['bytes_up'] for r in history))} / "
                f"{human_bytes(sum(r['bytes_down'] for r in history))}",
            ),
            ("mean round time", f"{sum(r['duration_s'] for r in history) / len(history):.2f}s"),
        ]
        if last.get("epsilon") is not None:
            rows.append(
                (
                    "privacy spent",
                    f"ε {float(last['epsilon']):.3f} at δ {last['delta']:g} "
                    f"(noise multiplier {last['noise_multiplier']:g})",
                )
            )
        if result.restarts:
            restarted = ", ".join(f"{name} {n}x" for name, n in sorted(result.restarts.items()))
            rows.append(("restarted", restarted))
        if result.history_path:
            rows.append(("history", str(result.history_path)))
        if result.plot_path:
            rows.append(("plot", str(result.plot_path)))
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
