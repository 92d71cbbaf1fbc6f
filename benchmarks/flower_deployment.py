"""Flower's half of one benchmark case, run on Flower's deployment engine.

The same case as ``benchmarks/flower_side.py`` (FedAvg, clients that do
nothing, no evaluation), but instead of the simulation engine
(``run_simulation``, everything in one Ray-backed process) it runs the way a
Flower user deploys: a SuperLink and N SuperNodes as separate processes that
talk over loopback, and the app submitted with ``flwr run``. Run it with the
Flower virtual environment (``scripts/flower-venv.sh`` builds it)::

    .cache/flower-venv/bin/python benchmarks/flower_deployment.py \\
        --clients 20 --inputs 1000 --outputs 1000 --rounds 6

What runs, all in a fresh temporary directory (``FLWR_HOME`` points there,
so nothing in ``~/.flwr`` is read or written; ``UV_CACHE_DIR`` too;
telemetry and the update check are switched off with
``FLWR_TELEMETRY_ENABLED=0``/``FLWR_DISABLE_UPDATE_CHECK=1``, the machine may
be offline):

* a Flower App generated there: ``pyproject.toml`` (``[tool.flwr.app]``,
  ``[tool.flwr.app.components]``, the case in ``[tool.flwr.app.config]``, no
  dependencies besides the running flwr) and a package ``benchapp`` with
  ``server_app.py`` and ``client_app.py``.
* ``flower-superlink --insecure --port P``. In flwr 1.42 the SuperLink serves
  its Fleet, Control and Runtime APIs over HTTP (FastAPI/uvicorn) on that one
  port; the gRPC Fleet/Control servers of earlier releases are gone (only
  behind internal env switches), so ``--fleet-api-address`` and
  ``--control-api-address`` are deprecated no-ops.
* N x ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q_i
  --node-config 'partition-id=i num-partitions=N'``: each with its own Runtime
  HTTP API port ``Q_i`` (what ``--clientappio-api-address`` was; that flag is
  now rejected).
* ``flwr run <app> bench --stream``: the SuperLink connection ``bench``
  (``address = "127.0.0.1:P"``, ``insecure = true``) is written to
  ``$FLWR_HOME/config.toml`` (1.42 reads connections from there only; a
  ``[tool.flwr.federations]`` table in the app's pyproject is merely migrated
  into that file, so the app has none). It builds the FAB, submits it to the Control API and, with
  ``--stream``, blocks streaming the run's logs until the run finishes.
* Isolation: Flower's default, ``subprocess``, on both sides. It works offline
  here: the SuperLink starts a ``flower-superexec`` that launches one
  ``flwr-serverapp`` process for the run (which installs the FAB and does its
  runtime-dependency step, on by default on the SuperLink: a ``uv sync`` into
  a per-run venv, 0.2 s and no network without dependencies, then runs the
  ``ServerApp``); each SuperNode starts a ``flower-superexec`` that launches a
  fresh ``flwr-clientapp`` process for every message it gets (so one per
  client per round) to run the ``ClientApp``.
* ``ServerApp``: ``flwr.server.strategy.FedAvg`` subclassed as in
  flower_side.py (``TimedFedAvg``), ``fraction_fit = 1``,
  ``fraction_evaluate = 0``, ``min_fit_clients = min_available_clients = N``,
  the initial parameters given (``model_arrays``, the same arrays as
  flower_side.py), ``accept_failures``; the legacy ``Server`` with a
  ``SimpleClientManager`` and ``set_max_workers(N)``. It runs in the
  ``flwr-serverapp`` process Flower starts, so it writes its marks to a JSON
  file whose path comes in the run config (``marks-file``), after each
  ``configure_fit`` and ``aggregate_fit``.
* ``ClientApp``: a ``NumPyClient`` whose ``fit`` returns the parameters it got,
  unchanged, with ``num_examples=1``.

Logs of every process (SuperLink, SuperNodes with their SuperExec and
ClientApps, ``flwr run`` with the streamed ServerApp log) go to files under
``logs/`` in the temporary directory; ``--verbose`` also copies ``flwr run``'s
output (the ServerApp's log) to stderr as it comes.

Flower's own polling is left at its defaults, as a user gets it: an idle
SuperNode pulls the SuperLink for messages every 3 s, a SuperExec asks its
Runtime API for tasks every 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), so a
round here costs seconds whatever the model size. With many clients on few
cores the ClientApp processes dominate: each is a new interpreter importing
flwr (~1.8 s of CPU on the 2-core dev machine), N of them per round.

Measured (all wall clock, ``time.time()``, the same machine's clock in every
process):

* a round's ``start`` (``configure_fit`` entry) and ``end`` (``aggregate_fit``
  return) and ``span_s = end - start``: sampling, the model sent through the
  SuperLink to each SuperNode, a ClientApp process started for it, its fit,
  the reply back, FedAvg's aggregation. ``periods_s`` = ``end[n] -
  end[n-1]``; medians over rounds 2.. (round 1 is the warm-up).
* ``startup_s``: this script's first line to the end of round 1 (starting
  the SuperLink and SuperNodes, ``flwr run``, the ServerApp process, round 1);
  ``startup_from_launch_s``: the same from ``--launched-at``, the caller's
  launch of this script.
* ``peak_rss_bytes``/``peak_pss_bytes``: flower_side's ``TreeRSS`` over this
  process and all of its descendants, sampled every ``--rss-interval``
  seconds: the SuperLink, the SuperNodes, ``flwr run``, the SuperExecs, the
  ServerApp and ClientApp processes (and this small driver). The SuperLink
  starts its SuperExec in a new session (``start_new_session``) but as its own
  child, so every Flower process is a descendant of this one and is sampled;
  ``stray_processes`` counts, at the end of the run, processes in the
  sessions of ours that are not descendants (0 means nothing escaped
  sampling). ``rss_sample_s``: what one sample of the tree took, at the end of
  the run (the sampler competes for the same cores as Flower's processes).

Prints one JSON line (the last line of stdout) with the results, also when the
run fails (``complete`` false, ``error`` set); a failure exits non-zero with the
tail of each relevant process's log (kept in the temporary directory, which
is then left in place) on stderr. Every process started is stopped at the end
(SIGTERM to each session, SIGKILL after 10 s), on error and timeout too.
"""

from __future__ import annotations

import time

T0 = time.time()  # before the heavy imports: start-up counts from here

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_side import TreeRSS, _version, model_arrays, round_timings  # noqa: E402

CONNECTION = "bench"

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "benchapp"
version = "1.0.0"
description = "fedkube benchmark: FedAvg with clients that do nothing"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedkube"

[tool.flwr.app.components]
serverapp = "benchapp.server_app:app"
clientapp = "benchapp.client_app:app"

[tool.flwr.app.config]
clients = {clients}
rounds = {rounds}
inputs = {inputs}
outputs = {outputs}
marks-file = ""
"""

SERVER_APP = '''\
"""ServerApp of benchmarks/flower_deployment.py (generated): timed FedAvg."""

import json
import os
import time
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg


{model_arrays}

def server_fn(context: Context) -> ServerAppComponents:
    config = context.run_config
    clients = int(config["clients"])
    marks_file = str(config["marks-file"])
    marks: dict[str, dict[str, Any]] = {{}}

    def save() -> None:
        if not marks_file:
            return
        tmp = marks_file + ".tmp"
        with open(tmp, "w") as file:
            json.dump(marks, file)
        os.replace(tmp, marks_file)

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            marks.setdefault(str(server_round), {{}})["start"] = time.time()
            save()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            mark = marks.setdefault(str(server_round), {{}})
            mark["end"] = time.time()
            mark["results"] = len(results)
            mark["failures"] = len(failures)
            save()
            return out

    initial = ndarrays_to_parameters(model_arrays(int(config["inputs"]), int(config["outputs"])))
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        initial_parameters=initial,
        accept_failures=True,
    )
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    server.set_max_workers(clients)
    return ServerAppComponents(server=server, config=ServerConfig(num_rounds=int(config["rounds"])))


app = ServerApp(server_fn=server_fn)
'''

CLIENT_APP = '''\
"""ClientApp of benchmarks/flower_deployment.py (generated): a client that does nothing."""

from typing import Any

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context


class DoNothing(NumPyClient):
    def fit(self, parameters: Any, config: Any) -> Any:
        return parameters, 1, {}


def client_fn(context: Context) -> Any:
    return DoNothing().to_client()


app = ClientApp(client_fn=client_fn)
'''


class CaseFailed(RuntimeError):
    """The run did not finish: the message says why, the logs say more."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_app(app_dir: Path, args: argparse.Namespace) -> None:
    package = app_dir / "benchapp"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(
        PYPROJECT.format(
            clients=args.clients, rounds=args.rounds, inputs=args.inputs, outputs=args.outputs
        )
    )
    (package / "__init__.py").write_text("")
    (package / "server_app.py").write_text(
        SERVER_APP.format(model_arrays=inspect.getsource(model_arrays))
    )
    (package / "client_app.py").write_text(CLIENT_APP)


class Deployment:
    """The processes of one run, their logs, and stopping all of them."""

    def __init__(self, work: Path, env: dict[str, str], bin_dir: Path, verbose: bool):
        self.work = work
        self.env = env
        self.bin_dir = bin_dir
        self.verbose = verbose
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._files: list[IO[bytes]] = []
        self.exited_early: list[str] = []  # set by stop(): what had exited before it

    def start(self, name: str, argv: list[str], to_stderr: bool = False) -> None:
        """Start ``argv`` (a binary of the venv) in its own session, output to its log file
        (and, ``to_stderr``, copied to our stderr too)."""
        log_path = self.work / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        self.logs[name] = log_path
        log_file = open(log_path, "wb")  # closed in stop()
        self._files.append(log_file)
        proc = subprocess.Popen(
            [str(self.bin_dir / argv[0]), *argv[1:]],
            cwd=self.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if to_stderr else log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session and process group
        )
        self.procs[name] = proc
        if to_stderr:

            def tee() -> None:
                assert proc.stdout is not None
                try:
                    for line in proc.stdout:
                        log_file.write(line)
                        log_file.flush()
                        sys.stderr.buffer.write(line)
                        sys.stderr.buffer.flush()
                except (OSError, ValueError):  # the log file closed by stop()
                    return

            threading.Thread(target=tee, daemon=True, name=f"tee-{name}").start()

    def dead(self) -> list[str]:
        """The long-running processes (SuperLink, SuperNodes) that have exited."""
        return [
            f"{name} (exit {proc.returncode})"
            for name, proc in self.procs.items()
            if name != "flwr-run" and proc.poll() is not None
        ]

    def sessions(self) -> set[int]:
        """Session ids of our children and their descendants (SuperExec opens its own)."""
        import psutil

        sids = set()
        try:
            tree = psutil.Process().children(recursive=True)
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                sids.add(os.getsid(process.pid))
            except OSError:
                continue
        sids.discard(os.getsid(0))
        return sids

    def session_members(self, sids: set[int]) -> list[Any]:
        import psutil

        members = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and os.getsid(process.pid) in sids:
                    members.append(process)
            except (OSError, psutil.Error):
                continue
        return members

    def stray_processes(self) -> int:
        """Processes in our sessions that are not our descendants (TreeRSS misses them)."""
        import psutil

        try:
            descendants = {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return 0
        return sum(
            1
            for p in self.session_members(self.sessions())
            if p.pid not in descendants and p.status() != psutil.STATUS_ZOMBIE
        )

    def stop(self) -> None:
        """SIGTERM every process of ours (by session), SIGKILL what is left after 10 s."""
        import psutil

        self.exited_early = [n for n, p in self.procs.items() if p.poll() is not None]
        sids = self.sessions() | {proc.pid for proc in self.procs.values()}
        for attempt in range(3):
            members = self.session_members(sids)
            try:
                members += psutil.Process().children(recursive=True)
            except psutil.Error:
                pass
            members = list({p.pid: p for p in members}.values())
            if not members:
                break
            for process in members:
                try:
                    process.send_signal(signal.SIGTERM if attempt == 0 else signal.SIGKILL)
                except psutil.Error:
                    continue
            _, alive = psutil.wait_procs(members, timeout=10 if attempt == 0 else 5)
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        for file in self._files:
            file.close()

    def tails(self, lines: int = 40) -> str:
        """The last lines of the SuperLink's and ``flwr run``'s logs and of SuperNodes that
        exited on their own (else the first one's), then the ERROR lines of the other logs."""
        supernodes = sorted(n for n in self.logs if n.startswith("supernode-"))
        died = [n for n in supernodes if n in self.exited_early]
        names = ["superlink", "flwr-run", *(died or supernodes[:1])]
        out = []
        for name in names:
            path = self.logs.get(name)
            if path is None or not path.exists():
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {path} (last {len(text)} lines) -----")
            out.extend(text)
        errors = []
        for name in supernodes:
            if name in names or not self.logs[name].exists():
                continue
            for line in self.logs[name].read_text(errors="replace").splitlines():
                if "ERROR" in line:
                    errors.append(f"{name}: {line}")
        if errors:
            out.append(f"----- ERROR lines of the other SuperNodes' logs ({len(errors)}) -----")
            out.extend(errors[:lines])
        return "\n".join(out)


def wait_http(
    url: str, deadline: float, deployment: Deployment, what: str, ca: Path | None = None
) -> None:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if dead := deployment.dead():
            raise CaseFailed(f"exited before {what} was up: {', '.join(dead)}")
        if time.time() > deadline:
            raise CaseFailed(f"{what} not up ({url}) before the timeout")
        time.sleep(0.1)


def read_marks(path: Path) -> dict[int, dict[str, Any]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {int(n): mark for n, mark in raw.items()}


def run_status(deployment: Deployment, run_id: str | None) -> str | None:
    """``flwr ls --run-id`` after the run: e.g. ``finished:completed``."""
    if run_id is None:
        return None
    try:
        out = subprocess.run(
            [
                str(deployment.bin_dir / "flwr"),
                "ls",
                CONNECTION,
                "--run-id",
                run_id,
                "--format",
                "json",
            ],
            cwd=deployment.work,
            env=deployment.env,
            capture_output=True,
            text=True,
            timeout=20,
        )
        runs = json.loads(out.stdout).get("runs") or []
        return runs[0].get("status") if runs else None
    except (OSError, ValueError, subprocess.TimeoutExpired, AttributeError):
        return None


def run_case(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Run the case; returns the result and, if it failed, a message with the logs' tails."""
    deadline = T0 + args.timeout
    bin_dir = Path(sys.executable).parent  # the venv's bin/, not the resolved interpreter
    work = Path(tempfile.mkdtemp(prefix="flower-deployment-"))
    home = work / "flwr-home"
    home.mkdir()
    app_dir = work / "app"
    marks_file = work / "marks.json"
    write_app(app_dir, args)

    superlink_port, *node_ports = free_ports(1 + args.clients)
    # --tls-dir: the SuperLink serves TLS with that folder's certificate; the SuperNodes and
    # flwr run verify it against its ca.crt (Flower has no client certificates).
    tls: Path | None = Path(args.tls_dir).resolve() if args.tls_dir else None
    trust = f'root-certificates = "{tls / "ca.crt"}"' if tls else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{superlink_port}"\n{trust}\n'
    )
    link_tls = (
        [
            "--ssl-certfile",
            str(tls / "tls.crt"),
            "--ssl-keyfile",
            str(tls / "tls.key"),
            "--ssl-ca-certfile",
            str(tls / "ca.crt"),
        ]
        if tls
        else ["--insecure"]
    )
    node_tls = ["--root-certificates", str(tls / "ca.crt")] if tls else ["--insecure"]
    scheme = "https" if tls else "http"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "UV_CACHE_DIR": str(work / "uv-cache"),
        # SuperLink/SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    deployment = Deployment(work, env, bin_dir, args.verbose)
    rss = TreeRSS(os.getpid(), args.rss_interval)
    rss.start()
    error: str | None = None
    run_id: str | None = None
    stray = None
    sample_s = None
    status = None
    finished = None
    flwr_run_started = None
    try:
        deployment.start(
            "superlink", ["flower-superlink", *link_tls, "--port", str(superlink_port)]
        )
        for i, port in enumerate(node_ports):
            deployment.start(
                f"supernode-{i:03d}",
                [
                    "flower-supernode",
                    *node_tls,
                    "--superlink",
                    f"127.0.0.1:{superlink_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions={args.clients}",
                ],
            )
        wait_http(
            f"{scheme}://127.0.0.1:{superlink_port}/health",
            deadline,
            deployment,
            "SuperLink",
            tls / "ca.crt" if tls else None,
        )
        for i, port in enumerate(node_ports):
            wait_http(f"http://127.0.0.1:{port}/health", deadline, deployment, f"SuperNode {i}")

        flwr_run_started = time.time()
        deployment.start(
            "flwr-run",
            [
                "flwr",
                "run",
                str(app_dir),
                CONNECTION,
                "--stream",
                "--run-config",
                f'marks-file="{marks_file}"',
            ],
            to_stderr=args.verbose,
        )
        flwr_run = deployment.procs["flwr-run"]
        while flwr_run.poll() is None:
            if dead := deployment.dead():
                raise CaseFailed(f"exited during the run: {', '.join(dead)}")
            if time.time() > deadline:
                raise CaseFailed(f"timeout: the run did not finish within {args.timeout:g} s")
            time.sleep(0.1)
        finished = time.time()
        stray = deployment.stray_processes()
        sample_began = time.perf_counter()
        rss.sample()  # what one sample of the tree costs (the sampler shares the 2 cores)
        sample_s = time.perf_counter() - sample_began
        if flwr_run.returncode != 0:
            raise CaseFailed(f"flwr run exited {flwr_run.returncode}")
    except CaseFailed as err:
        error = str(err)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        try:
            run_log = deployment.logs.get("flwr-run")
            if run_log is not None and run_log.exists():
                found = re.search(
                    r"Successfully started run (\d+)", run_log.read_text("utf-8", "replace")
                )
                run_id = found.group(1) if found else None
            if deployment.procs.get("superlink") and deployment.procs["superlink"].poll() is None:
                status = run_status(deployment, run_id)
        finally:
            rss.stop()
            deployment.stop()
    if finished is None:
        finished = time.time()

    marks = read_marks(marks_file)
    timings = round_timings(marks, T0, args.launched_at, finished, rss)
    rounds = timings["rounds"]
    complete = (
        error is None
        and len(rounds) == args.rounds
        and all(r["results"] == args.clients and r["failures"] == 0 for r in rounds)
    )
    if error is None and not complete:
        error = f"incomplete: {len(rounds)} of {args.rounds} rounds, marks {marks}"
    result = {
        "side": "flower-deployment",
        "engine": (
            "flwr deployment engine: flower-superlink + "
            f"{args.clients} flower-supernode processes, on loopback, "
            f"{'TLS (SuperLink certificate)' if args.tls_dir else 'HTTP, --insecure'}, "
            "isolation subprocess (SuperExec -> flwr-serverapp, flwr-clientapp per message), "
            "submitted with flwr run --stream"
        ),
        "flwr": _version("flwr"),
        "python": sys.version.split()[0],
        "clients": args.clients,
        "per_round": args.clients,
        "params": args.inputs * args.outputs + args.outputs,
        "shapes": [[args.outputs, args.inputs], [args.outputs]],
        "rounds_asked": args.rounds,
        "complete": complete,
        "run_id": run_id,
        "run_status": status,
        "flwr_run_started_at": flwr_run_started,
        **timings,
        "rss_sample_s": sample_s,
        "stray_processes": stray,
    }
    if error:
        result["error"] = error
        result["workdir"] = str(work)
        tails = deployment.tails()  # the log files outlive the processes
        return result, f"flower_deployment: {error}\n{tails}\n(logs kept in {work})"
    if args.keep:
        result["workdir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True, help="SuperNode processes")
    parser.add_argument("--inputs", type=int, default=1000, help="weight columns")
    parser.add_argument("--outputs", type=int, default=1000, help="weight rows (and bias)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rss-interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument(
        "--launched-at", type=float, default=0.0, help="the caller's time.time() at launch"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds for everything (default 900)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--tls-dir",
        help="serve the SuperLink over TLS: a folder of ca.crt, tls.crt, tls.key (for 127.0.0.1)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="stream the run's logs (flwr run) to stderr"
    )
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be >= 1")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # run_case's finally stops every process

    signal.signal(signal.SIGTERM, terminate)
    result, failure = run_case(args)
    if failure:
        print(failure, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    if failure:
        sys.exit(1)


if __name__ == "__main__":
    main()
