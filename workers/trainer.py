"""Running the job's task for a hosted client: its data, the model object, train and evaluate.

A worker holds one model object (on its device) and the job's task; every
client it hosts trains and evaluates on that model in turn, in the worker's
executor. This module owns that: loading a client's data (kept between
rounds only by a worker with one client, loaded to train and dropped after
otherwise), the task's context, the client side of the strategy while the
task's loop trains (FedProx's proximal term, SCAFFOLD's correction, from
:mod:`fedkube.training.strategy_client`), and the evaluation of a global model on a
client's validation data. What happens to the trained weights next is
:mod:`fedkube.workers.pipeline`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedkube.datasets import ArrayData
from fedkube.policy import DataBinding
from fedkube.spec import FederatedJob
from fedkube.task import BUILTIN, Role, TaskContext, load_task
from fedkube.training.evaluation import Report
from fedkube.training.learning import (
    build_model,
    float_state,
    load_data,
    load_float_state,
    train_local,
)
from fedkube.training.strategy_client import CLIENT_STRATEGIES, split
from fedkube.workers.evaluation import evaluate_model, validation_data
from fedkube.workers.pipeline import (
    SCAFFOLD_STATE,
    LocalUpdate,
    form_update,
    round_seed,
    scaffold_start,
)
from fedkube.workers.seat import Seat


class Trainer:
    """The job's task and the one model object a worker's clients train on in turn."""

    def __init__(
        self,
        job: FederatedJob,
        device: str,
        binding: DataBinding | None,
        keep_data: bool,
    ):
        self.job = job
        self.binding = binding  # the site's own (fedkube.policy): it overrides the manifest's
        self.keep_data = keep_data
        self.strategy = CLIENT_STRATEGIES[job.spec.strategy.name]
        self.task = load_task(job)
        self.device = torch.device(device)
        self.model = build_model(job, self.task).to(self.device)

    def data(self, seat: Seat) -> Any:
        """The client's training data, loaded if it is not at hand."""
        if seat.data is None:
            seat.data = load_data(
                self.job,
                "train",
                seat.client,
                self.binding,
                self.task,
                scratch=seat.state.scratch(),
            )
        return seat.data

    def release(self, seat: Seat) -> None:
        """Drop the client's training data, unless the worker keeps it (one client)."""
        if not self.keep_data:
            seat.data = None

    def warm_up(self, seat: Seat) -> None:
        """Load a client's data now (a bad binding fails at start, not in a round).

        With the built-in classifier, also one training step on one batch:
        torch's lazy start-up (thread pools, kernels, the optimizer's first
        step: about a second) would otherwise eat into the first round's
        deadline. What it does to the weights does not matter: every round
        starts from the global model's. A task of the user's own is not
        called outside a round.
        """
        data = self.data(seat)
        if self.task.reference == BUILTIN and isinstance(data, ArrayData):
            batch = min(len(data), self.job.spec.training.batch_size)
            one = self.job.spec.training.model_copy(update={"epochs": 1})
            ctx = TaskContext(self.job, "train", device=self.device, training_override=one)
            self.task.train(self.model, ArrayData(data.x[:batch], data.y[:batch]), ctx)
        self.release(seat)

    def context(self, seat: Seat, role: Role, number: int) -> TaskContext:
        """The task's context for ``seat``'s round ``number`` in ``role`` (train, validation)."""
        return TaskContext(
            self.job,
            role,
            round=number,
            seed=round_seed(self.job.spec.seed, seat.client.id, number),
            device=self.device,
            client=seat.client,
            scratch=seat.state.scratch(),
        )

    def train(
        self, seat: Seat, data: Any, payload: dict[str, np.ndarray], number: int
    ) -> LocalUpdate:
        """Train one client on the round's model (and the strategy's downlink); form its update.

        :class:`~fedkube.task.TaskFailed` when the task raised, returned a bad
        result, took no optimizer step that the strategy needs, or trained
        to non-finite weights: nothing of such a round is sent.
        """
        start, control = split(payload)
        load_float_state(self.model, start)
        scaffold = None
        correction = None
        if self.strategy.control_variates:
            saved = seat.state.load(SCAFFOLD_STATE, before_round=number)
            c_i, correction = scaffold_start(control, saved)
            scaffold = (c_i, control)
        result = train_local(
            self.task,
            self.model,
            data,
            self.context(seat, "train", number),
            proximal_mu=self.job.spec.strategy.proximal_mu if self.strategy.proximal else 0.0,
            correction=correction,
        )
        end = float_state(self.model)
        return form_update(result, start, end, self.strategy, self.task.reference, scaffold)

    def evaluate(
        self, seat: Seat, tensors: dict[str, np.ndarray], number: int, version: int
    ) -> Report:
        """One client's report on model ``version``; TaskFailed if the task could not do it."""
        ctx = self.context(seat, "validation", number)
        try:
            if seat.validation is None:
                seat.validation = validation_data(
                    self.job, self.task, seat.client, self.binding, seat.state.scratch()
                )
            return evaluate_model(
                self.job, self.task, self.model, seat.validation, tensors, ctx, version
            )
        finally:
            if not self.keep_data:
                seat.validation = None
