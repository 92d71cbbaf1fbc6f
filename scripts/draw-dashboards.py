#!/usr/bin/env python3
"""Draw the job-overview dashboard's key panels from a real demo run, as PNGs for the docs.

Runs the digits example (a copy with ``--rounds`` rounds) with fedkube's own
runtime, a real Prometheus scraping every service each second, then asks
Prometheus for each panel's queries over the run (query_range) and draws them
with matplotlib. The queries are read from
charts/fedkube/dashboards/fedkube-job-overview.json, so the pictures show what
Grafana would show, not a re-implementation of it.

During the run the script plays a misbehaving client on purpose, so that the
rejected-updates panel has something to show: an old update replayed by one
hospital (rejected as late) and updates sent with a forged token
(unauthenticated).

    .venv/bin/python scripts/draw-dashboards.py [--rounds 150] [--out docs/img]

Needs prometheus (scripts/install-prometheus.sh) and redis-server (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    NullFormatter,
    PercentFormatter,
)

from fedkube.local.launcher import ProcessLauncher  # noqa: E402
from fedkube.local.runner import LocalRun, RunOptions  # noqa: E402
from tests.observability.support import (  # noqa: E402
    JOB_OVERVIEW,
    load_dashboard,
    panels,
    send_update,
    substitute,
    wait_service_targets,
)
from tests.prometheus import PrometheusServer, start_prometheus  # noqa: E402

EXAMPLE = ROOT / "examples" / "digits.yaml"
# The panels drawn, in reading order (titles in the dashboard JSON).
DRAWN = [
    "Round duration",
    "Model loss and accuracy",
    "Participation per region",
    "Updates accepted per round, by tenant",
    "Bytes up (updates and partials)",
    "Bytes down (models)",
    "Rejected updates by reason",
    "Aggregation time per tier",
]
STEP_S = 1.0
# Grafana's $__rate_interval for a 1 s scrape and a 1 s step is 4 s; a little
# more smooths the per-round sawtooth of a job whose rounds take about a second.
RATE_INTERVAL = "10s"
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def run_demo(workdir: Path, rounds: int) -> tuple[PrometheusServer, LocalRun, float, float]:
    """Run the demo job to its end under Prometheus; returns Prometheus and the run's span."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["rounds"] = rounds
    manifest = workdir / "digits.yaml"
    manifest.write_text(yaml.safe_dump(document))
    run = LocalRun(RunOptions(job_path=manifest, out_dir=workdir / "run"), ProcessLauncher())
    prometheus: PrometheusServer | None = None
    try:
        run.start()
        targets = wait_service_targets(run)
        prometheus = start_prometheus(workdir / "prometheus", {"fedkube": targets})
        prometheus.wait_targets_up()
        start = time.time()
        closed: list[float] = []
        status, message = run.follow(misbehave(run, rounds, closed))
        # Up to the last round's close: then the services exit one by one and
        # the panels would only show their rate windows draining.
        end = closed[-1] if closed else time.time()
        print(f"draw-dashboards: the demo job {status} ({message})", flush=True)
    except BaseException:
        if prometheus is not None:
            prometheus.stop()
        raise
    finally:
        run.stop()
    return prometheus, run, start, end


def misbehave(run: LocalRun, rounds: int, closed: list[float]) -> Callable[[dict[str, Any]], None]:
    """As rounds close, send updates that the combiners must reject.

    Each kind starts with one update and follows with more a few rounds later:
    a counter is born at its first increment, and rate() shows only the
    increments after that. ``closed`` gets the time each round was seen closed.
    """
    clients = [c.id for c in run.job.clients()]
    replays = {rounds // 4: 1, rounds // 4 + 6: 3}  # round closed -> old updates replayed
    forged = {rounds // 2: 1, rounds // 2 + 6: 4}  # round closed -> forged-token updates

    def on_round(record: dict[str, Any]) -> None:
        number = record["round"]
        closed.append(time.time())
        print(
            f"round {number:>3}/{rounds}  clients {record['reported']}/{record['selected']}"
            f"  acc {100 * (record.get('accuracy') or 0):.1f}%",
            flush=True,
        )
        for _ in range(replays.get(number, 0)):
            send_update(run, clients[0], round_no=1)  # late: round 1 closed long ago
        for _ in range(forged.get(number, 0)):
            send_update(run, clients[-1], round_no=number + 1, token="forged")

    return on_round


def label_of(legend: str, labels: dict[str, str]) -> str:
    return LEGEND.sub(lambda m: labels.get(m.group(1), ""), legend) or "value"


def seconds(value: float) -> str:
    if value >= 1:
        return f"{value:g} s"
    if value >= 0.001:
        return f"{value * 1000:g} ms"
    return f"{value * 1e6:g} µs"


def format_axis(axis: Axes, unit: str) -> None:
    """Axis ticks in the panel's unit, as Grafana would label them."""
    if unit == "percentunit":
        axis.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    elif unit == "Bps":
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:.0f} kB/s"))
    elif unit == "s":
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: seconds(v)))
    elif unit == "reqps":
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2f}/s"))


def draw_panel(
    axis: Axes,
    panel: dict[str, Any],
    prometheus: PrometheusServer,
    variables: dict[str, str],
    start: float,
    end: float,
) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    overrides = {
        o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
        for o in panel["fieldConfig"].get("overrides", [])
    }
    right: Axes | None = None
    drawn = 0
    for target in panel["targets"]:
        expr = substitute(target["expr"], variables)
        for series in prometheus.query_range(expr, start, end, STEP_S):
            name = label_of(target.get("legendFormat", ""), series["metric"])
            times = [float(t) - start for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            where = axis
            if overrides.get(name, {}).get("custom.axisPlacement") == "right":
                right = right or axis.twinx()
                where = right
                format_axis(right, overrides[name].get("unit", defaults["unit"]))
                right.set_ylim(overrides[name].get("min"), overrides[name].get("max"))
            color = f"C{drawn % 10}"
            where.plot(times, values, label=name, color=color, linewidth=1.6)
            drawn += 1
    format_axis(axis, defaults["unit"])
    if defaults["unit"] == "s" and drawn:
        # the first round includes the workers' start-up: seconds, then milliseconds
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_minor_formatter(NullFormatter())
        format_axis(axis, "s")
        axis.set_ylabel("log scale", fontsize=8)
    else:
        top = defaults.get("max")
        # a ratio that sits at 100% would hide under the frame
        axis.set_ylim(bottom=defaults.get("min"), top=top * 1.05 if top else None)
    axis.set_title(panel["title"], fontsize=11, loc="left")
    axis.set_xlabel("seconds since scraping began", fontsize=8)
    axis.grid(alpha=0.3)
    axis.tick_params(labelsize=8)
    handles, labels = axis.get_legend_handles_labels()
    if right is not None:
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
        right.tick_params(labelsize=8)
    if handles:
        axis.legend(handles, labels, fontsize=7, loc="best", ncol=2 if len(labels) > 4 else 1)
    else:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=150, help="rounds of the demo job")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    args = parser.parse_args(argv)

    dashboard = load_dashboard(JOB_OVERVIEW)
    by_title = {panel["title"]: panel for panel in panels(dashboard)}
    missing = [title for title in DRAWN if title not in by_title]
    if missing:
        parser.error(f"panels not in {JOB_OVERVIEW.name}: {missing}")

    with tempfile.TemporaryDirectory(prefix="fedkube-dashboards-") as workdir:
        prometheus, run, start, end = run_demo(Path(workdir), args.rounds)
        with prometheus:
            variables = {
                "job": run.job.name,
                "__rate_interval": RATE_INTERVAL,
                "__interval": f"{STEP_S:.0f}s",
            }
            figure, axes = plt.subplots(4, 2, figsize=(12, 13))
            for axis, title in zip(axes.flat, DRAWN, strict=True):
                draw_panel(axis, by_title[title], prometheus, variables, start, end)
            figure.suptitle(
                f"{dashboard['title']}: job {run.job.name}, {args.rounds} rounds, "
                f"{len(run.job.clients())} clients in {len(run.job.region_names())} regions\n"
                "(the demo sends a few bad updates on purpose: a replayed old update and "
                "forged tokens)",
                fontsize=12,
            )
            figure.tight_layout()
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / "dashboard-job-overview.png"
            figure.savefig(path, dpi=80)
            plt.close(figure)
    print(f"draw-dashboards: wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
