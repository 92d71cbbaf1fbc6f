"""The worker's poll loop against a scripted combiner on the loopback.

One worker with one client of the small job: it trains when the poll hands
out a round, keeps its update when the combiner cannot take it (503) and
sends the same bytes again on the next poll, reports a failed task, and
stops when the job is done. The combiner is a small aiohttp app in this
process; the worker's training is the real one (a few hundred examples).
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.spec import FederatedJob, parse_job
from fedkube.task import TaskFailed
from fedkube.training.learning import build_model, float_state
from fedkube.wire import codec, signing
from fedkube.wire.protocol import H_SIGNATURE
from fedkube.workers.pipeline import LocalUpdate
from fedkube.workers.runtime import Worker, WorkerConfig
from fedkube.workers.seat import Seat
from tests.support import small_job_dict, tenant_signing_key


def worker_for(job: FederatedJob, url: str, state: Path, kind: type[Worker] = Worker) -> Worker:
    client = job.clients()[0]
    return kind(
        WorkerConfig(
            job=job,
            clients=[client],
            combiner_url=url,
            token="token",
            signing_key=signing.load_signing_key(tenant_signing_key(client.tenant), "test"),
            poll_wait_s=0.1,
            state_dir=state,
        )
    )


def round_one(client: str, status: str = "train") -> dict[str, Any]:
    task = {"status": status, "client": client, "round": 1, "version": 0}
    return {"status": "open", "round": 1, "tasks": [task]}


async def test_an_update_the_combiner_could_not_take_is_sent_again_not_retrained(
    combiner, tmp_path
):
    fake, url = combiner
    job = parse_job(small_job_dict())
    client = job.clients()[0].id
    model = codec.encode(float_state(build_model(job)), {})
    done = {"status": "done", "job_status": "Succeeded"}
    fake.script("/v1/tasks", (200, round_one(client)), (200, round_one(client)), (200, done))
    fake.script("/v1/model/0", (200, model))
    unavailable = {"error": "unavailable", "detail": "round state"}
    fake.script("/v1/update", (503, unavailable), (200, {"ok": True}))
    worker = worker_for(job, url, tmp_path)

    status = await asyncio.wait_for(worker.run(asyncio.Event()), 60)

    assert status == "Succeeded"
    assert (worker.rounds_done, worker.resent, worker.last_round) == (1, 1, 1)
    assert len(fake.bodies("/v1/model/0")) == 1
    first, second = fake.bodies("/v1/update")
    assert first == second
    signatures = [h[H_SIGNATURE] for path, h, _ in fake.seen if path == "/v1/update"]
    assert signatures[0] == signatures[1] != ""
    polls = [json.loads(body) for body in fake.bodies("/v1/tasks")]
    assert [p["after"] for p in polls] == [0, 0, 1]
    assert all(p["clients"] == [client] for p in polls)
    tensors, meta = codec.decode(first)
    assert meta["fedkube.client"] == client and meta["fedkube.round"] == "1"
    assert all(np.isfinite(t).all() for t in tensors.values())


class FailingWorker(Worker):
    def compute_update(
        self, seat: Seat, data: Any, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        raise TaskFailed("tests", "train", "boom")


async def test_a_failed_task_is_reported_and_not_run_again_in_its_round(combiner, tmp_path):
    fake, url = combiner
    job = parse_job(small_job_dict())
    client = job.clients()[0].id
    model = codec.encode(float_state(build_model(job)), {})
    done = {"status": "done", "job_status": "Failed"}
    fake.script("/v1/tasks", (200, round_one(client)), (200, round_one(client)), (200, done))
    fake.script("/v1/model/0", (200, model))
    fake.script("/v1/failure", (200, {"ok": True}))
    worker = worker_for(job, url, tmp_path, FailingWorker)

    status = await asyncio.wait_for(worker.run(asyncio.Event()), 60)

    assert status == "Failed"
    reports = [json.loads(body) for body in fake.bodies("/v1/failure")]
    error = str(TaskFailed("tests", "train", "boom"))
    assert reports == [{"client": client, "round": 1, "step": "train", "error": error}]
    assert fake.bodies("/v1/update") == []
    assert worker.seats[client].failed_round == 1 and worker.rounds_done == 0


async def test_an_evaluation_task_is_reported_once(combiner, tmp_path):
    fake, url = combiner
    job = parse_job(small_job_dict())
    client = job.clients()[0].id
    model = codec.encode(float_state(build_model(job)), {})
    evaluate = round_one(client, "evaluate")
    done = {"status": "done", "job_status": "Succeeded"}
    fake.script("/v1/tasks", (200, evaluate), (200, evaluate), (200, done))
    fake.script("/v1/model/0", (200, model))
    fake.script("/v1/evaluation", (200, {"ok": True}))
    worker = worker_for(job, url, tmp_path)

    assert await asyncio.wait_for(worker.run(asyncio.Event()), 60) == "Succeeded"

    reports = [json.loads(body) for body in fake.bodies("/v1/evaluation")]
    assert len(reports) == 1
    assert reports[0]["client"] == client and reports[0]["round"] == 1
