"""Virtual clients (spec.simulation): many clients per worker process, through the real protocol.

The first test runs the same job twice with a real redis-server and real
HTTP, once with one worker per client and once with virtual clients, and
expects the same model: a simulation is only worth its numbers if it is the
deployment, batched. The second runs ``fedkube run`` on the 10,000-client
example (shortened to three rounds) as separate OS processes and measures the
peak memory of the whole process tree.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
import yaml

from fedkube.spec import parse_job
from fedkube.training.learning import build_model
from fedkube.wire import codec
from tests.federation import federate
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

EXAMPLE = ROOT / "examples" / "simulation.yaml"
# What the 10,000-client run may take, all its processes together (summed PSS;
# measured: see the README's "Scale" section). A regression check, not a benchmark.
PEAK_MEMORY_LIMIT = 3 * 1024**3


def scaffold_job(name: str, simulation: dict[str, int] | None) -> dict:
    """24 clients (4 tenants x 6), half sampled per round, SCAFFOLD: every client
    keeps its own c_i, so a client that picked up another's state would show."""
    spec = {
        "rounds": 3,
        "seed": 5,
        "model": {
            "entrypoint": "fedkube.examples.synthetic:make_model",
            "kwargs": {"features": 8, "classes": 4, "hidden": 16, "layers": 1},
        },
        "data": {
            "entrypoint": "fedkube.examples.synthetic:make_data",
            "kwargs": {"samples": 2400, "features": 8, "informative": 6, "classes": 4},
            "partition": {"scheme": "iid"},
        },
        "regions": [{"name": "eu"}, {"name": "us"}],
        "tenants": [
            {"name": f"t{i}", "region": "eu" if i < 2 else "us", "replicas": 6} for i in range(4)
        ],
        "training": {"epochs": 1, "batchSize": 16, "learningRate": 0.1},
        "participation": {"fraction": 0.5, "minFraction": 1.0, "roundTimeoutSeconds": 60},
        "strategy": {"name": "scaffold"},
        "evaluation": {"everyRounds": 3},
    }
    if simulation is not None:
        spec["simulation"] = simulation
    document = {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    return document


async def test_virtual_clients_train_the_same_model_as_one_worker_per_client(
    redis_server, tmp_path
):
    # prepare: the same job, deployed (24 workers) and simulated (6 clients to a worker)
    deployed_job = parse_job(scaffold_job("deployed", None))
    simulated_job = parse_job(scaffold_job("simulated", {"clientsPerWorker": 4}))
    assert len(simulated_job.worker_groups()) == 8  # t*-v0 with 4 clients, t*-v1 with 2
    # execute
    deployed = await federate(deployed_job, redis_server.url, tmp_path / "deployed")
    simulated = await federate(simulated_job, redis_server.url, tmp_path / "simulated")
    # assert: the same rounds, the same participants, the same model and control variate
    assert deployed.status == simulated.status == "succeeded", (deployed, simulated)
    for mine, theirs in zip(simulated.history, deployed.history, strict=True):
        assert (mine["selected"], mine["reported"], mine["dropped"]) == (12, 12, 0)
        assert mine["regions"] == theirs["regions"]
        # one model download per worker with a selected client, not one per client
        assert mine["bytes_down"] <= theirs["bytes_down"] * 8 / 12
    assert simulated.checkpoint is not None and deployed.checkpoint is not None
    for name, tensor in deployed.checkpoint.weights.items():
        np.testing.assert_allclose(simulated.checkpoint.weights[name], tensor, atol=1e-5)
    # every client that took part kept its own c_i, in its own folder, as deployed
    kept = {p.parent.name for p in (tmp_path / "simulated" / "clients").glob("*/*.safetensors")}
    same = {p.parent.name for p in (tmp_path / "deployed" / "clients").glob("*/*.safetensors")}
    assert kept == same and 12 <= len(kept) < 24
    for client in sorted(kept):
        ours = tmp_path / "simulated" / "clients" / client / "scaffold-control.safetensors"
        theirs = tmp_path / "deployed" / "clients" / client / "scaffold-control.safetensors"
        ours_c, _ = codec.decode(ours.read_bytes())
        theirs_c, _ = codec.decode(theirs.read_bytes())
        for name, tensor in theirs_c.items():
            np.testing.assert_allclose(ours_c[name], tensor, atol=1e-5)
    # a virtual client that is not training holds no data, and an update is
    # dropped once a later round is open (round 1's are gone; the job ended
    # before some workers heard of round 3)
    seats = [seat for worker in simulated.workers for seat in worker.seats.values()]
    assert len(seats) == 24
    assert all(seat.data is None for seat in seats)
    kept_updates = [seat for seat in seats if seat.outgoing is not None]
    assert {seat.outgoing.round for seat in kept_updates} <= {2, 3}
    assert sum(w.rounds_done for w in simulated.workers) == 36  # 12 accepted a round


class TreeMemory:
    """Samples the memory of a process and its descendants until it exits.

    Summed PSS (proportional set size): a page that several processes share
    (torch's libraries, mapped by every service) counts once in all, where
    summed RSS would count it in each.
    """

    def __init__(self, process: subprocess.Popen, interval_s: float = 0.1):
        self.root = psutil.Process(process.pid)
        self.interval_s = interval_s
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            total = 0
            try:
                members = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for member in members:
                try:
                    total += member.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def test_ten_thousand_virtual_clients_run_on_one_machine_with_bounded_memory(tmp_path):
    # prepare: the example job (10,000 clients, 100 per round), three rounds
    document = yaml.safe_load(EXAMPLE.read_text())
    document = copy.deepcopy(document)
    document["spec"]["rounds"] = 3
    document["spec"]["evaluation"] = {"everyRounds": 3}
    job = parse_job(document)
    assert len(job.clients()) == 10_000 and len(job.worker_groups()) == 2
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(document))
    out = tmp_path / "run"
    # execute
    process = subprocess.Popen(
        [sys.executable, "-m", "fedkube.cli", "run", str(manifest), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = TreeMemory(process)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        peak = memory.stop()
    # assert: every round had its 100 sampled clients, reported against the sample
    assert process.returncode == 0, stdout + stderr
    for number in (1, 2, 3):
        assert re.search(rf"round\s+{number}/3\s+clients 100/100 \(100%\)", stdout), stdout
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["selected"], r["reported"]) for r in records] == [(100, 100)] * 3
    # two worker processes, each of which downloaded the model once a round:
    # a download per client would be 100 models a round
    assert sorted(p.name for p in (out / "logs").glob("worker-*.log")) == [
        "worker-fleet-eu-v0.log",
        "worker-fleet-us-v0.log",
    ]
    model_bytes = 4 * sum(p.numel() for p in build_model(job).parameters())
    assert all(r["bytes_down"] < 10 * model_bytes for r in records), records
    assert 0 < peak < PEAK_MEMORY_LIMIT, f"peak memory (PSS) of the run: {peak / 1024**2:.0f} MiB"
    print(f"peak memory (summed PSS) of the 10,000-client run: {peak / 1024**2:.0f} MiB")
