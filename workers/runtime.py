"""One client's loop: wait for a round, train on local data, send Δ.

The worker only ever loads its own data partition, talks only to its
region's combiner, and sends ``Δ = w_local - w_global`` with its sample
count as the weight, as safetensors. Connection failures (a combiner
restarting) are retried with backoff; an update the combiner refuses is
logged with the reason and the worker waits for the next round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import torch
from prometheus_client import start_http_server

from fedkube import codec
from fedkube.errors import CodecError, FedkubeError
from fedkube.learning import build_model, float_state, load_data, load_float_state, train
from fedkube.logs import fields
from fedkube.metrics import Metrics
from fedkube.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_TENANT,
    H_WEIGHT,
    Envelope,
)
from fedkube.spec import Client, FederatedJob

log = logging.getLogger("fedkube.worker")

TIER = "worker"


@dataclass
class WorkerConfig:
    job: FederatedJob
    client: Client
    combiner_url: str
    token: str
    device: str = "cpu"
    poll_wait_s: float = 20.0


class Worker:
    def __init__(self, config: WorkerConfig, metrics: Metrics | None = None):
        self.config = config
        self.job = config.job
        self.client = config.client
        self.metrics = metrics or Metrics()
        self.model = build_model(config.job).to(config.device)
        self.data = load_data(config.job, "train", config.client)
        self.headers = {
            "Authorization": f"Bearer {config.token}",
            H_JOB: config.job.name,
            H_TENANT: config.client.tenant,
            H_CLIENT: config.client.id,
        }
        self.last_round = 0
        self.rounds_done = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """One forward/backward pass before registering: torch's lazy start-up
        (thread pools, kernels) would otherwise eat into the first round's deadline."""
        batch = min(len(self.data), self.job.spec.training.batch_size)
        x = torch.as_tensor(self.data.x[:batch], dtype=torch.float32, device=self.config.device)
        y = torch.as_tensor(self.data.y[:batch], dtype=torch.long, device=self.config.device)
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        self.model.zero_grad(set_to_none=True)

    def _labels(self) -> tuple[str, str, str]:
        return self.job.name, self.client.region, self.client.tenant

    async def run(self, stop: asyncio.Event) -> str:
        """Serve rounds until the job ends (returns its status) or ``stop`` is set."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as http:
            delay = 0.1
            while not stop.is_set():
                try:
                    task = await self._next_task(http)
                    delay = 0.1
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning("combiner unreachable (%s); retrying", exc, extra=self._f())
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if task["status"] == "done":
                    log.info("job finished: %s", task.get("job_status"), extra=self._f())
                    return str(task.get("job_status"))
                if task["status"] == "train":
                    number = int(task["round"])
                    try:
                        await self._train_round(http, number, int(task["version"]))
                    except (aiohttp.ClientError, asyncio.TimeoutError, CodecError) as exc:
                        # The round may still be open: the next poll hands it out again.
                        log.warning(
                            "round failed in transit (%s); asking again", exc, extra=self._f(number)
                        )
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
        return "stopped"

    def _f(self, number: int | None = None) -> dict[str, object]:
        return fields(
            job=self.job.name, round=number, tenant=self.client.tenant, client=self.client.id
        )

    async def _next_task(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        params = {"after": str(self.last_round), "wait": str(self.config.poll_wait_s)}
        async with http.get(f"{self.config.combiner_url}/v1/task", params=params) as response:
            if response.status in (401, 403):
                raise FedkubeError(
                    f"combiner refused client {self.client.id}: {await response.text()}"
                )
            if response.status >= 400:
                detail = await response.text()
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=detail
                )
            return dict(await response.json())

    async def _train_round(self, http: aiohttp.ClientSession, number: int, version: int) -> None:
        async with http.get(f"{self.config.combiner_url}/v1/model/{version}") as response:
            response.raise_for_status()
            payload = await response.read()
        self.metrics.bytes_down.labels(*self._worker_bytes()).inc(len(payload))
        tensors, _meta = codec.decode(payload)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        delta, loss = await loop.run_in_executor(None, self._train, tensors, number)
        train_s = time.perf_counter() - started
        self.metrics.train_seconds.labels(*self._labels()).observe(train_s)
        weight = float(len(self.data))
        envelope = Envelope(self.job.name, number, self.client.id, self.client.tenant, weight)
        body = codec.encode(delta, envelope.metadata("update"))
        headers = {
            H_ROUND: str(number),
            H_WEIGHT: repr(weight),
            H_CODEC: codec.CODEC,
            "Content-Type": codec.CONTENT_TYPE,
        }
        async with http.post(
            f"{self.config.combiner_url}/v1/update", data=body, headers=headers
        ) as response:
            text = await response.text()
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = {"error": f"http {response.status}", "detail": text[:200]}
        self.last_round = number
        if response.status < 300 or answer.get("error") == "duplicate":
            # A duplicate means an earlier try of this very update was accepted.
            self.rounds_done += 1
            self.metrics.worker_rounds.labels(*self._labels()).inc()
            self.metrics.bytes_up.labels(*self._worker_bytes()).inc(len(body))
            log.info(
                "update sent: loss %.4f, %d samples, %.2fs training",
                loss,
                int(weight),
                train_s,
                extra=self._f(number),
            )
        else:
            log.warning(
                "update refused (%s): %s",
                answer.get("error"),
                answer.get("detail"),
                extra=self._f(number),
            )

    def _worker_bytes(self) -> tuple[str, str, str, str]:
        return self.job.name, TIER, self.client.region, self.client.tenant

    def _train(self, global_weights: dict[str, np.ndarray], number: int):
        load_float_state(self.model, global_weights)
        seed = self.job.spec.seed * 1_000_003 + number * 7919 + zlib.crc32(self.client.id.encode())
        loss = train(self.model, self.data, self.job.spec.training, seed)
        local = float_state(self.model)
        delta = {name: local[name] - global_weights[name] for name in global_weights}
        return delta, loss


def pick_device(gpus: int) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Serve the worker's ``/metrics`` from a thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
