"""One client's loop: wait for a round, train on local data, send Δ.

The worker only ever loads its own data partition, talks only to its
region's combiner, and sends ``Δ = w_local - w_global`` with its sample
count as the weight and its local optimizer steps, as safetensors. The
client side of the job's strategy happens here: FedProx's proximal term,
SCAFFOLD's gradient correction and control-variate update (``c_i`` kept in
the client's durable state, and replaced only once the combiner accepted the
``Δc`` that goes with it, so that ``c`` and the ``c_i`` stay consistent).
A worker keeps its update until a later round opens: a combiner that
restarted mid-round asks for it again (task ``resend``), and an update the
combiner could not take (unreachable, or its round state unavailable: 503)
is sent again when the next poll hands the round out, not trained again.
Connection failures are retried with backoff; an update the combiner refuses
is logged with the reason and the worker waits for the next round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
from prometheus_client import start_http_server

from fedkube import codec, compression
from fedkube.aggregator.strategies import REGISTRY, scaffold
from fedkube.errors import CodecError, FedkubeError
from fedkube.learning import build_model, float_state, load_data, load_float_state, train_local
from fedkube.logs import fields
from fedkube.metrics import Metrics
from fedkube.policy import DataBinding
from fedkube.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_TENANT,
    H_WEIGHT,
    M_STEPS,
    Envelope,
    Reason,
)
from fedkube.spec import Client, FederatedJob
from fedkube.workers.client_state import ClientState

log = logging.getLogger("fedkube.worker")

TIER = "worker"
STATE_DIR_ENV = "FEDKUBE_STATE_DIR"
SCAFFOLD_STATE = "scaffold-control"
# What top-k left unsent, added to the next update (error feedback).
RESIDUAL_STATE = "compression-residual"


def default_state_dir(job: str, client: str) -> Path:
    """``$FEDKUBE_STATE_DIR``, else a folder under the temp dir (a pod's emptyDir)."""
    root = os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / "fedkube-state"
    return Path(root) / job / client


@dataclass
class WorkerConfig:
    job: FederatedJob
    client: Client
    combiner_url: str
    token: str
    device: str = "cpu"
    poll_wait_s: float = 20.0
    state_dir: Path | None = None
    # The site's own data binding (fedkube.policy): it overrides the manifest's.
    data_binding: DataBinding | None = None


# Retry delays while the combiner is away: capped well below the combiner's
# reattach window (combiner.REATTACH_S), so a restarted combiner gets its
# resends in time.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0


@dataclass
class LocalUpdate:
    """One round's result: what to send, and state to keep once it is accepted."""

    delta: dict[str, np.ndarray]
    loss: float
    steps: int
    keep: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class _Outgoing:
    """An encoded update, kept until a later round opens (for a resend)."""

    round: int
    body: bytes
    update: LocalUpdate
    weight: float
    train_s: float
    accepted: bool = False


class Worker:
    def __init__(self, config: WorkerConfig, metrics: Metrics | None = None):
        self.config = config
        self.job = config.job
        self.client = config.client
        self.metrics = metrics or Metrics()
        self.model = build_model(config.job).to(config.device)
        self.data = load_data(config.job, "train", config.client, config.data_binding)
        self.headers = {
            "Authorization": f"Bearer {config.token}",
            H_JOB: config.job.name,
            H_TENANT: config.client.tenant,
            H_CLIENT: config.client.id,
        }
        self.last_round = 0
        self.rounds_done = 0
        self.resent = 0
        self.outgoing: _Outgoing | None = None
        self.strategy = REGISTRY[config.job.spec.strategy.name]
        self.state = ClientState(
            config.state_dir or default_state_dir(config.job.name, config.client.id),
            config.job.name,
            config.client.id,
        )
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
            delay = RETRY_MIN_S
            while not stop.is_set():
                try:
                    task = await self._next_task(http)
                    delay = RETRY_MIN_S
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning("combiner unreachable (%s); retrying", exc, extra=self._f())
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                if task["status"] == "done":
                    log.info("job finished: %s", task.get("job_status"), extra=self._f())
                    return str(task.get("job_status"))
                if task["status"] in ("train", "resend"):
                    number = int(task["round"])
                    try:
                        sent = await self._serve_round(http, number, int(task["version"]))
                    except (aiohttp.ClientError, asyncio.TimeoutError, CodecError) as exc:
                        # The round may still be open: the next poll hands it out again.
                        log.warning(
                            "round failed in transit (%s); asking again", exc, extra=self._f(number)
                        )
                        sent = False
                    if not sent:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX_S)
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

    async def _serve_round(self, http: aiohttp.ClientSession, number: int, version: int) -> bool:
        """Send round ``number``'s update, training only if it is not at hand.

        Returns False when it should be sent again later (the combiner is
        restarting, or could not record it): the update stays in
        ``outgoing``, and the next poll hands the round out again.
        """
        outgoing = self.outgoing
        if outgoing is None or outgoing.round != number:
            outgoing = self.outgoing = await self._train(http, number, version)
        else:
            self.resent += 1
            log.info("sending the round's update again", extra=self._f(number))
        headers = {
            H_ROUND: str(number),
            H_WEIGHT: repr(outgoing.weight),
            H_CODEC: codec.CODEC,
            "Content-Type": codec.CONTENT_TYPE,
        }
        async with http.post(
            f"{self.config.combiner_url}/v1/update", data=outgoing.body, headers=headers
        ) as response:
            text = await response.text()
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = {"error": f"http {response.status}", "detail": text[:200]}
        if response.status == 503 and answer.get("error") == Reason.unavailable.value:
            log.warning(
                "update not taken yet (%s); it will be sent again",
                answer.get("detail"),
                extra=self._f(number),
            )
            return False
        self.last_round = number
        if response.status < 300 or answer.get("error") == "duplicate":
            # A duplicate means an earlier try of this very update was accepted.
            self._accepted(outgoing, number)
        else:
            log.warning(
                "update refused (%s): %s",
                answer.get("error"),
                answer.get("detail"),
                extra=self._f(number),
            )
        return True

    async def _train(self, http: aiohttp.ClientSession, number: int, version: int) -> _Outgoing:
        async with http.get(f"{self.config.combiner_url}/v1/model/{version}") as response:
            response.raise_for_status()
            payload = await response.read()
        self.metrics.bytes_down.labels(*self._worker_bytes()).inc(len(payload))
        tensors = self._model(payload)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        update = await loop.run_in_executor(None, self.compute_update, tensors, number)
        train_s = time.perf_counter() - started
        self.metrics.train_seconds.labels(*self._labels()).observe(train_s)
        weight = float(len(self.data))
        envelope = Envelope(self.job.name, number, self.client.id, self.client.tenant, weight)
        metadata = {**envelope.metadata("update"), M_STEPS: str(update.steps)}
        wire, scheme = self._compress(update, number)
        body = codec.encode(wire, {**metadata, **scheme})
        return _Outgoing(number, body, update, weight, train_s)

    def _model(self, payload: bytes) -> dict[str, np.ndarray]:
        """The round's model as float32 arrays, whatever form it travelled in."""
        tensors, meta = codec.decode(payload)
        down = self.job.spec.compression.down
        if down.scheme == "none":
            return tensors
        shapes = compression.shapes_of(tensors, meta)
        return compression.dense(compression.parse(tensors, meta, shapes, down), shapes)

    def _compress(
        self, update: LocalUpdate, number: int
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The update in ``compression.up``'s form, with top-k's error feedback.

        What top-k leaves out is kept (with the update, saved once accepted)
        and added to the next round's update before choosing again.
        """
        up = self.job.spec.compression.up
        if up.scheme == "none":
            return update.delta, {}
        delta = update.delta
        feedback = up.scheme == "topk" and up.error_feedback
        if feedback:
            residual = self.state.load(RESIDUAL_STATE, before_round=number)
            if residual is not None and residual.keys() == delta.keys():
                delta = {name: delta[name] + residual[name] for name in delta}
        rng = np.random.default_rng([self._seed(number), 1])
        wire, scheme, decoded = compression.encode(delta, up, rng)
        if feedback:
            update.keep[RESIDUAL_STATE] = {name: delta[name] - decoded[name] for name in delta}
        return wire, scheme

    def _seed(self, number: int) -> int:
        """This client's seed for round ``number``: the same after a restart."""
        return self.job.spec.seed * 1_000_003 + number * 7919 + zlib.crc32(self.client.id.encode())

    def _accepted(self, outgoing: _Outgoing, number: int) -> None:
        """Keep the client state that goes with an accepted update (once per round)."""
        if outgoing.accepted:
            return
        outgoing.accepted = True
        for name, kept in outgoing.update.keep.items():
            self.state.save(name, kept, number)
        self.rounds_done += 1
        self.metrics.worker_rounds.labels(*self._labels()).inc()
        self.metrics.bytes_up.labels(*self._worker_bytes()).inc(len(outgoing.body))
        log.info(
            "update sent: loss %.4f, %d samples, %.2fs training",
            outgoing.update.loss,
            int(outgoing.weight),
            outgoing.train_s,
            extra=self._f(number),
        )

    def _worker_bytes(self) -> tuple[str, str, str, str]:
        return self.job.name, TIER, self.client.region, self.client.tenant

    def compute_update(self, payload: dict[str, np.ndarray], number: int) -> LocalUpdate:
        """Train on the round's model (and the strategy's downlink) and form the update."""
        global_weights, control = scaffold.split(payload)
        load_float_state(self.model, global_weights)
        seed = self._seed(number)
        training = self.job.spec.training
        c_i: dict[str, np.ndarray] = {}
        correction = None
        if self.strategy.control_variates:
            saved = self.state.load(SCAFFOLD_STATE, before_round=number)
            c_i = (
                saved
                if saved is not None and saved.keys() == control.keys()
                else {name: np.zeros_like(c) for name, c in control.items()}
            )
            correction = {name: control[name] - c_i[name] for name in control}
        result = train_local(
            self.model,
            self.data,
            training,
            seed,
            proximal_mu=self.job.spec.strategy.proximal_mu if self.strategy.proximal else 0.0,
            correction=correction,
        )
        local = float_state(self.model)
        delta = {name: local[name] - global_weights[name] for name in global_weights}
        update = LocalUpdate(delta=delta, loss=result.loss, steps=result.steps)
        if self.strategy.control_variates:
            # With momentum m, SGD's steady-state step is lr/(1 − m): the
            # option-II estimate of the gradient uses that effective rate.
            rate = training.learning_rate / (1.0 - training.momentum)
            new_c_i, delta_c = scaffold.client_control_update(
                c_i, control, global_weights, local, result.steps, rate
            )
            update.delta.update({scaffold.CONTROL + name: d for name, d in delta_c.items()})
            update.keep[SCAFFOLD_STATE] = new_c_i
        return update


def pick_device(gpus: int) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Serve the worker's ``/metrics`` from a thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
