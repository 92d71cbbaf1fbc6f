"""Per-round orchestration overhead: round wall time minus the slowest worker's training.

Runs the real services (a ``redis-server``, the ``GlobalAggregator`` and one
``Combiner`` per region, all in this process on one asyncio loop, talking over
loopback HTTP) and drives them with clients that do exactly what
``fedkube.workers.runtime.Worker`` does on the wire: long-poll ``/v1/tasks``,
``GET /v1/model/{version}``, decode it, encode a delta as safetensors, sign it
with the tenant's key (a SHA-256 pass over the body, as the combiner's check is)
and ``POST /v1/update``. Scenarios:

* 8 tenants, real ``Worker`` objects training the digits example (1 replica each);
  overhead = round wall - slowest worker's training time that round.
* 8 tenants, clients that do no training on a 1,001,000-parameter model.
* 100 clients (10 tenants x 10 replicas, 2 regions), no training, same model:
  clients in a separate process (2 cores here: services on one, clients on the
  other, closer to a deployment where clients are other machines), and again
  with everything in one process (clients share the services' event loop, so
  their HTTP and (de)serialisation work is counted as overhead too).

"No training" means a delta of zeros is sent as soon as the model arrived:
training time is 0 and the whole round wall time is overhead.

Round wall time = ``closed_at - opened_at`` of the round's Redis hash: from the
global tier opening the round to the round being closed (after reduction,
evaluation when due, the checkpoint write and publishing the next model). The
history's ``duration_s`` (open -> record built, i.e. before the checkpoint
write) is shown too. The first round of each scenario is a warm-up and is
discarded. Evaluation: ``evaluation.everyRounds`` is set above ``rounds`` so
only the last round evaluates (the global tier always evaluates the last
round); that round is included in the statistics.

Run:  .venv/bin/python benchmarks/round_overhead.py   (``make bench``)

``--quick`` runs every scenario with 2 rounds (1 measured), a 10,100-parameter
model and 1 epoch of digits: seconds, not a measurement. The smoke test in
tests/integration/test_benchmarks.py runs it so that a change to the services
breaks ``make test``, not only ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_models:make_model / make_data

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from fedkube.aggregator.combiner import Combiner, CombinerConfig  # noqa: E402
from fedkube.aggregator.global_aggregator import GlobalAggregator, GlobalConfig  # noqa: E402
from fedkube.service.bodies import read_response  # noqa: E402
from fedkube.service.metrics import Metrics  # noqa: E402
from fedkube.service.web import digest, upload  # noqa: E402
from fedkube.spec import Client, FederatedJob, parse_job  # noqa: E402
from fedkube.state.redis_server import RedisServer  # noqa: E402
from fedkube.wire import codec, signing  # noqa: E402
from fedkube.wire.protocol import (  # noqa: E402
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    Envelope,
)

SCENARIO_TIMEOUT_S = 150.0
SIM_WEIGHT = 64.0


# -- manifests ------------------------------------------------------------------
def manifest(
    name: str,
    rounds: int,
    tenants: int,
    replicas: int,
    model: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    regions = ["eu", "us"]
    return {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "rounds": rounds,
            "seed": 7,
            "model": model,
            "data": data,
            "regions": [{"name": r} for r in regions],
            "tenants": [
                {
                    "name": f"tenant-{i:02d}",
                    "region": regions[i % len(regions)],
                    "replicas": replicas,
                }
                for i in range(tenants)
            ],
            "training": training or {"epochs": 1},
            "participation": {
                "fraction": 1.0,
                "minFraction": 0.5,
                "roundTimeoutSeconds": 60,
                "onQuorumMissed": "fail",
            },
            "strategy": {"name": "fedavg", "serverLearningRate": 1.0},
            "evaluation": {"everyRounds": rounds + 1},  # only the last round evaluates
            "state": {"keyTtlSeconds": 3600},
        },
    }


BENCH_MODEL = {"entrypoint": "bench_models:make_model", "kwargs": {"inputs": 1000, "outputs": 1000}}
BENCH_DATA = {"entrypoint": "bench_models:make_data", "kwargs": {"inputs": 1000, "classes": 10}}
# --quick: the same scenarios with a 10,100-parameter model.
QUICK_MODEL = {"entrypoint": "bench_models:make_model", "kwargs": {"inputs": 100, "outputs": 100}}
QUICK_DATA = {"entrypoint": "bench_models:make_data", "kwargs": {"inputs": 100, "classes": 10}}
DIGITS_MODEL = {"entrypoint": "fedkube.examples.digits:make_model", "kwargs": {"hidden": 128}}
DIGITS_DATA = {
    "entrypoint": "fedkube.examples.digits:make_data",
    "partition": {"scheme": "dirichlet", "alpha": 0.5},
    "testFraction": 0.2,
}
# As in examples/digits.yaml.
DIGITS_TRAINING = {
    "epochs": 3,
    "batchSize": 16,
    "optimizer": "sgd",
    "learningRate": 0.05,
    "momentum": 0.9,
}


@dataclass
class Scenario:
    label: str
    manifest: dict[str, Any]
    mode: str  # "sim": no training; "worker": real fedkube Worker objects
    clients_where: str  # "child": a separate process; "inproc": the services' event loop


# -- clients ------------------------------------------------------------------
def client_headers(job: FederatedJob, client: Client, token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        H_JOB: job.name,
        H_TENANT: client.tenant,
        H_CLIENT: client.id,
    }


async def sim_client(
    job: FederatedJob,
    client: Client,
    url: str,
    token: str,
    key: signing.SigningKey,
    stats: dict[str, Any],
) -> None:
    """A worker that trains for zero seconds: the same HTTP exchange as Worker._serve_round,
    its update signed as a Worker signs it."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(
        headers=client_headers(job, client, token), timeout=timeout
    ) as http:
        last = 0
        while True:
            poll = {"clients": [client.id], "after": last, "wait": 20}
            async with http.post(f"{url}/v1/tasks", json=poll) as response:
                response.raise_for_status()
                answer = await response.json()
            if answer["status"] == "done":
                return
            tasks = [t for t in answer.get("tasks", []) if t["status"] == "train"]
            if not tasks:
                continue
            task = tasks[0]
            number, version = int(task["round"]), int(task["version"])
            marks = stats["marks"].setdefault(str(number), {"task": [], "model": [], "done": []})
            marks["task"].append(time.time())
            async with http.get(f"{url}/v1/model/{version}") as response:
                response.raise_for_status()
                payload = await read_response(response)  # as the worker reads it
            marks["model"].append(time.time())
            tensors, _meta = codec.decode(payload)
            delta = {name: np.zeros(array.shape, np.float32) for name, array in tensors.items()}
            envelope = Envelope(job.name, number, client.id, client.tenant, SIM_WEIGHT)
            encoded = codec.encode_parts(delta, envelope.metadata("update"))
            digest = signing.payload_digest(encoded.chunks())
            body, framing = upload(encoded)
            headers = {
                H_ROUND: str(number),
                H_WEIGHT: repr(SIM_WEIGHT),
                H_CODEC: codec.CODEC,
                H_SIGNATURE: signing.sign(key, job.name, number, client.id, digest),
                **framing,
            }
            while True:
                async with http.post(f"{url}/v1/update", data=body, headers=headers) as response:
                    answer = await response.json(content_type=None)
                if answer.get("error") != "busy":
                    break
                # As a Worker does: the same update again once the combiner has room.
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                body, _framing = upload(encoded)
            marks["done"].append(time.time())
            last = number
            if response.status >= 300:
                stats["refused"].append([number, client.id, answer.get("error")])


class TrainingTimes(logging.Handler):
    """Each Worker's training seconds per round, from its public metric and log.

    A Worker observes ``fedkube_worker_train_seconds`` once it has trained a
    round, then logs what became of the update with ``round`` and ``client``
    fields. At that record, the growth of the worker's histogram sum since its
    previous record is the round's training time: no reaching into the
    Worker's internals, which could change under the benchmark unnoticed.
    """

    def __init__(self, job: FederatedJob, metrics: dict[str, Metrics], into: dict[str, Any]):
        super().__init__(logging.INFO)
        self.job = job
        self.metrics = metrics
        self.into = into
        self.clients = {c.id: c for c in job.clients()}
        self.seen = dict.fromkeys(metrics, 0.0)

    def emit(self, record: logging.LogRecord) -> None:
        client, number = getattr(record, "client", None), getattr(record, "round", None)
        if client not in self.metrics or number is None:
            return
        labels = {
            "job": self.job.name,
            "region": self.clients[client].region,
            "tenant": self.clients[client].tenant,
        }
        total = self.metrics[client].registry.get_sample_value(
            "fedkube_worker_train_seconds_sum", labels
        )
        grown = (total or 0.0) - self.seen[client]
        self.seen[client] = total or 0.0
        if grown > 0:
            per_client = self.into.setdefault(str(number), {})
            per_client[client] = per_client.get(client, 0.0) + grown


async def run_clients(config: dict[str, Any], ready: asyncio.Event | None = None) -> dict[str, Any]:
    """Run every client of the job to the job's end; returns per-round training times."""
    job = parse_job(config["manifest"])
    urls, tokens = config["urls"], config["tokens"]
    keys = {
        tenant: signing.load_signing_key(text, f"signing key of {tenant}")
        for tenant, text in config["signing_keys"].items()
    }
    stats: dict[str, Any] = {"refused": [], "train_s": {}, "marks": {}}
    worker_log = logging.getLogger("fedkube.worker")
    timing: TrainingTimes | None = None
    if config["mode"] == "sim":
        # "skip_tenants": tenants whose clients someone else plays (hostile_load.py's attacker).
        skip = set(config.get("skip_tenants", ()))
        coros = [
            sim_client(job, c, urls[c.region], tokens[c.tenant], keys[c.tenant], stats)
            for c in job.clients()
            if c.tenant not in skip
        ]
    else:
        import torch

        from fedkube.workers.runtime import Worker, WorkerConfig

        torch.set_num_threads(1)  # 8 workers in one process on 2 cores: no oversubscription

        clients = job.clients()
        # One executor thread per worker, as if each had its own process.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=len(clients) + 2)
        )
        stop = asyncio.Event()
        workers = [
            Worker(
                WorkerConfig(
                    job=job,
                    clients=[c],
                    combiner_url=urls[c.region],
                    token=tokens[c.tenant],
                    signing_key=keys[c.tenant],
                )
            )
            for c in clients
        ]
        timing = TrainingTimes(job, {w.name: w.metrics for w in workers}, stats["train_s"])
        worker_log.addHandler(timing)
        worker_log.setLevel(logging.INFO)  # the per-round record is logged at INFO
        coros = [w.run(stop) for w in workers]
    if ready is not None:
        ready.set()
    else:
        print("READY", flush=True)
    cpu = time.process_time()
    try:
        await asyncio.gather(*coros)
    finally:
        if timing is not None:
            worker_log.removeHandler(timing)
            worker_log.setLevel(logging.NOTSET)
    stats["cpu_s"] = time.process_time() - cpu
    return stats


def client_child_main() -> None:
    """``--client-child``: read the config from stdin, print READY, then the stats as JSON."""
    config = json.loads(sys.stdin.read())
    stats = asyncio.run(run_clients(config))
    print(json.dumps(stats), flush=True)


async def start_child(
    script: Path, flag: str, config: dict[str, Any]
) -> asyncio.subprocess.Process:
    """``script FLAG`` in a process of its own, given ``config`` on stdin; once it says READY."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        flag,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps(config).encode())
    child.stdin.close()
    line = await asyncio.wait_for(child.stdout.readline(), 120)
    if line.strip() != b"READY":
        raise RuntimeError(f"{script.name} {flag} did not start: {line!r}")
    return child


async def last_json_line(child: asyncio.subprocess.Process) -> dict[str, Any]:
    """What a child printed last (its result, as JSON), once it has exited."""
    assert child.stdout is not None
    out = await asyncio.wait_for(child.stdout.read(), 120)
    await child.wait()
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


# -- one scenario ---------------------------------------------------------------
@dataclass
class Result:
    scenario: Scenario
    clients: int
    params: int
    model_bytes: int
    status: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per measured round
    refused: list[Any] = field(default_factory=list)
    total_s: float = 0.0
    service_cpu_per_round: float = 0.0
    client_cpu_per_round: float | None = None  # None: clients share the services' process


@dataclass
class Services:
    """The services of one job, running in this process, and what a client needs to reach them."""

    agg: GlobalAggregator
    combiners: list[Combiner]
    redis: RedisServer
    tokens: dict[str, str]  # tenant -> bearer token
    signing_keys: dict[str, str]  # tenant -> private key (base64)

    def client_config(self, manifest: dict[str, Any], mode: str) -> dict[str, Any]:
        """What :func:`run_clients` (here or in a child process) takes, as JSON."""
        return {
            "manifest": manifest,
            "mode": mode,
            "tokens": self.tokens,
            "signing_keys": self.signing_keys,
            "urls": {c.region: f"http://127.0.0.1:{c.port}" for c in self.combiners},
        }


@contextlib.asynccontextmanager
async def running_services(job: FederatedJob) -> AsyncIterator[Services]:
    """redis-server, the global aggregator and a combiner per region, with fresh credentials."""
    tokens = {t.name: secrets.token_urlsafe(24) for t in job.spec.tenants}
    key_pairs = {t.name: signing.generate_key() for t in job.spec.tenants}
    region_tokens = {r: secrets.token_urlsafe(24) for r in job.region_names()}
    region_keys = {r: signing.generate_key() for r in job.region_names()}
    with tempfile.TemporaryDirectory(prefix="fedkube-bench-") as tmp, RedisServer() as redis:
        agg = GlobalAggregator(
            GlobalConfig(
                job=job,
                redis_url=redis.url,
                checkpoint_dir=Path(tmp) / "checkpoints",
                region_digests={r: digest(tok) for r, tok in region_tokens.items()},
                region_keys={
                    r: signing.load_verify_key(public, f"public key of {r}")
                    for r, (_private, public) in region_keys.items()
                },
            )
        )
        await agg.start()
        combiners: list[Combiner] = []
        try:
            for region in job.region_names():
                combiner = Combiner(
                    CombinerConfig(
                        job=job,
                        region=region,
                        redis_url=redis.url,
                        global_url=f"http://127.0.0.1:{agg.port}",
                        tenant_digests={name: digest(tok) for name, tok in tokens.items()},
                        tenant_keys={
                            name: signing.load_verify_key(public, f"public key of {name}")
                            for name, (_private, public) in key_pairs.items()
                        },
                        aggregator_token=region_tokens[region],
                        signing_key=signing.load_signing_key(
                            region_keys[region][0], f"signing key of {region}"
                        ),
                    )
                )
                await combiner.start()
                combiners.append(combiner)
            yield Services(
                agg,
                combiners,
                redis,
                tokens,
                {name: private for name, (private, _public) in key_pairs.items()},
            )
        finally:
            for combiner in combiners:
                await combiner.drain()
                await combiner.stop()
            await agg.stop()


async def run_scenario(sc: Scenario) -> Result:
    job = parse_job(sc.manifest)
    started = time.perf_counter()
    async with running_services(job) as services:
        agg, redis = services.agg, services.redis
        config = services.client_config(sc.manifest, sc.mode)
        params = sum(int(a.size) for a in agg.weights.values())
        model_bytes = sum(int(a.nbytes) for a in agg.weights.values())

        child = None
        client_task: asyncio.Task[dict[str, Any]] | None = None
        if sc.clients_where == "child":
            child = await start_child(Path(__file__), "--client-child", config)
        else:
            ready = asyncio.Event()
            client_task = asyncio.create_task(run_clients(config, ready))
            await ready.wait()

        try:
            cpu, redis_cpu = time.process_time(), proc_cpu_s(redis.process.pid)
            status = await asyncio.wait_for(agg.run(), SCENARIO_TIMEOUT_S)
            service_cpu = time.process_time() - cpu + proc_cpu_s(redis.process.pid) - redis_cpu
            if child is not None:
                stats = await last_json_line(child)
            else:
                assert client_task is not None
                stats = await asyncio.wait_for(client_task, 60)
            history = await agg.store.history()
            hashes = {
                r["round"]: await agg.store.redis.hgetall(agg.store.key("round", r["round"]))
                for r in history
            }
        finally:
            if child is not None and child.returncode is None:
                child.kill()
                await child.wait()
            if client_task is not None and not client_task.done():
                client_task.cancel()
                with contextlib.suppress(BaseException):
                    await client_task

    result = Result(
        sc,
        len(job.clients()),
        params,
        model_bytes,
        status,
        refused=stats["refused"],
        total_s=time.perf_counter() - started,
        service_cpu_per_round=service_cpu / len(history),
        client_cpu_per_round=(
            stats["cpu_s"] / len(history) if sc.clients_where == "child" else None
        ),
    )
    for record in history[1:]:  # round 1 is the warm-up
        number = record["round"]
        info = hashes[number]
        wall = float(info["closed_at"]) - float(info["opened_at"])
        trains = stats["train_s"].get(str(number), {})
        if sc.mode == "worker" and len(trains) < record["reported"]:
            # Without them the overhead would silently be the whole round wall time.
            raise RuntimeError(
                f"{sc.label}: round {number} has training times for {len(trains)} workers, "
                f"{record['reported']} reported"
            )
        slowest = max(trains.values()) if trains else 0.0
        result.rows.append(
            {
                "round": number,
                "wall": wall,
                "duration": record["duration_s"],
                "slowest_train": slowest,
                "overhead": wall - slowest,
                "reported": record["reported"],
                "selected": record["selected"],
                "bytes": record["bytes_up"] + record["bytes_down"],
                "evaluated": record["accuracy"] is not None,
            }
        )
        marks = stats["marks"].get(str(number))
        if marks and len(marks["done"]) == record["selected"]:
            opened, closed = float(info["opened_at"]), float(info["closed_at"])
            result.rows[-1]["phases"] = (
                max(marks["task"]) - opened,
                max(marks["model"]) - opened,
                max(marks["done"]) - opened,
                closed - max(marks["done"]),
            )
    return result


# -- report ---------------------------------------------------------------------
def print_table(results: list[Result], rounds: int) -> None:
    cols = [
        ("scenario", 46),
        ("clients", 7),
        ("model params", 12),
        ("rounds", 6),
        ("med round wall s", 16),
        ("med duration_s", 14),
        ("med slowest train s", 19),
        ("med overhead s", 14),
        ("min overhead s", 14),
        ("max overhead s", 14),
        ("MB/round w<->c", 14),
        ("svc CPU s/rnd", 13),
        ("client CPU s/rnd", 16),
        ("target", 34),
    ]
    header = " | ".join(
        f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(cols)
    )
    print(header)
    print("-" * len(header))
    for res in results:
        rows = res.rows
        over = [r["overhead"] for r in rows]
        med_over, max_over = statistics.median(over), max(over)
        if res.clients >= 100 and res.scenario.mode == "sim":
            ok = med_over < 0.5 and max_over < 1.0
            target = f"<1 s overhead (med<0.5,max<1): {'MET' if ok else 'NOT MET'}"
        else:
            target = "(context)"
        cells = [
            res.scenario.label,
            str(res.clients),
            f"{res.params:,}",
            f"{len(rows)}/{rounds}",
            f"{statistics.median(r['wall'] for r in rows):.3f}",
            f"{statistics.median(r['duration'] for r in rows):.3f}",
            f"{statistics.median(r['slowest_train'] for r in rows):.3f}",
            f"{med_over:.3f}",
            f"{min(over):.3f}",
            f"{max_over:.3f}",
            f"{statistics.median(r['bytes'] for r in rows) / 1e6:.1f}",
            f"{res.service_cpu_per_round:.3f}",
            "in svc" if res.client_cpu_per_round is None else f"{res.client_cpu_per_round:.3f}",
            target,
        ]
        print(
            " | ".join(
                f"{cell:>{width}}" if i else f"{cell:<{width}}"
                for i, (cell, (_, width)) in enumerate(zip(cells, cols, strict=True))
            )
        )


def print_rounds(results: list[Result]) -> None:
    print("\nper measured round (overhead s; * = evaluated on the test split; reported/selected):")
    for res in results:
        cells = [
            f"r{r['round']}:{r['overhead']:.3f}{'*' if r['evaluated'] else ''}"
            f"({r['reported']}/{r['selected']})"
            for r in res.rows
        ]
        print(
            f"  {res.scenario.label:<46} {' '.join(cells)}   status={res.status}, "
            f"scenario wall {res.total_s:.1f}s"
        )
        phases = [r["phases"] for r in res.rows if "phases" in r]
        if phases:
            med = [statistics.median(p[i] for p in phases) for i in range(4)]
            print(
                f"    median phases, s after round open: last task handed out {med[0]:.3f}, "
                f"last model received {med[1]:.3f}, last update accepted {med[2]:.3f}; "
                f"then -> round closed {med[3]:.3f}"
            )
        if res.refused:
            print(f"    refused updates: {res.refused[:5]}{' ...' if len(res.refused) > 5 else ''}")


async def main_async(args: argparse.Namespace) -> None:
    rounds = args.rounds or (2 if args.quick else 6)
    model, data = (QUICK_MODEL, QUICK_DATA) if args.quick else (BENCH_MODEL, BENCH_DATA)
    training = {**DIGITS_TRAINING, "epochs": 1} if args.quick else DIGITS_TRAINING
    scenarios = [
        Scenario(
            "8 tenants, real Worker training (digits)",
            manifest("bench-digits8", rounds, 8, 1, DIGITS_MODEL, DIGITS_DATA, training),
            "worker",
            "child",
        ),
        Scenario(
            "8 tenants, no training, clients in 2nd process",
            manifest("bench-sim8", rounds, 8, 1, model, data),
            "sim",
            "child",
        ),
        Scenario(
            "100 clients, no training, clients in 2nd proc",
            manifest("bench-sim100", rounds, 10, 10, model, data),
            "sim",
            "child",
        ),
        Scenario(
            "100 clients, no training, all in one process",
            manifest("bench-sim100-inproc", rounds, 10, 10, model, data),
            "sim",
            "inproc",
        ),
    ]
    if args.only:
        scenarios = [s for s in scenarios if args.only in s.label]
    results = []
    for sc in scenarios:
        print(f"running: {sc.label} ...", file=sys.stderr, flush=True)
        results.append(await run_scenario(sc))
    sim = [r for r in results if r.scenario.mode == "sim"]
    model_bytes, params = (sim[-1].model_bytes, sim[-1].params) if sim else (0, 0)
    print(
        f"\nPer-round orchestration overhead = round wall - slowest worker's training time "
        f"({rounds} rounds per scenario, round 1 discarded as warm-up; median and max over "
        f"the rest)"
    )
    print(
        "round wall = closed_at - opened_at in Redis (open -> closed incl. reduce, eval when "
        "due, checkpoint write, next model published); duration_s = history record "
        "(open -> record, before the checkpoint)"
    )
    print(
        "services: redis-server + GlobalAggregator + 2 Combiners (eu, us) in this process, "
        "loopback HTTP; fraction 1.0, roundTimeoutSeconds 60; everyRounds > rounds, so only "
        "the last round evaluates"
    )
    print(
        f"MB/round w<->c = worker<->combiner bytes (models down + updates up, from the round "
        f"counters); the global tier adds ~2 x regions x model ({model_bytes / 1e6:.1f} MB "
        f"for the {params:,}-parameter model) per round"
    )
    print(
        "svc CPU s/rnd = CPU of this process (global + combiners, all threads) + redis-server "
        "during the rounds, averaged over all rounds (warm-up included); client CPU s/rnd = the "
        "clients' CPU in their own process ('all in one process': included in svc CPU); "
        "2 cores here\n"
    )
    print_table(results, rounds)
    print_rounds(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 6, quick 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every scenario, smaller (2 rounds, 10,100-parameter model): a smoke test",
    )
    parser.add_argument("--only", help="run only scenarios whose label contains this")
    parser.add_argument("--client-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Warnings to stderr; a handler level, since TrainingTimes lets fedkube.worker's INFO through.
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.WARNING, handlers=[stderr], format="%(levelname)s %(name)s: %(message)s"
    )
    if args.client_child:
        client_child_main()
        return
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 is a warm-up and is discarded")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
