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

The client side of the job's strategy happens here: FedProx's proximal
term, SCAFFOLD's gradient correction and control-variate update (``c_i``
kept in the client's durable state, and replaced only once the combiner
accepted the ``Δc`` that goes with it, so that ``c`` and the ``c_i`` stay
consistent). A client keeps its update until its round closes: a combiner
that restarted mid-round asks for it again (task ``resend``), and an update
the combiner could not take (unreachable, or its round state unavailable:
503) is sent again when the next poll hands the round out, not trained
again. Connection failures are retried with backoff; an update the combiner
refuses is logged with the reason and the client waits for the next round.

Every update is signed with the tenant's private key (:mod:`fedkube.signing`)
over the job, round, client and SHA-256 of its exact bytes, so that the
bearer token alone cannot post as the tenant. The digest is taken once, over
the encoded pieces without joining them; a resend repeats the signature.

Under ``spec.privacy.secureAggregation`` a trained client keeps its update
and runs the client side of :mod:`fedkube.secagg` instead of sending it:
fresh keys with its weight, its secrets' shares for its neighbours, then
its update masked (the only form in which it leaves), then the shares that
let the combiner remove the masks of the round's survivors and dropouts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
from prometheus_client import start_http_server

from fedkube import codec, compression, faults, privacy, secagg, signing
from fedkube.aggregator.strategies import REGISTRY, norm_bound, scaffold
from fedkube.errors import CodecError, FedkubeError, SecureAggregationFailed
from fedkube.evaluation import Report
from fedkube.failures import STEPS, FailureReport
from fedkube.learning import (
    ArrayData,
    build_model,
    float_state,
    load_data,
    load_float_state,
    train_local,
)
from fedkube.logs import fields
from fedkube.metrics import Metrics
from fedkube.policy import DataBinding
from fedkube.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    M_STEPS,
    Envelope,
    Reason,
)
from fedkube.spec import Client, DpMode, FederatedJob
from fedkube.task import BUILTIN, TaskContext, TaskFailed, load_task
from fedkube.web import upload
from fedkube.workers.client_state import ClientState
from fedkube.workers.evaluation import evaluate_model, failed_report, validation_data

log = logging.getLogger("fedkube.worker")

TIER = "worker"
STATE_DIR_ENV = "FEDKUBE_STATE_DIR"
SCAFFOLD_STATE = "scaffold-control"
# What top-k left unsent, added to the next update (error feedback).
RESIDUAL_STATE = "compression-residual"


def default_state_dir(job: str) -> Path:
    """``$FEDKUBE_STATE_DIR/<job>``, else a folder under the temp dir (a pod's emptyDir).

    Each client's state is in a folder of its own below it.
    """
    root = os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / "fedkube-state"
    return Path(root) / job


@dataclass
class WorkerConfig:
    job: FederatedJob
    # The clients this process hosts: one, or a worker group's virtual clients
    # (all of one tenant, so of one region and one token).
    clients: Sequence[Client]
    combiner_url: str
    token: str
    # The tenant's private key: every update is signed with it (fedkube.signing).
    signing_key: signing.SigningKey
    device: str = "cpu"
    poll_wait_s: float = 20.0
    state_dir: Path | None = None  # each client's state in <state_dir>/<client id>
    # The site's own data binding (fedkube.policy): it overrides the manifest's.
    data_binding: DataBinding | None = None
    name: str | None = None  # the worker group's name; default: the only client's id


# Retry delays while the combiner is away: capped well below the combiner's
# reattach window (combiner.REATTACH_S), so a restarted combiner gets its
# resends in time.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
# Updates of one worker's virtual clients sent at once.
SENDS_IN_FLIGHT = 4
# The tasks of secure aggregation's steps 2 to 4 (see fedkube.secagg).
SECURE_STEPS = ("share", "mask", "unmask")


@dataclass
class LocalUpdate:
    """One round's result: what to send, and state to keep once it is accepted."""

    delta: dict[str, np.ndarray]
    loss: float
    steps: int
    keep: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    weight: float = 0.0  # the examples the task trained on (FedAvg's n_k)
    metrics: Mapping[str, float] = field(default_factory=dict)  # what the task's train returned


@dataclass
class _Outgoing:
    """An encoded update, kept until its round closes (for a resend)."""

    round: int
    body: codec.Encoded  # views of the update's arrays: sent without a copy
    update: LocalUpdate
    weight: float
    train_s: float
    signature: str  # over the job, round, client and the body's digest: a resend repeats it
    accepted: bool = False


@dataclass
class Seat:
    """One client that this process hosts: its identity, state and last update."""

    client: Client
    state: ClientState
    outgoing: _Outgoing | None = None
    # Loaded to train; kept between rounds only by a worker with one client.
    data: Any = None  # whatever the task's data() (or spec.data) gave
    validation: Any = None  # its role validation, loaded when first asked to evaluate
    # Under secure aggregation: this round's keys, seed and received shares.
    secure: secagg.ClientSession | None = None
    failed_round: int | None = None  # the round whose task failed (not run again)


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
        self.task = load_task(config.job)
        self.device = torch.device(config.device)
        self.model = build_model(config.job, self.task).to(self.device)
        root = config.state_dir or default_state_dir(config.job.name)
        self.seats = {
            c.id: Seat(c, ClientState(root / c.id, config.job.name, c.id)) for c in config.clients
        }
        # One client: its data is loaded now (a bad binding fails at start) and kept.
        self.keep_data = len(self.seats) == 1
        self.headers = {
            "Authorization": f"Bearer {config.token}",
            H_JOB: config.job.name,
            H_TENANT: self.tenant,
        }
        self.last_round = 0
        self.rounds_done = 0
        self.resent = 0
        self.strategy = REGISTRY[config.job.spec.strategy.name]
        # (round, version, tensors): the model the round's clients train on.
        self._round_model: tuple[int, int, dict[str, np.ndarray]] | None = None
        # (client, round) of every evaluation reported: not done twice.
        self._evaluated: set[tuple[str, int]] = set()
        self._noise_multiplier: float | None = None  # local DP: solved once, when first needed
        self.secure = config.job.spec.privacy.secure_aggregation
        self._warm_up()

    @property
    def client_ids(self) -> list[str]:
        return list(self.seats)

    def _warm_up(self) -> None:
        """Load the first client's data now (a bad binding fails at start, not in a round).

        With the built-in classifier, also one training step on one batch:
        torch's lazy start-up (thread pools, kernels, the optimizer's first
        step: about a second) would otherwise eat into the first round's
        deadline. What it does to the weights does not matter: every round
        starts from the global model's. A task of the user's own is not
        called outside a round.
        """
        seat = next(iter(self.seats.values()))
        data = self._data(seat)
        if self.task.reference == BUILTIN and isinstance(data, ArrayData):
            batch = min(len(data), self.job.spec.training.batch_size)
            one = self.job.spec.training.model_copy(update={"epochs": 1})
            ctx = TaskContext(self.job, "train", device=self.device, training_override=one)
            self.task.train(self.model, ArrayData(data.x[:batch], data.y[:batch]), ctx)
        if not self.keep_data:
            seat.data = None

    def _data(self, seat: Seat) -> Any:
        if seat.data is None:
            seat.data = load_data(
                self.job,
                "train",
                seat.client,
                self.config.data_binding,
                self.task,
                scratch=seat.state.scratch(),
            )
        return seat.data

    def _labels(self) -> tuple[str, str, str]:
        return self.job.name, self.region, self.tenant

    def _describe(self) -> str:
        if self.keep_data:
            return f"client {self.name}"
        return f"worker {self.name} ({len(self.seats)} clients)"

    async def run(self, stop: asyncio.Event) -> str:
        """Serve rounds until the job ends (returns its status) or ``stop`` is set."""
        try:
            return await self._serve(stop)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.task.close)

    async def _serve(self, stop: asyncio.Event) -> str:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as http:
            delay = RETRY_MIN_S
            away_since: float | None = None
            while not stop.is_set():
                try:
                    answer = await self._next_tasks(http)
                    delay, away_since = RETRY_MIN_S, None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # A worker may start before its combiner listens (fedkube run
                    # starts every service at once): a warning only if it lasts.
                    away_since = away_since or time.monotonic()
                    level = logging.WARNING if time.monotonic() - away_since > 5 else logging.INFO
                    log.log(level, "combiner unreachable (%s); retrying", exc, extra=self._f())
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                if answer["status"] == "done":
                    log.info("job finished: %s", answer.get("job_status"), extra=self._f())
                    return str(answer.get("job_status"))
                self._round_open(int(answer.get("round", 0)))
                steps = [t for t in answer.get("tasks", []) if t["status"] in SECURE_STEPS]
                try:
                    await self._secure_steps(http, steps)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # The combiner hands the step out again until it has the answer.
                    log.warning("a secure aggregation step failed in transit (%s)", exc)
                evaluations = [t for t in answer.get("tasks", []) if t["status"] == "evaluate"]
                if evaluations:
                    if not await self._evaluate(http, evaluations):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX_S)
                    continue
                tasks = [t for t in answer.get("tasks", []) if t["status"] in ("train", "resend")]
                if not tasks:
                    continue
                number = max(int(t["round"]) for t in tasks)
                try:
                    sent = await self._serve_round(http, number, tasks)
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

    def _f(self, number: int | None = None, client: str | None = None) -> dict[str, object]:
        return fields(
            job=self.job.name,
            round=number,
            tenant=self.tenant,
            client=client or (self.name if self.keep_data else None),
            worker=None if self.keep_data else self.name,
        )

    def _round_open(self, number: int) -> None:
        """The combiner is at round ``number``: no earlier update or model is asked for again."""
        for seat in self.seats.values():
            if seat.outgoing is not None and seat.outgoing.round < number:
                seat.outgoing = None
            if seat.secure is not None and seat.secure.round < number:
                seat.secure = None
        if self._round_model is not None and self._round_model[0] < number:
            self._round_model = None

    async def _next_tasks(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        body = {
            "clients": self.client_ids,
            "after": self.last_round,
            "wait": self.config.poll_wait_s,
        }
        async with http.post(f"{self.config.combiner_url}/v1/tasks", json=body) as response:
            if response.status in (401, 403):
                raise FedkubeError(f"combiner refused {self._describe()}: {await response.text()}")
            if response.status >= 400:
                detail = await response.text()
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=detail
                )
            return dict(await response.json())

    async def _serve_round(
        self, http: aiohttp.ClientSession, number: int, tasks: list[dict[str, Any]]
    ) -> bool:
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

        async def send(seat: Seat, outgoing: _Outgoing) -> bool:
            async with in_flight:
                return await self._send(http, seat, outgoing, number)

        try:
            for task in tasks:
                seat = self.seats.get(str(task.get("client", "")))
                if seat is None or int(task["round"]) != number:
                    continue
                outgoing = seat.outgoing
                if seat.failed_round == number:
                    continue  # the task failed this round: it is not run again
                if outgoing is None or outgoing.round != number:
                    tensors = await self._model_for(http, number, int(task["version"]))
                    try:
                        outgoing = seat.outgoing = await self._train(seat, tensors, number)
                    except TaskFailed as exc:
                        self._task_failed(seat, number, exc)
                        await self._report_failure(http, seat, number, exc)
                        continue
                    if self.secure is not None:
                        sends.append(asyncio.create_task(self._advertise(http, seat, outgoing)))
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

    def _task_failed(self, seat: Seat, number: int, exc: TaskFailed) -> None:
        """The user's code failed this client's round: said with the traceback, not retried.

        The client sends nothing for the round, which closes on the others;
        the next round runs the task again.
        """
        seat.failed_round = number
        self.metrics.task_failures.labels(*self._labels(), exc.step).inc()
        log.error(
            "the task failed; the client sits this round out: %s\n%s",
            exc,
            exc.details.rstrip(),
            extra=self._f(number, seat.client.id),
        )

    async def _report_failure(
        self, http: aiohttp.ClientSession, seat: Seat, number: int, exc: TaskFailed
    ) -> None:
        """Tell the combiner (fedkube.failures): the round closes without waiting for us."""
        step = exc.step if exc.step in STEPS else "train"
        report = FailureReport(seat.client.id, number, step, str(exc))
        where = self._f(number, seat.client.id)
        try:
            url = f"{self.config.combiner_url}/v1/failure"
            async with http.post(url, json=report.document()) as response:
                if response.status >= 400:
                    detail = await response.text()
                    log.warning(
                        "failure report refused (%d): %s", response.status, detail, extra=where
                    )
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            # The round then waits for its deadline, as for a client that dropped.
            log.warning("could not report the failure (%s)", error, extra=where)

    # -- evaluation at the sites (fedkube.evaluation) ----------------------------
    async def _evaluate(self, http: aiohttp.ClientSession, tasks: list[dict[str, Any]]) -> bool:
        """Evaluate the model each task names on its client's validation data and report.

        False when nothing was reported (the reports failed in transit, or
        were answered before): the caller backs off before it polls again.
        """
        reported = False
        for task in tasks:
            seat = self.seats.get(str(task.get("client", "")))
            number, version = int(task["round"]), int(task["version"])
            if seat is None or (seat.client.id, number) in self._evaluated:
                continue
            try:
                # Model ``version`` is the one round ``version`` trains on: kept for it.
                tensors = await self._model_for(http, version, version)
                loop = asyncio.get_running_loop()
                report = await loop.run_in_executor(
                    None, self._evaluate_seat, seat, tensors, number, version
                )
                async with http.post(
                    f"{self.config.combiner_url}/v1/evaluation", json=report.document()
                ) as response:
                    answer = await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, CodecError) as exc:
                log.warning(
                    "evaluation failed in transit (%s)", exc, extra=self._f(number, seat.client.id)
                )
                continue
            if response.status == 503:
                continue  # the combiner could not record it: asked again
            # Recorded, or refused for good (said in the combiner's log and here).
            self._evaluated.add((seat.client.id, number))
            reported = True
            if response.status >= 400 and response.status != 409:
                log.warning(
                    "evaluation report refused (%d): %s",
                    response.status,
                    answer,
                    extra=self._f(number, seat.client.id),
                )
        return reported

    def _evaluate_seat(
        self, seat: Seat, tensors: dict[str, np.ndarray], number: int, version: int
    ) -> Report:
        """One client's report on model ``version`` (in the executor)."""
        client = seat.client
        ctx = TaskContext(
            self.job,
            "validation",
            round=number,
            seed=self._seed(client, number),
            device=self.device,
            client=client,
            scratch=seat.state.scratch(),
        )
        try:
            if seat.validation is None:
                seat.validation = validation_data(
                    self.job, self.task, client, self.config.data_binding, seat.state.scratch()
                )
            return evaluate_model(
                self.job, self.task, self.model, seat.validation, tensors, ctx, version
            )
        except TaskFailed as exc:
            self.metrics.task_failures.labels(*self._labels(), exc.step).inc()
            return failed_report(exc, client, number, version, self.job)
        finally:
            if not self.keep_data:
                seat.validation = None

    # -- secure aggregation (the client side of fedkube.secagg) -----------------
    async def _advertise(
        self, http: aiohttp.ClientSession, seat: Seat, outgoing: _Outgoing
    ) -> bool:
        """Step 1: join the round with fresh keys and the update's weight (it stays here)."""
        session = secagg.ClientSession(self.job.name, outgoing.round, seat.client.id)
        document = {
            "client": seat.client.id,
            "round": outgoing.round,
            "weight": outgoing.weight,
            "steps": outgoing.update.steps,
            **session.advertisement(),
        }
        answer = await self._post_step(http, seat, "keys", document, outgoing.round)
        if answer is None:
            return False  # 503: the next poll hands the round out again
        if answer:
            seat.secure = session
        return True

    async def _secure_steps(self, http: aiohttp.ClientSession, tasks: list[dict[str, Any]]) -> None:
        """Steps 2 to 4 for each client that has one: shares, masked update, unmasking.

        A few clients at once (as updates are sent in the clear): one client's
        update is masked while another's is on the wire. A transport error
        is raised once every client's step has ended; the combiner hands the
        steps that did not arrive out again.
        """
        in_flight = asyncio.Semaphore(SENDS_IN_FLIGHT)

        async def one(task: dict[str, Any]) -> None:
            async with in_flight:
                await self._secure_step(http, task)

        results = await asyncio.gather(*(one(t) for t in tasks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _secure_step(self, http: aiohttp.ClientSession, task: dict[str, Any]) -> None:
        seat = self.seats.get(str(task.get("client", "")))
        number = int(task.get("round", 0))
        session = seat.secure if seat is not None else None
        if seat is None or session is None or session.round != number:
            return  # keys lost with a restart: the combiner counts this client dropped
        try:
            if task["status"] == "share":
                loop = asyncio.get_running_loop()
                sealed = await loop.run_in_executor(None, session.share, task)
                document = {"client": seat.client.id, "round": number, "shares": sealed}
                await self._post_step(http, seat, "shares", document, number)
                faults.reached(f"worker.{seat.client.id}.shared", number)
            elif task["status"] == "mask":
                await self._send_masked(http, seat, session, task)
            else:
                shares = session.unmask(task)
                document = {"client": seat.client.id, "round": number, "shares": shares}
                await self._post_step(http, seat, "unmask", document, number)
        except SecureAggregationFailed as exc:
            log.error(
                "leaving the round's secure aggregation: %s",
                exc,
                extra=self._f(number, seat.client.id),
            )
            seat.secure = None

    async def _send_masked(
        self,
        http: aiohttp.ClientSession,
        seat: Seat,
        session: secagg.ClientSession,
        task: dict[str, Any],
    ) -> None:
        outgoing = seat.outgoing
        if outgoing is None or outgoing.round != session.round:
            raise SecureAggregationFailed("the round's update is gone")
        assert self.secure is not None
        delta = outgoing.update.delta
        counted = privacy.counted_weight(self.job.spec.privacy.dp, outgoing.weight)
        ratio = self.strategy.fold_scale(counted, outgoing.update.steps)
        loop = asyncio.get_running_loop()

        def masked() -> codec.Encoded:
            flat = secagg.flatten(delta)
            values = session.mask(task, flat, ratio / session.weight_total, self.secure.clip_range)
            tensors = secagg.unflatten(values, {name: d.shape for name, d in delta.items()})
            envelope = Envelope(
                self.job.name, session.round, seat.client.id, seat.client.tenant, outgoing.weight
            )
            return codec.encode_parts(tensors, {**envelope.metadata("masked")})

        body = await loop.run_in_executor(None, masked)
        signature = await self._sign(body, session.round, seat.client)
        wire = _Outgoing(
            session.round, body, outgoing.update, outgoing.weight, outgoing.train_s, signature
        )
        if await self._send(http, seat, wire, session.round) and wire.accepted:
            outgoing.accepted = True

    async def _post_step(
        self,
        http: aiohttp.ClientSession,
        seat: Seat,
        step: str,
        document: dict[str, Any],
        number: int,
    ) -> bool | None:
        """POST one protocol message: True if taken, False if refused, None to try again (503)."""
        headers = {H_CLIENT: seat.client.id, H_ROUND: str(number)}
        url = f"{self.config.combiner_url}/v1/secagg/{step}"
        async with http.post(url, json=document, headers=headers) as response:
            text = await response.text()
            status = response.status
        if status < 300:
            return True
        answer = _answer(status, text)
        if status == 503:
            return None
        log.warning(
            "secure aggregation %s refused (%s): %s",
            step,
            answer.get("error"),
            answer.get("detail"),
            extra=self._f(number, seat.client.id),
        )
        return False

    async def _send(
        self, http: aiohttp.ClientSession, seat: Seat, outgoing: _Outgoing, number: int
    ) -> bool:
        """POST one client's update; False if it must be sent again (503)."""
        body, framing = upload(outgoing.body)
        headers = {
            H_CLIENT: seat.client.id,
            H_ROUND: str(number),
            H_WEIGHT: repr(outgoing.weight),
            H_CODEC: codec.CODEC,
            H_SIGNATURE: outgoing.signature,
            **framing,
        }
        async with http.post(
            f"{self.config.combiner_url}/v1/update", data=body, headers=headers
        ) as response:
            text = await response.text()
        answer = _answer(response.status, text)
        if response.status == 503 and answer.get("error") == Reason.unavailable.value:
            log.warning(
                "update not taken yet (%s); it will be sent again",
                answer.get("detail"),
                extra=self._f(number, seat.client.id),
            )
            return False
        if response.status < 300 or answer.get("error") == "duplicate":
            # A duplicate means an earlier try of this very update was accepted.
            self._accepted(seat, outgoing, number)
        else:
            log.warning(
                "update refused (%s): %s",
                answer.get("error"),
                answer.get("detail"),
                extra=self._f(number, seat.client.id),
            )
        return True

    async def _model_for(
        self, http: aiohttp.ClientSession, number: int, version: int
    ) -> dict[str, np.ndarray]:
        """Model ``version``, downloaded once for all the clients that train on it."""
        if self._round_model is not None and self._round_model[1] == version:
            return self._round_model[2]
        async with http.get(f"{self.config.combiner_url}/v1/model/{version}") as response:
            response.raise_for_status()
            payload = await response.read()
        self.metrics.bytes_down.labels(*self._worker_bytes()).inc(len(payload))
        tensors = self._model(payload)
        self._round_model = (number, version, tensors)
        return tensors

    async def _train(self, seat: Seat, tensors: dict[str, np.ndarray], number: int) -> _Outgoing:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        update = await loop.run_in_executor(None, self._train_seat, seat, tensors, number)
        train_s = time.perf_counter() - started
        self.metrics.train_seconds.labels(*self._labels()).observe(train_s)
        weight = float(update.weight)
        client = seat.client
        envelope = Envelope(self.job.name, number, client.id, client.tenant, weight)
        metadata = {**envelope.metadata("update"), M_STEPS: str(update.steps)}
        wire, scheme = self._compress(seat, update, number)
        body = codec.encode_parts(wire, {**metadata, **scheme})
        # Under secure aggregation what is sent (and signed) is the masked update.
        signature = "" if self.secure is not None else await self._sign(body, number, client)
        return _Outgoing(number, body, update, weight, train_s, signature)

    async def _sign(self, body: codec.Encoded, number: int, client: Client) -> str:
        """The signature of ``body`` as ``client``'s update of round ``number``.

        Once per update, in a thread (hashlib releases the GIL), over the
        pieces that will be sent: nothing is joined or copied.
        """
        loop = asyncio.get_running_loop()
        digest = await loop.run_in_executor(None, signing.payload_digest, body.chunks())
        return signing.sign(self.config.signing_key, self.job.name, number, client.id, digest)

    def _train_seat(self, seat: Seat, tensors: dict[str, np.ndarray], number: int) -> LocalUpdate:
        """Train one client (in the executor), holding its data only meanwhile."""
        try:
            data = self._data(seat)
            return self._privatise(self.compute_update(seat, data, tensors, number))
        finally:
            if not self.keep_data:
                seat.data = None

    def _privatise(self, update: LocalUpdate) -> LocalUpdate:
        """Under ``spec.privacy.dp``: the update clipped to clipNorm, and in local mode noised.

        The clipped update is what is kept and sent: a resend is the same
        release, not a second one.
        """
        dp = self.job.spec.privacy.dp
        if dp is None:
            return update
        update.delta, _scale = norm_bound.clip(update.delta, dp.clip_norm)
        if dp.mode is DpMode.local:
            if self._noise_multiplier is None:
                self._noise_multiplier = privacy.noise_multiplier(
                    self.job.spec, len(self.job.clients())
                )
            std = self._noise_multiplier * dp.clip_norm
            update.delta = privacy.add_gaussian_noise(update.delta, std, privacy.noise_rng())
        return update

    def _model(self, payload: bytes) -> dict[str, np.ndarray]:
        """The round's model as float32 arrays, whatever form it travelled in."""
        tensors, meta = codec.decode(payload)
        down = self.job.spec.compression.down
        if down.scheme == "none":
            return tensors
        shapes = compression.shapes_of(tensors, meta)
        return compression.dense(compression.parse(tensors, meta, shapes, down), shapes)

    def _compress(
        self, seat: Seat, update: LocalUpdate, number: int
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The update in ``compression.up``'s form, with top-k's error feedback.

        What top-k leaves out is kept (with the update, saved once accepted)
        and added to the client's next update before choosing again.
        """
        up = self.job.spec.compression.up
        if up.scheme == "none":
            return update.delta, {}
        delta = update.delta
        feedback = up.scheme == "topk" and up.error_feedback
        if feedback:
            residual = seat.state.load(RESIDUAL_STATE, before_round=number)
            if residual is not None and residual.keys() == delta.keys():
                delta = {name: delta[name] + residual[name] for name in delta}
        rng = np.random.default_rng([self._seed(seat.client, number), 1])
        wire, scheme, decoded = compression.encode(delta, up, rng)
        if feedback:
            update.keep[RESIDUAL_STATE] = {name: delta[name] - decoded[name] for name in delta}
        return wire, scheme

    def _seed(self, client: Client, number: int) -> int:
        return round_seed(self.job.spec.seed, client.id, number)

    def _accepted(self, seat: Seat, outgoing: _Outgoing, number: int) -> None:
        """Keep the client state that goes with an accepted update (once per round)."""
        if outgoing.accepted:
            return
        outgoing.accepted = True
        for name, kept in outgoing.update.keep.items():
            seat.state.save(name, kept, number)
        self.rounds_done += 1
        self.metrics.worker_rounds.labels(*self._labels()).inc()
        self.metrics.bytes_up.labels(*self._worker_bytes()).inc(len(outgoing.body))
        log.info(
            "update sent: loss %.4f, %d samples, %.2fs training",
            outgoing.update.loss,
            int(outgoing.weight),
            outgoing.train_s,
            extra=self._f(number, seat.client.id),
        )

    def _worker_bytes(self) -> tuple[str, str, str, str]:
        return self.job.name, TIER, self.region, self.tenant

    def compute_update(
        self, seat: Seat, data: Any, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        """Train one client on the round's model (and the strategy's downlink); form its update.

        :class:`TaskFailed` when the task raised, returned a bad result, took
        no optimizer step that the strategy needs, or trained to non-finite
        weights: nothing of such a round is sent.
        """
        global_weights, control = scaffold.split(payload)
        load_float_state(self.model, global_weights)
        seed = self._seed(seat.client, number)
        c_i: dict[str, np.ndarray] = {}
        correction = None
        if self.strategy.control_variates:
            saved = seat.state.load(SCAFFOLD_STATE, before_round=number)
            c_i = (
                saved
                if saved is not None and saved.keys() == control.keys()
                else {name: np.zeros_like(c) for name, c in control.items()}
            )
            correction = {name: control[name] - c_i[name] for name in control}
        ctx = TaskContext(
            self.job,
            "train",
            round=number,
            seed=seed,
            device=self.device,
            client=seat.client,
            scratch=seat.state.scratch(),
        )
        result = train_local(
            self.task,
            self.model,
            data,
            ctx,
            proximal_mu=self.job.spec.strategy.proximal_mu if self.strategy.proximal else 0.0,
            correction=correction,
        )
        needs_steps = (
            self.strategy.proximal
            or self.strategy.control_variates
            or self.strategy.needs_local_steps
        )
        if needs_steps and result.steps == 0:
            raise TaskFailed(
                self.task.reference,
                "train",
                f"no torch.optim step over the model: {self.strategy.name} corrects and counts "
                "the steps of a torch optimizer",
            )
        local = float_state(self.model)
        delta = {name: local[name] - global_weights[name] for name in global_weights}
        bad = next((name for name, d in delta.items() if not np.isfinite(d).all()), None)
        if bad is not None:
            raise TaskFailed(self.task.reference, "train", f"the trained {bad} is not finite")
        update = LocalUpdate(
            delta=delta,
            loss=result.loss,
            steps=result.steps,
            metrics=result.metrics,
            weight=float(result.examples),
        )
        if self.strategy.control_variates:
            new_c_i, delta_c = scaffold.client_control_update(
                c_i, control, global_weights, local, result.steps, result.rate
            )
            update.delta.update({scaffold.CONTROL + name: d for name, d in delta_c.items()})
            update.keep[SCAFFOLD_STATE] = new_c_i
        return update


def round_seed(job_seed: int, client: str, number: int) -> int:
    """A client's seed for round ``number`` (its task's ``ctx.seed``): the same after a restart."""
    return job_seed * 1_000_003 + number * 7919 + zlib.crc32(client.encode())


def _answer(status: int, text: str) -> dict[str, Any]:
    """A combiner's JSON answer, or what to log of one that is not JSON."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return {"error": f"http {status}", "detail": text[:200]}
    return answer if isinstance(answer, dict) else {"error": f"http {status}", "detail": text[:200]}


def pick_device(gpus: int) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Serve the worker's ``/metrics`` from a thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
