"""A worker process: wait for a round, train its selected clients, send each Δ.

A worker hosts one client, or under ``spec.simulation`` many virtual clients
of one tenant (a :class:`~fedkube.spec.WorkerGroup`). Every client keeps its
own data partition, seed and durable state, and sends
``Δ = w_local - w_global`` with its sample count as the weight and its local
optimizer steps, as safetensors, under its own name: the combiner checks a
virtual client's update like any other. What the process shares is what a
simulation should share: one poll for all its clients (``POST /v1/tasks``),
one download of each round's model, one model object trained for each
selected client in turn (the next one trains while the previous update is
on the wire). A client that is not selected holds no data (it is loaded to
train and dropped after) and no update.

A client keeps its update until its round closes: a combiner that restarted
mid-round asks for it again (task ``resend``), and an update the combiner
could not take (unreachable, or its round state unavailable: 503) is sent
again when the next poll hands the round out, not trained again. An update
the combiner refuses is logged with the reason and the client waits for the
next round. The client state that goes with an update (SCAFFOLD's ``c_i``,
top-k's residual) is saved only once the combiner accepted it.

This module is the poll loop: ask for tasks, do them, wait when something
must be tried again. The parts it drives live beside it:

* :mod:`~fedkube.workers.link`: the HTTP link to the combiner (retries with
  backoff while it is away);
* :mod:`~fedkube.workers.trainer`: the task, the model and the clients' data;
* :mod:`~fedkube.workers.pipeline`: trained weights to signed bytes (DP,
  compression with error feedback, encoding, the tenant's signature);
* :mod:`~fedkube.workers.secure_client`: secure aggregation's client side;
* :mod:`~fedkube.workers.evaluation`: the evaluation tasks (evaluation at the sites).

:meth:`Worker.compute_update` and :meth:`Worker._privatise` are the two
steps a test's worker overrides to play a faulty or hostile client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import start_http_server

from fedkube.errors import CodecError, FedkubeError
from fedkube.policy import DataBinding
from fedkube.service.metrics import Metrics
from fedkube.service.tls import Tls
from fedkube.spec import Client, FederatedJob
from fedkube.task import TaskFailed
from fedkube.training.evaluation import Report
from fedkube.wire import signing
from fedkube.wire.failures import STEPS, FailureReport
from fedkube.workers.client_state import ClientState
from fedkube.workers.evaluation import SiteEvaluations, failed_report
from fedkube.workers.link import TRANSIT_ERRORS, CombinerLink, Taken
from fedkube.workers.pipeline import (
    LocalUpdate,
    Outgoing,
    Privatiser,
    compress_update,
    decode_model,
    encode_update,
    keep_accepted,
    round_seed,
    sign,
)
from fedkube.workers.seat import Identity, Seat
from fedkube.workers.secure_client import SECURE_STEPS, SecureClient
from fedkube.workers.trainer import Trainer

log = logging.getLogger("fedkube.worker")

STATE_DIR_ENV = "FEDKUBE_STATE_DIR"
# Updates of one worker's virtual clients sent at once.
SENDS_IN_FLIGHT = 4


def default_state_dir(job: str) -> Path:
    """``$FEDKUBE_STATE_DIR/<job>``, else a folder under the temp dir (a pod's emptyDir).

    Each client's state is in a folder of its own below it.
    """
    root = os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / "fedkube-state"
    return Path(root) / job


def trained_summary(loss: float, metrics: Mapping[str, float]) -> str:
    """What a round's training reported, for the log: the task's own metrics when it
    returns any (``mse 0.41``), else the loss (a user's task may report no loss)."""
    if metrics:
        return ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items())[:4])
    return f"loss {loss:.4f}"


@dataclass
class WorkerConfig:
    job: FederatedJob
    # The clients this process hosts: one, or a worker group's virtual clients
    # (all of one tenant, so of one region and one token).
    clients: Sequence[Client]
    combiner_url: str
    token: str
    # The tenant's private key: every update is signed with it (fedkube.wire.signing).
    signing_key: signing.SigningKey
    device: str = "cpu"
    poll_wait_s: float = 20.0
    state_dir: Path | None = None  # each client's state in <state_dir>/<client id>
    # The site's own data binding (fedkube.policy): it overrides the manifest's.
    data_binding: DataBinding | None = None
    name: str | None = None  # the worker group's name; default: the only client's id
    # spec.transport.tls: the job's CA that the combiner's certificate must chain to,
    # and (mutual) the tenant's certificate (None: plain HTTP).
    tls: Tls | None = None


class Worker:
    def __init__(self, config: WorkerConfig, metrics: Metrics | None = None):
        if not config.clients or len({c.tenant for c in config.clients}) != 1:
            raise FedkubeError("a worker hosts one or more clients, all of one tenant")
        self.config = config
        self.job = config.job
        self.tenant = config.clients[0].tenant
        self.region = config.clients[0].region
        self.name = config.name or config.clients[0].id
        self.metrics = metrics or Metrics()
        root = config.state_dir or default_state_dir(config.job.name)
        self.seats = {
            c.id: Seat(c, ClientState(root / c.id, config.job.name, c.id)) for c in config.clients
        }
        # One client: its data is loaded now (a bad binding fails at start) and kept.
        self.keep_data = len(self.seats) == 1
        self.trainer = Trainer(config.job, config.device, config.data_binding, self.keep_data)
        self.task = self.trainer.task
        self.identity = Identity(
            self.job.name, self.tenant, self.region, self.name, len(self.seats)
        )
        self.link = CombinerLink(config.combiner_url, config.token, self.identity, config.tls)
        self.last_round = 0
        self.rounds_done = 0
        self.resent = 0
        # (round, version, tensors): the model the round's clients train on.
        self._round_model: tuple[int, int, dict[str, np.ndarray]] | None = None
        self.privatiser = Privatiser(config.job)
        self.evaluations = SiteEvaluations(
            self.seats, self.link, self.identity, self._model_for, self._evaluate_seat
        )
        self.secure: SecureClient | None = None
        if config.job.spec.privacy.secure_aggregation is not None:
            self.secure = SecureClient(
                config.job,
                self.identity,
                self.seats,
                self.link,
                config.signing_key,
                self._deliver,
                SENDS_IN_FLIGHT,
            )
        self.trainer.warm_up(next(iter(self.seats.values())))

    @property
    def client_ids(self) -> list[str]:
        return list(self.seats)

    async def run(self, stop: asyncio.Event) -> str:
        """Serve rounds until the job ends (returns its status) or ``stop`` is set."""
        try:
            return await self._serve(stop)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.task.close)

    async def _serve(self, stop: asyncio.Event) -> str:
        async with self.link:
            while not stop.is_set():
                answer = await self.link.tasks(
                    self.client_ids, self.last_round, self.config.poll_wait_s, stop
                )
                if answer is None:
                    break  # stopped while the combiner was away
                if answer["status"] == "done":
                    log.info("job finished: %s", answer.get("job_status"), extra=self._f())
                    return str(answer.get("job_status"))
                self._round_open(int(answer.get("round", 0)))
                if not await self._do(answer.get("tasks", [])):
                    await self.link.pause()
        return "stopped"

    async def _do(self, tasks: list[dict[str, Any]]) -> bool:
        """The tasks of one poll answer; False when the worker should wait before asking again.

        Secure aggregation's steps first; then evaluations (a poll that
        hands some out has no training in it), else the round's training
        and resends.
        """
        steps = [t for t in tasks if t["status"] in SECURE_STEPS]
        if steps and self.secure is not None:
            try:
                await self.secure.steps(steps)
            except TRANSIT_ERRORS as exc:
                # The combiner hands the step out again until it has the answer.
                log.warning("a secure aggregation step failed in transit (%s)", exc)
        evaluations = [t for t in tasks if t["status"] == "evaluate"]
        if evaluations:
            return await self.evaluations.report(evaluations)
        rounds = [t for t in tasks if t["status"] in ("train", "resend")]
        if not rounds:
            return True
        number = max(int(t["round"]) for t in rounds)
        try:
            return await self._serve_round(number, rounds)
        except (*TRANSIT_ERRORS, CodecError) as exc:
            # The round may still be open: the next poll hands it out again.
            log.warning("round failed in transit (%s); asking again", exc, extra=self._f(number))
            return False

    def _f(self, number: int | None = None, client: str | None = None) -> dict[str, object]:
        return self.identity.log(number, client)

    def _round_open(self, number: int) -> None:
        """The combiner is at round ``number``: no earlier update or model is asked for again."""
        for seat in self.seats.values():
            if seat.outgoing is not None and seat.outgoing.round < number:
                seat.outgoing = None
            if seat.secure is not None and seat.secure.round < number:
                seat.secure = None
        if self._round_model is not None and self._round_model[0] < number:
            self._round_model = None

    # -- training rounds ---------------------------------------------------------------
    async def _serve_round(self, number: int, tasks: list[dict[str, Any]]) -> bool:
        """Send round ``number``'s update of every client in ``tasks``.

        A client trains only if its update is not at hand; while it trains,
        the previous client's update is on its way. Returns False when some
        update should be sent again later (the combiner is restarting, or
        could not record it): it stays with its client, and the next poll
        hands the round out again.
        """
        sends: list[asyncio.Task[bool]] = []
        # A few updates on the wire at once, not every selected client's: the
        # combiner holds a receive buffer per update in flight.
        in_flight = asyncio.Semaphore(SENDS_IN_FLIGHT)

        async def send(seat: Seat, outgoing: Outgoing) -> bool:
            async with in_flight:
                return await self._deliver(seat, outgoing, number)

        try:
            for task in tasks:
                seat = self.seats.get(str(task.get("client", "")))
                if seat is None or int(task["round"]) != number:
                    continue
                outgoing = seat.outgoing
                if seat.failed_round == number:
                    continue  # the task failed this round: it is not run again
                if outgoing is None or outgoing.round != number:
                    tensors = await self._model_for(number, int(task["version"]))
                    try:
                        outgoing = seat.outgoing = await self._train(seat, tensors, number)
                    except TaskFailed as exc:
                        await self.link.report_failure(self._task_failed(seat, number, exc))
                        continue
                    if self.secure is not None:
                        advertise = self.secure.advertise(seat, outgoing)
                        sends.append(asyncio.create_task(advertise))
                        continue
                else:
                    self.resent += 1
                    log.info(
                        "sending the round's update again",
                        extra=self._f(number, seat.client.id),
                    )
                sends.append(asyncio.create_task(send(seat, outgoing)))
            results = await asyncio.gather(*sends)
        finally:
            for pending in sends:
                pending.cancel()
        if all(results):
            self.last_round = max(self.last_round, number)
            return True
        return False

    def _task_failed(self, seat: Seat, number: int, exc: TaskFailed) -> FailureReport:
        """The user's code failed this client's round: said with the traceback, not retried.

        The client sends nothing for the round, which closes on the others;
        the next round runs the task again. Returns the report that tells
        the combiner (fedkube.wire.failures), so the round need not wait for us.
        """
        seat.failed_round = number
        self.metrics.task_failures.labels(*self.identity.labels(), exc.step).inc()
        log.error(
            "the task failed; the client sits this round out: %s\n%s",
            exc,
            exc.details.rstrip(),
            extra=self._f(number, seat.client.id),
        )
        step = exc.step if exc.step in STEPS else "train"
        return FailureReport(seat.client.id, number, step, str(exc))

    async def _model_for(self, number: int, version: int) -> dict[str, np.ndarray]:
        """Model ``version``, downloaded once for all the clients that train on it."""
        if self._round_model is not None and self._round_model[1] == version:
            return self._round_model[2]
        payload = await self.link.model(version)
        self.metrics.bytes_down.labels(*self.identity.byte_labels()).inc(len(payload))
        tensors = decode_model(payload, self.job.spec.compression.down)
        self._round_model = (number, version, tensors)
        return tensors

    async def _train(self, seat: Seat, tensors: dict[str, np.ndarray], number: int) -> Outgoing:
        """Train one client and put its update through the pipeline (kept until its round ends)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        update = await loop.run_in_executor(None, self._train_seat, seat, tensors, number)
        train_s = time.perf_counter() - started
        self.metrics.train_seconds.labels(*self.identity.labels()).observe(train_s)
        client = seat.client
        seed = round_seed(self.job.spec.seed, client.id, number)
        up = self.job.spec.compression.up
        compressed = compress_update(update, up, seat.state, number, seed)
        body = encode_update(self.job.name, number, client, update, compressed)
        # Under secure aggregation what is sent (and signed) is the masked update.
        signature = ""
        if self.secure is None:
            signature = await sign(self.config.signing_key, self.job.name, body, number, client.id)
        return Outgoing(number, body, update, float(update.weight), train_s, signature)

    def _train_seat(self, seat: Seat, tensors: dict[str, np.ndarray], number: int) -> LocalUpdate:
        """Train one client (in the executor), holding its data only meanwhile."""
        try:
            data = self._data(seat)
            return self._privatise(self.compute_update(seat, data, tensors, number))
        finally:
            self.trainer.release(seat)

    def _data(self, seat: Seat) -> Any:
        return self.trainer.data(seat)

    def compute_update(
        self, seat: Seat, data: Any, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        """Train one client on the round's model (and the strategy's downlink); form its update.

        :class:`TaskFailed` when the task raised, returned a bad result, took
        no optimizer step that the strategy needs, or trained to non-finite
        weights: nothing of such a round is sent.
        """
        return self.trainer.train(seat, data, payload, number)

    def _privatise(self, update: LocalUpdate) -> LocalUpdate:
        """Under ``spec.privacy.dp``: the update clipped to clipNorm, and in local mode noised.

        The clipped update is what is kept and sent: a resend is the same
        release, not a second one.
        """
        update.delta = self.privatiser.apply(update.delta)
        return update

    async def _deliver(self, seat: Seat, outgoing: Outgoing, number: int) -> bool:
        """POST one client's update; False if it must be sent again (503)."""
        taken = await self.link.send_update(seat.client.id, number, outgoing)
        if taken is Taken.accepted:
            self._accepted(seat, outgoing, number)
        return taken is not Taken.later

    def _accepted(self, seat: Seat, outgoing: Outgoing, number: int) -> None:
        """Keep the client state that goes with an accepted update (once per round)."""
        if outgoing.accepted:
            return
        outgoing.accepted = True
        keep_accepted(seat.state, outgoing.update, number)
        self.rounds_done += 1
        self.metrics.worker_rounds.labels(*self.identity.labels()).inc()
        self.metrics.bytes_up.labels(*self.identity.byte_labels()).inc(len(outgoing.body))
        log.info(
            "update sent: %s, %d samples, %.2fs training",
            trained_summary(outgoing.update.loss, outgoing.update.metrics),
            int(outgoing.weight),
            outgoing.train_s,
            extra=self._f(number, seat.client.id),
        )

    # -- evaluation at the sites (fedkube.workers.evaluation) ---------------------
    def _evaluate_seat(
        self, seat: Seat, tensors: dict[str, np.ndarray], number: int, version: int
    ) -> Report:
        """One client's report on model ``version`` (in the executor)."""
        try:
            return self.trainer.evaluate(seat, tensors, number, version)
        except TaskFailed as exc:
            self.metrics.task_failures.labels(*self.identity.labels(), exc.step).inc()
            return failed_report(exc, seat.client, number, version, self.job)


def pick_device(gpus: int) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Serve the worker's ``/metrics`` from a thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
