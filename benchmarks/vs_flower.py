"""fedkube against Flower's simulation, same machine, same run, same model sizes.

Cases (FedAvg, clients that do nothing, no evaluation on the Flower side):

=============================  ===========================  =====================
case                           measured                     goal (fedkube/Flower)
=============================  ===========================  =====================
100 clients x 1M, all/round    median round time            <= 0.25x
20 clients x 10M, all/round    median round time            <= 0.25x
10,000 clients, 100/round, 1M  median round, peak memory   <= 1x
start-up to end of round 1     seconds                      <= 1x
=============================  ===========================  =====================

The model is one dense layer, as float32 arrays on both sides: ``[weight
(n x n), bias (n)]``. 1M = n 1000: 1,001,000 parameters; 10M = n 3162:
10,001,406 parameters (``bench_models.make_model`` = ``nn.Linear(n, n)`` on the
fedkube side, the same shapes as numpy arrays on Flower's).

What each side runs:

* Flower: ``benchmarks/flower_side.py`` in its own virtual environment
  (``.cache/flower-venv``, built by ``scripts/flower-venv.sh``: flwr[simulation]
  1.42.0 pins a ray other than fedkube's): ``flwr.simulation.run_simulation``
  with the Ray backend, ``flwr.server.strategy.FedAvg`` (fraction_fit =
  per_round / clients, fraction_evaluate 0, no evaluate_fn) and a
  ``NumPyClient`` whose ``fit`` returns the parameters it got, unchanged, with
  ``num_examples=1``. Ray: ``client_resources {num_cpus: 1, num_gpus: 0}`` on
  a node of ``cpu_count`` CPUs (2 actors on 2 cores), the legacy Server's
  send threads = clients per round. On 2 cores that was the fastest setting
  tried: num_cpus 0.5 and 0.25 (4, 8 actors) were within noise per round but
  slower to start and larger; num_cpus 2 (1 actor) and Flower's default 6
  send threads were ~1.5x slower per round. See flower_side.py's docstring.
* fedkube, 100 x 1M and 20 x 10M: ``round_overhead.run_scenario`` (the
  ``make bench`` machinery): a real redis-server, the GlobalAggregator and 2
  Combiners in this process, and do-nothing clients in a second process that
  speak the worker's wire protocol (poll for a task, ``GET`` the model, decode
  it, send a zero delta as safetensors): the closest HTTP equivalent of "return
  the parameters unchanged". 10 tenants x 10 replicas / 10 x 2, 2 regions.
* fedkube, 10,000 clients and start-up: the real CLI, ``fedkube run`` on a
  generated manifest, everything in its own processes (redis-server, global
  aggregator, combiners, workers), with real workers: ``bench_models:make_data``
  with ``samples: 1``, ``epochs: 1``, ``batchSize: 1``, i.e. one SGD step on
  one sample per selected client, which is the nearest a real worker gets to
  doing nothing. 10,000 clients = 2 tenants (one per region) x 5,000
  replicas under ``spec.simulation: {clientsPerWorker: 5000}`` (2 worker
  processes of 5,000 virtual clients, one per core), ``participation.fraction
  0.01`` (100 per round). Start-up = 10 clients x 1M on both sides: on
  fedkube 2 tenants x 5 virtual clients (2 worker processes).

* The deployment rows (``deploy``): every client a process of its own on both
  sides, ``fedkube run`` without ``spec.simulation`` against
  ``flower_deployment.py`` (a SuperLink and one SuperNode per client). The
  ``tls`` rows run the same again with every connection under TLS: fedkube
  with ``spec.transport.tls.mode: mutual`` (each worker and combiner presents
  its certificate, the run mints the CA), Flower with a certificate on the
  SuperLink (``--ssl-certfile``; SuperNodes and ``flwr run`` verify it against
  the CA; Flower has no client certificates). Their ratio to the plain rows
  is TLS's cost on each side.

What the numbers mean:

* round time: a round's span, from its start to its end. fedkube: from the
  global tier opening the round (selection, tasks handed out) to the round
  being closed (reduce, the checkpoint written, the next model published):
  ``closed_at - opened_at`` of the round's Redis hash for the in-process
  cases, the ``round opened`` -> ``round closed`` records of the run's
  ``logs/global.log`` (millisecond stamps) for ``fedkube run``. Flower: from
  ``configure_fit`` entry to ``aggregate_fit`` return (sample, send the model,
  clients' ``fit`` in Ray actors, replies, FedAvg's aggregation). On both sides
  the next round starts right after (Flower evaluates nothing; fedkube's next
  round opens on close), so spans add up to the run; the JSON also has the
  period between consecutive round ends. Median over rounds 2.., round 1 is a
  warm-up and discarded. fedkube evaluates the last round on the server (as
  the global tier always does); Flower does not: it is in the median's input.
* peak memory: the largest sum, over the whole process tree (``fedkube run``
  and its redis-server, services and workers; Flower's python and Ray's GCS,
  raylet, agents and worker processes), sampled every 0.2 s with psutil, of
  the proportional set sizes (PSS: a page shared by k processes counts 1/k
  in each, so once in the sum; the fair measure) and, beside it, of the
  resident set sizes (RSS: shared pages count once per process that maps
  them, e.g. torch's libraries in every fedkube service).
* start-up: from launching the command (``fedkube run ...``; ``python
  flower_side.py ...``, interpreter start, imports and Ray's start included)
  to the end of round 1.

Run::

    make bench-flower            # scripts/flower-venv.sh, then this
    .venv/bin/python benchmarks/vs_flower.py [--json results.json] [--rounds 6]
    .venv/bin/python benchmarks/vs_flower.py --quick   # seconds: a smoke run

``--quick``: every case, tiny (4 clients x 10,100 parameters; 2 x 90,300; 50
clients, 5 per round; start-up with 4 clients), 2 rounds: checks that the
machinery works, measures nothing. ``--cases`` runs some of them. A case that
fails prints ``n/a (reason)`` in its cells instead of stopping the table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # round_overhead, flower_side, bench_models

FLOWER_PYTHON = ROOT / ".cache" / "flower-venv" / "bin" / "python"
FLOWER_SIDE = HERE / "flower_side.py"
FLOWER_DEPLOYMENT = HERE / "flower_deployment.py"
CASE_TIMEOUT_S = 1200.0
# Flower's simulation of 100,000 clients did not finish 6 rounds in 20 minutes here.
FLEET_TIMEOUT_S = 3600.0
JOB_NAME = "vs-flower"


# -- sizes ------------------------------------------------------------------------
@dataclasses.dataclass
class Sizes:
    rounds: int
    c1_tenants: int  # case 1: tenants x replicas clients, n x n + n parameters
    c1_replicas: int
    c1_n: int
    c2_tenants: int
    c2_replicas: int
    c2_n: int
    c3_tenants: int
    c3_replicas: int
    c3_fraction: float
    c3_n: int
    startup_clients: int
    startup_n: int
    deploy_clients: int  # the deployment rows: this many clients, one process each
    deploy_ns: tuple[int, ...]
    fleet_tenants: int  # the 100,000-client row
    fleet_replicas: int
    fleet_fraction: float
    fleet_n: int

    @property
    def c3_clients(self) -> int:
        return self.c3_tenants * self.c3_replicas

    @property
    def c3_per_round(self) -> int:
        return round(self.c3_clients * self.c3_fraction)

    @property
    def fleet_clients(self) -> int:
        return self.fleet_tenants * self.fleet_replicas

    @property
    def fleet_per_round(self) -> int:
        return round(self.fleet_clients * self.fleet_fraction)


FULL = Sizes(
    rounds=6,
    c1_tenants=10,
    c1_replicas=10,
    c1_n=1000,
    c2_tenants=10,
    c2_replicas=2,
    c2_n=3162,
    c3_tenants=2,
    c3_replicas=5000,
    c3_fraction=0.01,
    c3_n=1000,
    startup_clients=10,
    startup_n=1000,
    deploy_clients=20,
    deploy_ns=(1000, 3162),
    fleet_tenants=2,
    fleet_replicas=50_000,
    fleet_fraction=0.01,
    fleet_n=100,
)
QUICK = Sizes(
    rounds=2,
    c1_tenants=2,
    c1_replicas=2,
    c1_n=100,
    c2_tenants=2,
    c2_replicas=1,
    c2_n=300,
    c3_tenants=2,
    c3_replicas=25,
    c3_fraction=0.1,
    c3_n=100,
    startup_clients=4,
    startup_n=100,
    deploy_clients=2,
    deploy_ns=(100,),
    fleet_tenants=2,
    fleet_replicas=100,
    fleet_fraction=0.05,
    fleet_n=10,
)
CASES = ("1", "2", "3", "startup", "deploy", "tls", "100k")


def params_of(n: int) -> int:
    return n * n + n


def human_params(n: int) -> str:
    count = params_of(n)
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}M"
    if count >= 1_000:
        return f"{count / 1e3:.0f}k"
    return str(count)


# -- fedkube: in-process services (round_overhead's machinery) ---------------------
def fedkube_overhead_case(
    name: str, tenants: int, replicas: int, n: int, rounds: int
) -> dict[str, Any]:
    """One no-training scenario of round_overhead.py: services here, clients in a 2nd process."""
    import round_overhead

    model = {"entrypoint": "bench_models:make_model", "kwargs": {"inputs": n, "outputs": n}}
    data = {"entrypoint": "bench_models:make_data", "kwargs": {"inputs": n, "classes": 10}}
    scenario = round_overhead.Scenario(
        name,
        round_overhead.manifest(name, rounds, tenants, replicas, model, data),
        "sim",
        "child",
    )
    round_overhead.SCENARIO_TIMEOUT_S = max(round_overhead.SCENARIO_TIMEOUT_S, CASE_TIMEOUT_S)
    result = asyncio.run(round_overhead.run_scenario(scenario))
    rows = result.rows  # rounds 2.., round 1 already discarded
    spans = [row["wall"] for row in rows]
    complete = result.status == "succeeded" and all(
        row["reported"] == row["selected"] == tenants * replicas for row in rows
    )
    return {
        "side": "fedkube",
        "how": "round_overhead.run_scenario, clients in a 2nd process",
        "clients": result.clients,
        "per_round": tenants * replicas,
        "params": result.params,
        "status": result.status,
        "complete": complete,
        "rounds": rows,
        "spans_s": spans,
        "median_span_s": statistics.median(spans) if spans else None,
        "total_s": result.total_s,
        "service_cpu_s_per_round": result.service_cpu_per_round,
        "client_cpu_s_per_round": result.client_cpu_per_round,
    }


# -- fedkube: the real CLI -----------------------------------------------------------
def cli_manifest(
    name: str,
    rounds: int,
    tenants: int,
    replicas: int,
    n: int,
    fraction: float = 1.0,
    clients_per_worker: int | None = None,
) -> dict[str, Any]:
    """A ``fedkube run`` manifest: real workers doing one SGD step on one sample."""
    regions = ["eu", "us"]
    spec: dict[str, Any] = {
        "rounds": rounds,
        "seed": 7,
        "model": {"entrypoint": "bench_models:make_model", "kwargs": {"inputs": n, "outputs": n}},
        "data": {
            "entrypoint": "bench_models:make_data",
            "kwargs": {"inputs": n, "classes": 10, "samples": 1},
        },
        "regions": [{"name": r} for r in regions],
        "tenants": [
            {"name": f"tenant-{i:02d}", "region": regions[i % len(regions)], "replicas": replicas}
            for i in range(tenants)
        ],
        "training": {"epochs": 1, "batchSize": 1},
        "participation": {
            "fraction": fraction,
            "minFraction": 0.5,
            "roundTimeoutSeconds": 120,
            "onQuorumMissed": "fail",
        },
        "strategy": {"name": "fedavg"},
        "evaluation": {"everyRounds": rounds + 1},  # only the last round evaluates
    }
    if clients_per_worker is not None:
        spec["simulation"] = {"clientsPerWorker": clients_per_worker}
    return {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def _log_time(stamp: str) -> float:
    """``2026-12-03T07:36:13.354Z`` (fedkube's JSON logs, UTC) as a Unix time."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def round_marks(log: Path) -> dict[int, dict[str, float]]:
    """``opened`` / ``closed`` times of each round from the global aggregator's log."""
    marks: dict[int, dict[str, float]] = {}
    if not log.exists():
        return marks
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message, number = str(record.get("msg", "")), record.get("round")
        if number is None or "ts" not in record:
            continue
        for prefix, key in (("round opened", "opened"), ("round closed", "closed")):
            if message.startswith(prefix):
                marks.setdefault(int(number), {})[key] = _log_time(record["ts"])
    return marks


def fedkube_cli_case(
    manifest: dict[str, Any], per_round: int, timeout_s: float = CASE_TIMEOUT_S
) -> dict[str, Any]:
    """``fedkube run`` on ``manifest``: round spans, start-up and peak memory of its process
    tree."""
    from flower_side import TreeRSS

    fedkube = Path(sys.executable).parent / "fedkube"
    if not fedkube.exists():
        raise RuntimeError(f"{fedkube} not found (run scripts/setup.sh)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="fedkube-vs-flower-") as tmp:
        job_path, out = Path(tmp) / "job.yaml", Path(tmp) / "run"
        # JSON is YAML: no yaml import needed here.
        job_path.write_text(json.dumps(manifest, indent=2))
        console = Path(tmp) / "console.log"
        with open(console, "wb") as sink:
            launched = time.time()
            process = subprocess.Popen(
                [str(fedkube), "run", str(job_path), "--out", str(out), "--quiet"],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed as one on timeout
            )
            rss = TreeRSS(process.pid)
            rss.start()
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                code = None
            finally:
                peak = rss.stop()
        finished = time.time()
        tail = console.read_text(errors="replace")[-2000:]
        history_path = out / "history.jsonl"
        history = (
            [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
            if history_path.exists()
            else []
        )
        marks = round_marks(out / "logs" / "global.log")
        global_tail = ""
        if code != 0:
            log = out / "logs" / "global.log"
            global_tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    if code is None:
        raise RuntimeError(f"fedkube run did not end within {timeout_s:.0f}s; its output: {tail}")
    if code != 0 or not history:
        raise RuntimeError(
            f"fedkube run exited {code} after {len(history)} rounds: {tail.strip()[-600:]} "
            f"{global_tail.strip()[-600:]}"
        )
    rounds = []
    for record in history:
        number = int(record["round"])
        mark = marks.get(number, {})
        span = (
            mark["closed"] - mark["opened"]
            if "opened" in mark and "closed" in mark
            else float(record["duration_s"])  # open -> record built, before the checkpoint
        )
        rounds.append(
            {
                "round": number,
                "span_s": span,
                "span_from": "log" if "opened" in mark and "closed" in mark else "duration_s",
                "duration_s": record["duration_s"],
                "selected": record["selected"],
                "reported": record["reported"],
                **mark,
            }
        )
    closes = [r["closed"] for r in rounds if "closed" in r]
    periods = [b - a for a, b in zip(closes, closes[1:], strict=False)]
    spans = [r["span_s"] for r in rounds[1:]]  # round 1 is the warm-up
    first_close = rounds[0].get("closed")
    return {
        "side": "fedkube",
        "how": "fedkube run (real CLI, processes)",
        "clients": sum(t["replicas"] for t in manifest["spec"]["tenants"]),
        "per_round": per_round,
        "params": params_of(manifest["spec"]["model"]["kwargs"]["inputs"]),
        "simulation": manifest["spec"].get("simulation"),
        "complete": all(r["reported"] == r["selected"] == per_round for r in rounds),
        "rounds": rounds,
        "history": history,
        "spans_s": spans,
        "median_span_s": statistics.median(spans) if spans else None,
        "periods_s": periods,
        "launched_at": launched,
        "startup_s": first_close - launched if first_close is not None else None,
        "total_s": finished - launched,
        "peak_rss_bytes": peak,
        "peak_pss_bytes": rss.peak_pss_bytes,
        "peak_rss_processes": rss.peak_processes,
    }


def fedkube_virtual_clients(sizes: Sizes) -> dict[str, Any]:
    """Case 3: 10,000 virtual clients (``spec.simulation``), 100 per round, via ``fedkube run``."""
    manifest = cli_manifest(
        f"{JOB_NAME}-fleet",
        sizes.rounds,
        sizes.c3_tenants,
        sizes.c3_replicas,
        sizes.c3_n,
        fraction=sizes.c3_fraction,
        clients_per_worker=sizes.c3_replicas,  # one worker process per tenant
    )
    return fedkube_cli_case(manifest, sizes.c3_per_round)


def fedkube_startup(sizes: Sizes) -> dict[str, Any]:
    """Start-up: ``fedkube run`` of startup_clients x 1M to round 1's end, as virtual
    clients (2 tenants, one worker process each), as Flower simulates them."""
    half = sizes.startup_clients // 2
    manifest = cli_manifest(
        f"{JOB_NAME}-startup", 2, 2, half, sizes.startup_n, clients_per_worker=half
    )
    return fedkube_cli_case(manifest, 2 * half)


def fedkube_deployment(sizes: Sizes, n: int, tls: bool = False) -> dict[str, Any]:
    """The deployment rows: ``fedkube run`` with every client a worker process of its own
    (no ``spec.simulation``), as each Flower SuperNode is a process of its own; with
    ``tls``, under ``spec.transport.tls.mode: mutual`` (the run mints its CA)."""
    tenants = sizes.deploy_clients // 2
    name = f"{JOB_NAME}-deploy-tls" if tls else f"{JOB_NAME}-deploy"
    manifest = cli_manifest(name, sizes.rounds, tenants, 2, n)
    if tls:
        manifest["spec"]["transport"] = {"tls": {"mode": "mutual"}}
    return fedkube_cli_case(manifest, sizes.deploy_clients)


def loopback_tls(folder: Path) -> Path:
    """A CA and a certificate for 127.0.0.1, for Flower's SuperLink (``--tls-dir``)."""
    from fedkube.service import certificates

    ca = certificates.mint_ca(JOB_NAME)
    leaf = certificates.mint_leaf(
        ca, certificates.identity(JOB_NAME, "global"), ["127.0.0.1", "localhost"]
    )
    return certificates.write(folder, ca.cert_pem, leaf)


def fedkube_fleet(sizes: Sizes) -> dict[str, Any]:
    """100,000 virtual clients (2 tenants x 50,000), 1,000 per round, a small model."""
    manifest = cli_manifest(
        f"{JOB_NAME}-fleet100k",
        sizes.rounds,
        sizes.fleet_tenants,
        sizes.fleet_replicas,
        sizes.fleet_n,
        fraction=sizes.fleet_fraction,
        clients_per_worker=sizes.fleet_replicas,
    )
    return fedkube_cli_case(manifest, sizes.fleet_per_round)


# -- Flower ---------------------------------------------------------------------------
def flower_deployment_case(
    clients: int, n: int, rounds: int, python: Path = FLOWER_PYTHON, tls: Path | None = None
) -> dict[str, Any]:
    """flower_deployment.py: SuperLink and one SuperNode per client, processes over HTTP;
    with ``tls`` (a folder of ca.crt, tls.crt, tls.key) the SuperLink serves TLS."""
    extra = [f"--tls-dir={tls}"] if tls else []
    return flower_case(clients, clients, n, rounds, python, script=FLOWER_DEPLOYMENT, extra=extra)


def flower_case(
    clients: int,
    per_round: int,
    n: int,
    rounds: int,
    python: Path = FLOWER_PYTHON,
    timeout_s: float = CASE_TIMEOUT_S,
    script: Path = FLOWER_SIDE,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """flower_side.py (or ``script``) in the Flower virtual environment; its JSON line."""
    if not python.exists():
        raise RuntimeError(f"{python} not found: run scripts/flower-venv.sh")
    with tempfile.TemporaryDirectory(prefix="flower-vs-fedkube-") as tmp:
        console = Path(tmp) / "stderr.log"
        with open(console, "wb") as sink:
            launched = time.time()
            argv = [
                str(python),
                str(script),
                f"--clients={clients}",
                *([f"--per-round={per_round}"] if script == FLOWER_SIDE else []),
                f"--inputs={n}",
                f"--outputs={n}",
                f"--rounds={rounds}",
                f"--launched-at={launched!r}",
                *extra,
            ]
            try:
                done = subprocess.run(
                    argv,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=sink,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout_s,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"{script.name} did not end within {timeout_s:.0f}s") from exc
        errors = console.read_text(errors="replace")
    lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} exited {done.returncode}: {errors.strip()[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    spans = [r["span_s"] for r in result["rounds"][1:]]
    result["spans_s"] = spans
    return result


# -- the table ------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    case: str
    goal: float | None  # fedkube / Flower at most this; None: reported, no goal
    unit: str  # "s" or "GB"
    fedkube: float | None = None
    flower: float | None = None
    fedkube_error: str | None = None
    flower_error: str | None = None
    # Sides ("fedkube", "Flower") where a round missed updates: marked with a *.
    incomplete: list[str] = dataclasses.field(default_factory=list)

    def cells(self) -> list[str]:
        def show(value: float | None, error: str | None, side: str) -> str:
            if value is None:
                return f"n/a ({error or 'not run'})"
            mark = "*" if side in self.incomplete else ""
            if self.unit == "s":
                return f"{value:.3f} s{mark}"
            return f"{value:.2f} {self.unit}{mark}"

        ratio = met = "n/a"
        if self.fedkube is not None and self.flower:
            value = self.fedkube / self.flower
            ratio = f"{value:.2f}x"
            met = "-" if self.goal is None else "yes" if value <= self.goal else "no"
        return [
            self.case,
            show(self.fedkube, self.fedkube_error, "fedkube"),
            show(self.flower, self.flower_error, "Flower"),
            ratio,
            "reported" if self.goal is None else f"<= {self.goal:g}x",
            met,
        ]


def attempt(label: str, fn: Any, *args: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Run one side of one case; ``(result, None)`` or ``(None, reason)``, never raising."""
    print(f"running: {label} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 -- a failed case is a table cell, not a crash
        traceback.print_exc(file=sys.stderr)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return None, reason[:300]
    print(f"  done in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    return result, None


def median_of(result: dict[str, Any] | None) -> float | None:
    if result is None or not result.get("spans_s"):
        return None
    return float(statistics.median(result["spans_s"]))


def machine() -> dict[str, Any]:
    memory = None
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        pass
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("fedkube", "torch", "ray", "aiohttp", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    wanted = set(args.cases.split(",")) if args.cases else set(CASES)
    flower_python = Path(args.flower_python)
    raw: dict[str, Any] = {"machine": machine(), "quick": args.quick, "cases": {}}
    rows: list[Row] = []

    def record(key: str, fedkube: Any, flower: Any) -> None:
        raw["cases"][key] = {
            "fedkube": fedkube[0],
            "fedkube_error": fedkube[1],
            "flower": flower[0],
            "flower_error": flower[1],
        }

    def add(key: str, row: Row) -> None:
        case = raw["cases"][key]
        for side, result in (("fedkube", case["fedkube"]), ("Flower", case["flower"])):
            if result is not None and not result.get("complete", True):
                row.incomplete.append(side)
        rows.append(row)

    # Cases 1 and 2: every client in every round, only the sizes and the goals differ.
    all_per_round = (
        ("1", sizes.c1_tenants, sizes.c1_replicas, sizes.c1_n, 0.33),
        ("2", sizes.c2_tenants, sizes.c2_replicas, sizes.c2_n, 0.5),
    )
    for key, tenants, replicas, n, goal in all_per_round:
        if key not in wanted:
            continue
        clients = tenants * replicas
        label = f"{clients} clients x {human_params(n)}, all/round: median round"
        fk = attempt(
            f"fedkube {label}",
            fedkube_overhead_case,
            f"{JOB_NAME}-c{key}",
            tenants,
            replicas,
            n,
            sizes.rounds,
        )
        fl = attempt(
            f"Flower {label}", flower_case, clients, clients, n, sizes.rounds, flower_python
        )
        record(key, fk, fl)
        add(key, Row(label, goal, "s", median_of(fk[0]), median_of(fl[0]), fk[1], fl[1]))

    def gb(result: dict[str, Any] | None, key: str) -> float | None:
        return None if result is None else result[key] / 2**30

    def fleet_rows(
        key: str, label: str, fk: Any, fl: Any, round_goal: float | None, memory_goal: float | None
    ) -> None:
        record(key, fk, fl)
        add(
            key,
            Row(
                f"{label}: median round",
                round_goal,
                "s",
                median_of(fk[0]),
                median_of(fl[0]),
                fk[1],
                fl[1],
            ),
        )
        for field, what in (("peak_pss_bytes", "PSS"), ("peak_rss_bytes", "RSS")):
            row = Row(
                f"{label}: peak memory ({what}), process tree",
                memory_goal,
                "GB",
                gb(fk[0], field),
                gb(fl[0], field),
                fk[1],
                fl[1],
            )
            add(key, row)

    if "3" in wanted:
        label = (
            f"{sizes.c3_clients:,} clients, {sizes.c3_per_round}/round, {human_params(sizes.c3_n)}"
        )
        fk = attempt(
            f"fedkube {label} (fedkube run, spec.simulation)", fedkube_virtual_clients, sizes
        )
        fl = attempt(
            f"Flower {label}",
            flower_case,
            sizes.c3_clients,
            sizes.c3_per_round,
            sizes.c3_n,
            sizes.rounds,
            flower_python,
        )
        fleet_rows("3", label, fk, fl, 0.25, 0.8)

    if "startup" in wanted:
        label = (
            f"start-up to end of round 1 ({sizes.startup_clients} clients x "
            f"{human_params(sizes.startup_n)})"
        )
        fk = attempt(f"fedkube {label}", fedkube_startup, sizes)
        fl = attempt(
            f"Flower {label}",
            flower_case,
            sizes.startup_clients,
            sizes.startup_clients,
            sizes.startup_n,
            2,
            flower_python,
        )
        record("startup", fk, fl)
        add(
            "startup",
            Row(
                label,
                0.5,
                "s",
                None if fk[0] is None else fk[0]["startup_s"],
                None if fl[0] is None else fl[0]["startup_from_launch_s"],
                fk[1],
                fl[1],
            ),
        )

    if "deploy" in wanted:
        for n in sizes.deploy_ns:
            key = f"deploy-{human_params(n)}"
            label = (
                f"deployment: {sizes.deploy_clients} clients x {human_params(n)}, "
                "a process each: median round"
            )
            fk = attempt(f"fedkube {label}", fedkube_deployment, sizes, n)
            fl = attempt(
                f"Flower {label}",
                flower_deployment_case,
                sizes.deploy_clients,
                n,
                sizes.rounds,
                flower_python,
            )
            record(key, fk, fl)
            add(key, Row(label, 0.25, "s", median_of(fk[0]), median_of(fl[0]), fk[1], fl[1]))

    if "tls" in wanted:
        # The deployment rows again, every connection under TLS: fedkube's mutual (each
        # worker and combiner presents its certificate), Flower's SuperLink certificate.
        with tempfile.TemporaryDirectory(prefix="vs-flower-tls-") as tmp:
            tls_dir = loopback_tls(Path(tmp))
            for n in sizes.deploy_ns:
                key = f"tls-{human_params(n)}"
                label = (
                    f"deployment under TLS: {sizes.deploy_clients} clients x "
                    f"{human_params(n)}, a process each: median round"
                )
                fk = attempt(f"fedkube {label} (mutual TLS)", fedkube_deployment, sizes, n, True)
                fl = attempt(
                    f"Flower {label} (SuperLink TLS)",
                    flower_deployment_case,
                    sizes.deploy_clients,
                    n,
                    sizes.rounds,
                    flower_python,
                    tls_dir,
                )
                record(key, fk, fl)
                add(key, Row(label, 0.25, "s", median_of(fk[0]), median_of(fl[0]), fk[1], fl[1]))

    if "100k" in wanted:
        label = (
            f"{sizes.fleet_clients:,} clients, {sizes.fleet_per_round:,}/round, "
            f"{human_params(sizes.fleet_n)}"
        )
        fk = attempt(f"fedkube {label} (fedkube run, spec.simulation)", fedkube_fleet, sizes)
        fl = attempt(
            f"Flower {label}",
            flower_case,
            sizes.fleet_clients,
            sizes.fleet_per_round,
            sizes.fleet_n,
            sizes.rounds,
            flower_python,
            FLEET_TIMEOUT_S,
        )
        fleet_rows("100k", label, fk, fl, None, None)

    raw["rows"] = [
        {
            "case": r.case,
            "unit": r.unit,
            "fedkube": r.fedkube,
            "flower": r.flower,
            "ratio": r.fedkube / r.flower if r.fedkube is not None and r.flower else None,
            "goal": r.goal,
            "fedkube_error": r.fedkube_error,
            "flower_error": r.flower_error,
        }
        for r in rows
    ]
    print_report(raw, rows, sizes)
    return raw


def print_report(raw: dict[str, Any], rows: list[Row], sizes: Sizes) -> None:
    info = raw["machine"]
    flower_versions = next(
        (
            f"flwr {case['flower']['flwr']}, its ray {case['flower']['ray']}"
            for case in raw["cases"].values()
            if case.get("flower")
        ),
        "flwr: not run",
    )
    memory = info["memory_bytes"]
    ram = f"{memory / 2**30:.1f} GiB RAM" if memory else "RAM unknown"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    title = "## fedkube vs Flower simulation"
    if raw["quick"]:
        title += " (--quick: smoke sizes, not a measurement)"
    print(f"\n{title}\n")
    print(f"{info['date']}; {info['cpus']} CPUs ({info['cpu_model']}), {ram}; {info['platform']}")
    print(f"Python {info['python']}; {versions}; {flower_versions}\n")
    header = ["case", "fedkube median", "Flower median", "ratio (fedkube/Flower)", "goal", "met?"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |")
    print(
        f"\nRound = its span, start to end (fedkube: global tier opens the round -> round closed, "
        f"checkpoint written and next model published; Flower: configure_fit entry -> "
        f"aggregate_fit return); median over rounds 2..{sizes.rounds}, round 1 discarded as "
        f"warm-up. Model: one dense layer, [n x n weight, n bias] float32 "
        f"(1M = 1,001,000; 10M = 10,001,406 parameters). FedAvg on both sides."
    )
    print(
        "Do-nothing clients: Flower's NumPyClient.fit returns the parameters it got "
        "(num_examples=1). fedkube, the all-per-round rows: clients in a 2nd process that "
        "fetch the model and send a zero delta over HTTP (round_overhead.py's machinery, "
        "services in-process). fedkube, the 10,000-client and start-up rows: the real "
        "`fedkube run` CLI and real workers doing one SGD step on one sample (samples 1, "
        "epochs 1, batchSize 1), the nearest a worker gets to doing nothing; "
        f"{sizes.c3_clients:,} clients = "
        f"{sizes.c3_tenants} tenants x {sizes.c3_replicas:,} virtual clients "
        f"(spec.simulation.clientsPerWorker {sizes.c3_replicas}), participation.fraction "
        f"{sizes.c3_fraction}."
    )
    if any(row.incomplete for row in rows):
        print("* a round on that side missed some selected clients' updates (see --json).")
    print(
        "Peak memory: max over 0.2 s samples of the summed PSS (each shared page counted once) "
        "and of the summed RSS (shared pages counted in every process) of the whole process "
        "tree (fedkube run + redis-server + services + workers; Flower's python + Ray's "
        "processes). Start-up: from launching the command to the end of round 1, virtual "
        "clients in 2 worker processes on fedkube, Ray start-up included on Flower. "
        "Flower: run_simulation, Ray "
        "backend, client_resources num_cpus 1 (cpu_count actors), Server send threads = "
        "clients per round."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 6, quick 2)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    parser.add_argument(
        "--cases", help=f"comma-separated subset of {','.join(CASES)} (default: all)"
    )
    parser.add_argument(
        "--flower-python",
        default=str(FLOWER_PYTHON),
        help="python of the Flower virtual environment (default .cache/flower-venv)",
    )
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 is a warm-up and is discarded")
    if args.cases and not set(args.cases.split(",")) <= set(CASES):
        parser.error(f"--cases takes a comma-separated subset of {','.join(CASES)}")
    raw = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2, default=str) + "\n")
        print(f"\nraw numbers: {args.json}")


if __name__ == "__main__":
    main()
