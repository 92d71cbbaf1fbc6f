"""``fedkube run``: the whole job on one machine (or a Ray cluster).

Starts a real ``redis-server`` (append-only, in the run directory), the
global aggregator, one combiner per region and every client's worker, each
in its own process (or Ray actor), talking over loopback HTTP exactly as the
pods do. Follows progress from Redis, and when the job ends writes the
history (JSONL or CSV), a PNG plot and a summary.

While the job runs it supervises like Kubernetes does: a service (or
redis-server) that exits is started again on the same port, the global
aggregator with ``--resume``, with a growing back-off and at most
``spec.backoffLimit`` restarts in all; then the run fails and names it.

Run directory layout (``runs/<job>`` by default)::

    redis/         Redis append-only file (round state; kept for --resume)
    checkpoints/   global model per round (safetensors + JSON)
    clients/       each client's durable state (SCAFFOLD's c_i), kept for --resume
    secrets/       tenant and region tokens and signing keys (mode 0600); the token
                   digests and public keys that combiners and the global tier check
    logs/          one JSON-lines log per process
    ports/         ports the services bound
    pids/          each service's process id (processes only; the chaos tests use them)
    history.jsonl  one record per round (or history.csv)
    plot.png       the headline metric (spec.evaluation.metric) and loss per round

Over 400 lines on purpose: :class:`LocalRun` is one supervisor (start in order,
follow Redis, restart what exited, stop) whose steps share its handles and
restart budget; where services start is :mod:`.launcher`, the run directory and
credentials :mod:`.run_dir`, the printing :mod:`.report`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from fedkube.local import report
from fedkube.local.launcher import Handle, Launcher, ProcessLauncher, wait_port
from fedkube.local.run_dir import credentials_for, prepare_dir, tls_for
from fedkube.policy import (
    Refusal,
    SitePolicy,
    check,
    data_binding_document,
    load_policy,
    refused_tenants,
)
from fedkube.service.web import AGGREGATOR_TOKEN_ENV, TOKEN_ENV
from fedkube.spec import load_job
from fedkube.state.redis_server import RedisServer
from fedkube.state.roundstate import job_prefix
from fedkube.wire import signing

RESTART_BACKOFF_S = (0.5, 10.0)  # first delay, cap (doubling), as a kubelet's crash back-off


@dataclass
class RunOptions:
    job_path: Path
    out_dir: Path | None = None
    resume: bool = False
    runtime: str = "process"
    ray_address: str | None = None
    redis_url: str | None = None
    quiet: bool = False
    history_format: str = "jsonl"
    extra_env: dict[str, str] = field(default_factory=dict)
    # A site policy (fedkube.policy) for this machine: refused tenants' workers
    # are not started and the rounds treat them as absent.
    policy_path: Path | None = None


@dataclass
class RunResult:
    status: str
    message: str
    history: list[dict[str, Any]]
    out_dir: Path
    wall_s: float
    history_path: Path | None = None
    plot_path: Path | None = None
    restarts: dict[str, int] = field(default_factory=dict)


class LocalRun:
    """One run of one job: the services it started and how to follow them."""

    def __init__(self, options: RunOptions, launcher: Launcher):
        self.options = options
        self.launcher = launcher
        self.job = load_job(options.job_path)
        self.out = (options.out_dir or Path("runs") / self.job.name).resolve()
        self.handles: dict[str, Handle] = {}
        # What started each service, to start it again the same way.
        self.launches: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.restarts: dict[str, int] = {}
        self._restart_at: dict[str, float] = {}
        self._redis_down_since: float | None = None
        self.stopping = False  # set by stop() (from another thread): follow() returns
        self.redis_server: RedisServer | None = None
        self.tls_dirs: dict[str, Path] = {}  # spec.transport.tls: who -> its folder (run_dir)
        self._client: redis.Redis | None = None
        self.policy: SitePolicy | None = (
            load_policy(options.policy_path) if options.policy_path else None
        )
        self.refusals: list[Refusal] = (
            # No image runs on this machine, so the images rule does not apply.
            [r for r in check(self.job, self.policy, None, "") if r.rule != "images"]
            if self.policy is not None
            else []
        )

    def start(self) -> None:
        job, out = self.job, self.out
        prepare_dir(out, self.options.resume)
        for part in ("logs", "ports", "pids"):
            (out / part).mkdir(parents=True, exist_ok=True)
        for stale in [*(out / "ports").glob("*"), *(out / "pids").glob("*")]:
            stale.unlink()
        credentials = credentials_for(out, job)
        self.tls_dirs = tls_for(out, job, self.launcher.service_hosts())
        tokens = credentials.tokens
        external = self.options.redis_url or job.spec.state.redis_url
        if external:
            self.redis_url = external
        else:
            self.redis_server = RedisServer(out / "redis", host=self.launcher.host).start()
            self.redis_url = self.redis_server.url
        job_file = str(self.options.job_path.resolve())
        refused = self._record_refusals()
        bindings = self._write_bindings()
        secrets_dir = out / "secrets"
        host = self.launcher.host
        argv = [
            "aggregator",
            "--job",
            job_file,
            "--redis-url",
            self.redis_url,
            "--checkpoint-dir",
            str(out / "checkpoints"),
            "--region-tokens",
            str(secrets_dir / "region-digests.json"),
            "--region-keys",
            str(secrets_dir / "region-keys.json"),
            "--host",
            host,
            "--port",
            "0",
            "--port-file",
            str(out / "ports" / "global"),
            *self._tls_args("global"),
        ]
        reserved = {name: self.launcher.reserve_port() for name in ["global", *job.region_names()]}
        argv[argv.index("--port") + 1] = str(reserved["global"] or 0)
        self._start(
            "global", argv + (["--resume"] if self.options.resume else []), self.options.extra_env
        )
        global_url = self._url("global", out / "ports" / "global", reserved["global"])
        combiner_urls: dict[str, str] = {}
        for region in job.region_names():
            self._start(
                f"combiner-{region}",
                [
                    "combiner",
                    "--job",
                    job_file,
                    "--region",
                    region,
                    "--redis-url",
                    self.redis_url,
                    "--global-url",
                    global_url,
                    "--tenant-tokens",
                    str(secrets_dir / "tenant-digests.json"),
                    "--tenant-keys",
                    str(secrets_dir / "tenant-keys.json"),
                    "--host",
                    host,
                    "--port",
                    str(reserved[region] or 0),
                    "--port-file",
                    str(out / "ports" / region),
                    *self._tls_args(f"region/{region}"),
                ],
                {
                    AGGREGATOR_TOKEN_ENV: credentials.region_tokens[region],
                    signing.SIGNING_KEY_ENV: credentials.region_keys[region],
                    **self.options.extra_env,
                },
            )
        for region in job.region_names():
            combiner_urls[region] = self._url(
                f"combiner-{region}", out / "ports" / region, reserved[region]
            )
        # Workers share this machine: give each a fair share of torch's threads
        # instead of letting every process spin up one thread per core.
        groups = job.worker_groups()
        threads = str(max(1, (os.cpu_count() or 1) // len(groups)))
        simulation = job.spec.simulation is not None
        for group in groups:
            if group.tenant in refused:
                continue
            binding = bindings.get(group.tenant)
            self._start(
                f"worker-{group.name}",
                [
                    "worker",
                    "--job",
                    job_file,
                    *group.worker_args(simulation),
                    "--combiner-url",
                    combiner_urls[group.region],
                    "--host",
                    host,
                    "--metrics-port",
                    "0",
                    "--port-file",
                    str(out / "ports" / f"worker-{group.name}"),
                    "--state-dir",
                    str(out / "clients"),
                    *(["--data-binding", str(binding)] if binding else []),
                    *self._tls_args(f"tenant/{group.tenant}"),
                ],
                {
                    TOKEN_ENV: tokens[group.tenant],
                    signing.SIGNING_KEY_ENV: credentials.signing_keys[group.tenant],
                    "OMP_NUM_THREADS": threads,
                    **self.options.extra_env,
                },
            )

        # Workers may start before their combiner listens (they retry); a service
        # that fails to start is still reported here, naming its log.
        for name, path in [
            ("global", "global"),
            *((f"combiner-{r}", r) for r in job.region_names()),
        ]:
            wait_port(out / "ports" / path, self.handles[name], self._log(name))

    def _url(self, name: str, port_file: Path, reserved: int | None) -> str:
        """Where ``name`` is reached: its reserved port, else the one it announces."""
        handle = self.handles[name]
        port = reserved or wait_port(port_file, handle, self._log(name))
        scheme = "https" if self.tls_dirs else "http"
        return f"{scheme}://{handle.url_host}:{port}"

    def _tls_args(self, who: str) -> list[str]:
        """``--tls-dir`` for ``who`` (``global``, ``region/<r>``, ``tenant/<t>``) under TLS."""
        return ["--tls-dir", str(self.tls_dirs[who])] if self.tls_dirs else []

    def _record_refusals(self) -> dict[str, str]:
        """Tell the round state who the policy refuses (exactly these, this run).

        The global aggregator reads the same key that a site's refusal lands
        in on a cluster, so a refused tenant is absent from every round.
        """
        refused = refused_tenants(self.refusals)
        key = job_prefix(self.job.name) + "refused"
        client = self._redis()
        client.delete(key)
        if refused:
            client.hset(key, mapping=refused)
        for tenant, message in sorted(refused.items()):
            print(f"tenant {tenant} refused by the policy: {message}", file=sys.stderr)
        return refused

    def _write_bindings(self) -> dict[str, Path]:
        """The policy's data bindings as files for the workers (mode 0600: may hold secrets)."""
        if self.policy is None or not self.policy.data_bindings:
            return {}
        folder = self.out / "secrets" / "bindings"
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for tenant, binding in self.policy.data_bindings.items():
            path = folder / f"{tenant}.json"
            path.touch(mode=0o600)
            path.write_text(json.dumps(data_binding_document(binding), sort_keys=True))
            written[tenant] = path
        return written

    def _log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.launches[name] = (argv, env)
        handle = self.launcher.start(name, argv, env, self._log(name))
        self.handles[name] = handle
        pid = getattr(handle, "pid", None)
        if pid is not None:
            (self.out / "pids" / name).write_text(str(pid))

    def follow(
        self,
        on_round: Callable[[dict[str, Any]], None],
        on_event: Callable[[str], None] = lambda _message: None,
    ) -> tuple[str, str]:
        """Report each closed round until the job ends; returns (status, message).

        Meanwhile restart what crashed (``on_event`` hears of it) and ride
        out a Redis outage, saying so once.
        """
        seen = 0
        while not self.stopping:
            try:
                for record in self.history(start=seen):
                    on_round(record)
                    seen += 1
                info = self._redis().hgetall(job_prefix(self.job.name) + "job")
            except redis.RedisError as exc:
                self._supervise_redis(on_event)
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    on_event(f"round state (Redis) unreachable: {exc}; the job waits for it")
                time.sleep(0.2)
                continue
            if self._redis_down_since is not None:
                down = time.monotonic() - self._redis_down_since
                on_event(f"round state (Redis) back after {down:.1f}s")
                self._redis_down_since = None
            status = info.get("status")
            if status in ("succeeded", "failed"):
                if self.handles["global"].poll() is not None:
                    for record in self.history(start=seen):
                        on_round(record)
                    return str(status), str(info.get("message", ""))
            else:
                failure = self._supervise(on_event)
                if failure:
                    return "failed", failure
            time.sleep(0.2)
        return "interrupted", "stopped before the job ended"

    def _supervise(self, on_event: Callable[[str], None]) -> str | None:
        """Start again what exited while the job runs; a message once the limit is hit."""
        self._supervise_redis(on_event)
        limit = self.job.spec.backoff_limit
        for name, handle in list(self.handles.items()):
            code = handle.poll()
            if code is None:
                continue
            used = sum(self.restarts.values())
            if used >= limit:
                return (
                    f"{name} exited with code {code} and the run already restarted services "
                    f"{used} times (spec.backoffLimit {limit}); see {self._log(name)}"
                )
            now = time.monotonic()
            due = self._restart_at.setdefault(name, now + self._backoff(name))
            if now < due:
                continue
            del self._restart_at[name]
            self.restarts[name] = self.restarts.get(name, 0) + 1
            on_event(
                f"{name} exited with code {code}: restarted "
                f"({sum(self.restarts.values())} of at most {limit} restarts)"
            )
            self._restart(name)
        return None

    def _backoff(self, name: str) -> float:
        first, cap = RESTART_BACKOFF_S
        return float(min(cap, first * 2 ** self.restarts.get(name, 0)))

    def _restart(self, name: str) -> None:
        """The same command on the same port (the others know it), the aggregator resuming."""
        argv, env = self.launches[name]
        argv = list(argv)
        if "--port" in argv and "--port-file" in argv:
            port = self.handles[name].read_port(Path(argv[argv.index("--port-file") + 1]))
            if port is not None:
                argv[argv.index("--port") + 1] = str(port)
        if name == "global" and "--resume" not in argv:
            argv.append("--resume")
        self._start(name, argv, env)

    def _supervise_redis(self, on_event: Callable[[str], None]) -> None:
        """The run's own redis-server, started again on its port from its append-only file."""
        server = self.redis_server
        if server is None or server.process is None or server.process.poll() is None:
            return
        code = server.process.poll()
        self.restarts["redis"] = self.restarts.get("redis", 0) + 1
        on_event(f"redis-server exited with code {code}: restarted from its append-only file")
        server.start()

    def history(self, start: int = 0) -> list[dict[str, Any]]:
        """Closed rounds' records from Redis, from the ``start``-th on."""
        items = self._redis().lrange(job_prefix(self.job.name) + "history", start, -1)
        return [json.loads(item) for item in items]

    def _redis(self) -> Any:
        """One client for following the run (decode_responses: replies are str)."""
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
            )
        return self._client

    def stop(self, grace_s: float = 15.0) -> None:
        """Let services exit on their own (the job ended), then terminate the rest."""
        self.stopping = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(h.poll() is None for h in self.handles.values()):
            time.sleep(0.1)
        for handle in self.handles.values():
            handle.terminate()
        for handle in self.handles.values():
            handle.wait(timeout=10)
        self.launcher.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.redis_server:
            self.redis_server.stop()


def make_launcher(options: RunOptions) -> Launcher:
    if options.runtime == "ray" or options.ray_address:
        from fedkube.local.ray_runtime import RayLauncher

        return RayLauncher(options.ray_address)
    return ProcessLauncher()


def run_job(options: RunOptions, launcher: Launcher | None = None) -> RunResult:
    """Run a job to its end and write its history, plot and summary."""
    started = time.monotonic()
    run = LocalRun(options, launcher or make_launcher(options))
    printer = report.ProgressPrinter(run.job, enabled=not options.quiet)
    printer.header(run.out, options.runtime)
    status, message, history = "interrupted", "stopped before the job ended", []
    try:
        run.start()
        status, message = run.follow(printer.round, printer.event)
        history = run.history()
    except KeyboardInterrupt:
        message = "stopped by the user"
    finally:
        run.stop(grace_s=15.0 if status != "interrupted" else 0.0)
    result = RunResult(
        status=status,
        message=message,
        history=history,
        out_dir=run.out,
        wall_s=time.monotonic() - started,
        restarts=dict(run.restarts),
    )
    if history:
        result.history_path = report.write_history(history, run.out, options.history_format)
        result.plot_path = report.plot(
            history, run.out / "plot.png", run.job.name, run.job.spec.evaluation
        )
    summary = report.summary(run.job, result)
    (run.out / "summary.txt").write_text(summary + "\n")
    if not options.quiet:
        print(summary)
    return result
