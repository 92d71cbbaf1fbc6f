"""Flower's half of benchmarks/vs_flower.py: one case in Flower's simulation engine.

Run with the Flower virtual environment (``scripts/flower-venv.sh`` builds it),
not fedkube's: Flower is no dependency of fedkube, and ``flwr[simulation]``
pins its own ``ray``::

    .cache/flower-venv/bin/python benchmarks/flower_side.py \\
        --clients 100 --per-round 100 --inputs 1000 --outputs 1000 --rounds 6

What runs: ``flwr.simulation.run_simulation`` (Ray backend, in this process)
with a ``ServerApp`` whose strategy is ``flwr.server.strategy.FedAvg``
(``fraction_fit = per_round / clients``, ``min_fit_clients = per_round``,
``fraction_evaluate = 0``, no ``evaluate_fn``: no evaluation at all) and the
initial parameters given (no round-trip to a client to fetch them), and a
``ClientApp`` whose ``NumPyClient.fit`` returns the parameters it received
unchanged with ``num_examples=1``: a client that does nothing. The model is
one dense layer as float32 numpy arrays, ``[inputs x outputs weight, outputs
bias]`` (1000 x 1000: 1,001,000 parameters), as ``bench_models.make_model``
on the fedkube side.

Measured (all wall clock, ``time.time()``):

* a round's ``start`` and ``end``: the strategy is subclassed so that
  ``configure_fit`` stamps ``start`` on entry and ``aggregate_fit`` stamps
  ``end`` when it returns. So a round spans sampling the clients, sending the
  model to each, their ``fit`` in Ray actors, the replies, and FedAvg's
  aggregation. Nothing else happens between rounds here (no evaluation), so
  ``end[n] - end[n-1]`` (the "period", what vs_flower.py compares) is the
  span plus Flower's loop bookkeeping.
* ``startup_s``: from this script's first line (before ``import flwr``) to the
  end of round 1, Ray's start-up included; ``launched_at`` lets a caller
  measure from its own launch instead.
* ``peak_rss_bytes``: the largest sum of RSS over this process and all of its
  descendants (Ray's GCS, raylet, agents and worker processes), sampled by a
  thread every ``--rss-interval`` seconds. Shared pages (Ray's object store in
  /dev/shm) count once per process that maps them: an upper bound.

Ray backend: ``client_resources = {num_cpus: --client-cpus, num_gpus: 0}``
on a Ray node with ``os.cpu_count()`` CPUs, so ``cpu_count / client_cpus``
actors run ClientApps. The legacy ``Server`` sends one message per client and
polls for its reply; ``--max-workers`` threads do so (default: per_round,
all sampled clients at once, instead of Flower's default thread pool of
``min(32, cpus + 4)``).

Prints one JSON line (the last line of stdout) with the results.
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports: start-up counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402


class TreeRSS(threading.Thread):
    """Peak memory of a process and all of its descendants: summed RSS and summed PSS.

    PSS (proportional set size) splits a page shared by several processes
    between them, so the sum counts it once; RSS counts it in every process
    that maps it (torch's libraries in each fedkube service, Ray's object
    store in each Ray worker). Used here for Flower's process tree and by
    vs_flower.py for a ``fedkube run`` (so it imports nothing but psutil).
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True, name="tree-rss")
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        import psutil

        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = pss = 0
        counted = 0
        for process in processes:
            try:
                memory = process.memory_full_info()
            except psutil.Error:
                continue
            total += memory.rss
            pss += memory.pss
            counted += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_processes = counted
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.samples += 1
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        self.sample()
        return self.peak_bytes


def round_timings(
    marks: dict[int, dict[str, Any]], t0: float, launched_at: float, finished: float, rss: TreeRSS
) -> dict[str, Any]:
    """The rounds from their ``start``/``end`` marks, their medians, start-up and peak memory.

    Shared by both Flower engines (this script and flower_deployment.py), so
    that a round, a period and start-up mean the same on each. ``t0`` is the
    calling script's first line; round 1 is the warm-up, left out of the medians.
    """
    rounds = [
        {"round": n, **marks[n], "span_s": marks[n]["end"] - marks[n]["start"]}
        for n in sorted(marks)
        if "start" in marks[n] and "end" in marks[n]
    ]
    periods = [b["end"] - a["end"] for a, b in zip(rounds, rounds[1:], strict=False)]
    spans = [r["span_s"] for r in rounds[1:]]
    return {
        "rounds": rounds,
        "periods_s": periods,  # end[n] - end[n-1], n >= 2
        "median_period_s": statistics.median(periods) if periods else None,
        "median_span_s": statistics.median(spans) if spans else None,
        "script_started_at": t0,
        "launched_at": launched_at,
        "startup_s": rounds[0]["end"] - t0 if rounds else None,
        "startup_from_launch_s": (
            rounds[0]["end"] - launched_at if rounds and launched_at else None
        ),
        "total_s": finished - t0,
        "peak_rss_bytes": rss.peak_bytes,
        "peak_pss_bytes": rss.peak_pss_bytes,
        "peak_rss_processes": rss.peak_processes,
        "rss_samples": rss.samples,
    }


def model_arrays(inputs: int, outputs: int) -> list[Any]:
    """``[weight (outputs x inputs), bias (outputs)]``, float32: as ``nn.Linear``."""
    import numpy as np

    rng = np.random.default_rng(7)
    bound = 1.0 / inputs**0.5
    return [
        rng.uniform(-bound, bound, size=(outputs, inputs)).astype(np.float32),
        np.zeros(outputs, np.float32),
    ]


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)

    marks: dict[int, dict[str, Any]] = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            marks.setdefault(server_round, {})["start"] = time.time()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            mark = marks.setdefault(server_round, {})
            mark["end"] = time.time()
            mark["results"] = len(results)
            mark["failures"] = len(failures)
            return out

    class DoNothing(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            return parameters, 1, {}

    def client_fn(context: Context) -> Any:
        return DoNothing().to_client()

    initial = ndarrays_to_parameters(model_arrays(args.inputs, args.outputs))
    params = args.inputs * args.outputs + args.outputs

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(
            fraction_fit=args.per_round / args.clients,
            fraction_evaluate=0.0,
            min_fit_clients=args.per_round,
            min_evaluate_clients=0,
            min_available_clients=args.clients,
            initial_parameters=initial,
            accept_failures=True,
        )
        server = Server(client_manager=SimpleClientManager(), strategy=strategy)
        server.set_max_workers(args.max_workers or args.per_round)
        return ServerAppComponents(server=server, config=ServerConfig(num_rounds=args.rounds))

    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "log_to_driver": args.verbose,
            "logging_level": logging.INFO if args.verbose else logging.ERROR,
        },
    }
    rss = TreeRSS(os.getpid(), args.rss_interval)
    rss.start()
    began = time.time()
    try:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=args.clients,
            backend_config=backend_config,
            verbose_logging=args.verbose,
        )
    finally:
        rss.stop()
    finished = time.time()

    timings = round_timings(marks, T0, args.launched_at, finished, rss)
    rounds = timings["rounds"]
    complete = len(rounds) == args.rounds and all(
        r["results"] == args.per_round and r["failures"] == 0 for r in rounds
    )
    return {
        "side": "flower",
        "flwr": _version("flwr"),
        "ray": _version("ray"),
        "python": sys.version.split()[0],
        "clients": args.clients,
        "per_round": args.per_round,
        "params": params,
        "shapes": [[args.outputs, args.inputs], [args.outputs]],
        "rounds_asked": args.rounds,
        "client_cpus": args.client_cpus,
        "actors": int(cpus / args.client_cpus),
        "max_workers": args.max_workers or args.per_round,
        "complete": complete,
        "simulation_started_at": began,
        **timings,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="simulated clients (nodes)")
    parser.add_argument("--per-round", type=int, required=True, help="clients sampled per round")
    parser.add_argument("--inputs", type=int, default=1000, help="weight columns")
    parser.add_argument("--outputs", type=int, default=1000, help="weight rows (and bias)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="Ray num_cpus per ClientApp: cpu_count / this actors (default 1)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=0,
        help="threads of the legacy Server sending to clients (default: per-round)",
    )
    parser.add_argument("--rss-interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument(
        "--launched-at", type=float, default=0.0, help="the caller's time.time() at launch"
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's logs")
    args = parser.parse_args()
    if not 1 <= args.per_round <= args.clients:
        parser.error("--per-round must be between 1 and --clients")
    result = run_case(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
