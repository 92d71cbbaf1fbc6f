"""The task API: the user's own model, data, training loop and evaluation.

A job names its task in ``spec.task``: ``module:Class`` (instantiated with
``spec.task.kwargs``) or ``module:object`` (a module, a namespace or an
instance) whose attributes are the task's functions::

    model(ctx) -> torch.nn.Module                    # optional: else spec.model
    data(ctx) -> anything                            # optional: else spec.data
    train(model, data, ctx) -> fedkube.task.Result   # one round of local training
    evaluate(model, data, ctx) -> fedkube.task.Result  # optional

``data`` returns whatever ``train`` and ``evaluate`` take: a
``torch.utils.data.Dataset`` over the tenant's own files, a DataLoader,
arrays. ``ctx`` (:class:`TaskContext`) says who and where the call runs:
the job, the client and its tenant, the round, the role (``train``,
``validation``, ``test``, ``pooled``), the device, the seed, the job's
training settings, the data kwargs and a scratch directory.

The strategy's client side is not the task's business: FedProx's proximal
gradient and SCAFFOLD's correction are added at every optimizer step of
whatever loop ``train`` runs (:mod:`fedkube.training.strategy_hooks`), and DP,
compression, signing, secure aggregation and LoRA apply to the update the
trained model gives. Without ``spec.task`` the job runs the built-in
classifier (:mod:`fedkube.classifier`), which is a task like any other.

What a task returns crosses into fedkube's metrics, logs and Prometheus, so
it is checked here (:func:`check_result`): a flat map of at most
:data:`MAX_METRICS` finite numbers named ``[a-z][a-z0-9_]*``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from fedkube.errors import EntrypointError, FedkubeError
from fedkube.spec import MAX_METRICS, Client, FederatedJob, Training
from fedkube.spec import METRIC_NAME as METRIC_PATTERN
from fedkube.training.entrypoints import import_target

if TYPE_CHECKING:
    from torch import nn

Role = Literal["train", "validation", "test", "pooled"]

# A metric's name becomes a Prometheus label value and a column: bounded and plain.
METRIC_NAME = re.compile(METRIC_PATTERN)
BUILTIN = "fedkube.classifier:Classifier"
REQUIRED = ("train",)
OPTIONAL = ("model", "data", "evaluate", "close")


@dataclass(frozen=True)
class Result:
    """What ``train`` and ``evaluate`` return: the examples used, and metrics of any name.

    ``examples`` weighs the client's update (FedAvg's ``n_k``) and its
    metrics when they are averaged across clients.
    """

    examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class TaskFailed(FedkubeError):
    """The task's code raised, or returned something fedkube cannot use.

    ``first_line`` is what a status or an Event shows; ``details`` keeps the
    traceback for the worker's log.
    """

    def __init__(self, task: str, step: str, first_line: str, details: str = ""):
        self.task, self.step, self.first_line, self.details = task, step, first_line, details
        super().__init__(f"task {task}: {step}: {first_line}")


@dataclass(frozen=True)
class TaskContext:
    """Who and where a task call runs; handed to every function of the task.

    ``seed`` is the client's seed for the round (the same after a restart);
    ``round`` is 0 outside rounds (building the model, central evaluation
    before the first round). ``scratch`` is a directory of the client's own
    that survives between its rounds within one process.
    """

    job: FederatedJob
    role: Role
    round: int = 0
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    client: Client | None = None
    data_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scratch: Path | None = None
    training_override: Training | None = None

    @property
    def job_name(self) -> str:
        return self.job.name

    @property
    def tenant(self) -> str | None:
        return self.client.tenant if self.client is not None else None

    @property
    def training(self) -> Training:
        """The job's ``spec.training`` (a baseline may override the epochs)."""
        return self.training_override or self.job.spec.training

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer ``spec.training`` names, over the model's trainable parameters.

        A convenience: any torch optimizer works, the strategy's corrections
        reach it all the same.
        """
        training = self.training
        params = [p for p in model.parameters() if p.requires_grad]
        if training.optimizer.value == "adam":
            return torch.optim.Adam(params, lr=training.learning_rate)
        return torch.optim.SGD(params, lr=training.learning_rate, momentum=training.momentum)


class Task:
    """A job's task, resolved once: its functions, called with checks around them."""

    def __init__(self, reference: str, target: Any, kwargs: Mapping[str, Any]):
        self.reference = reference
        if inspect.isclass(target):
            try:
                target = target(**kwargs)
            except TypeError as exc:
                raise EntrypointError(f"spec.task {reference!r}: cannot build it: {exc}") from exc
        elif kwargs:
            raise EntrypointError(
                f"spec.task.kwargs: {reference!r} is not a class, so it takes no kwargs"
            )
        for name in REQUIRED:
            if not callable(getattr(target, name, None)):
                raise EntrypointError(f"spec.task {reference!r} has no {name}()")
        for name in OPTIONAL:
            value = getattr(target, name, None)
            if value is not None and not callable(value):
                raise EntrypointError(f"spec.task {reference!r}: {name} is not callable")
        self.target = target

    def has(self, name: str) -> bool:
        return callable(getattr(self.target, name, None))

    def call(self, step: str, *args: Any) -> Any:
        """``target.step(*args)``: an exception from the user's code becomes :class:`TaskFailed`."""
        return guarded(self.reference, step, getattr(self.target, step), *args)

    def close(self) -> None:
        """The job is over: a task that holds something (a script's thread) lets it go."""
        if self.has("close"):
            self.call("close")

    def train(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        return check_result(self.call("train", model, data, ctx), self.reference, "train")

    def evaluate(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        if not self.has("evaluate"):
            raise TaskFailed(self.reference, "evaluate", "the task has no evaluate()")
        with torch.no_grad():
            value = self.call("evaluate", model, data, ctx)
        return check_result(value, self.reference, "evaluate")


def guarded(reference: str, step: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, the user's code: any exception it raises becomes :class:`TaskFailed`
    (first line and traceback kept), so that it costs one client's round, not the worker."""
    try:
        return function(*args)
    except TaskFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: reported whole, never hidden
        first = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise TaskFailed(reference, step, first, traceback.format_exc()) from exc


def load_task(job: FederatedJob) -> Task:
    """The job's ``spec.task`` (a task, or a Client API script), or the built-in classifier."""
    spec = job.spec.task
    if spec is None:
        return Task(BUILTIN, import_target(BUILTIN), {})
    if spec.script is not None:
        from fedkube.client import ScriptTask

        script = ScriptTask(spec.script, spec.args, job.spec.data.entrypoint)
        return Task(spec.script, script, {})
    assert spec.entrypoint is not None  # the spec requires one of them
    return Task(spec.entrypoint, import_target(spec.entrypoint), spec.kwargs)


def check_result(value: Any, task: str, step: str) -> Result:
    """``value`` as a :class:`Result`, or :class:`TaskFailed` naming what is wrong with it."""

    def refuse(problem: str) -> TaskFailed:
        return TaskFailed(task, step, problem)

    if not isinstance(value, Result):
        raise refuse(f"returned {type(value).__name__}, not fedkube.task.Result")
    examples = value.examples
    if isinstance(examples, bool) or not isinstance(examples, numbers.Integral):
        raise refuse(f"examples is {type(examples).__name__}, not an integer")
    if examples < 0 or (step == "train" and examples == 0):
        raise refuse(f"examples is {examples}; a {step} result needs at least one")
    if not isinstance(value.metrics, Mapping):
        raise refuse(f"metrics is {type(value.metrics).__name__}, not a dict of numbers")
    if len(value.metrics) > MAX_METRICS:
        raise refuse(f"{len(value.metrics)} metrics; at most {MAX_METRICS} names are kept")
    metrics: dict[str, float] = {}
    for name, number in value.metrics.items():
        if not isinstance(name, str) or not METRIC_NAME.match(name):
            raise refuse(f"metric name {name!r} is not [a-z][a-z0-9_]* (at most 63 characters)")
        metrics[name] = _finite(number, name, refuse)
    return Result(examples=int(examples), metrics=metrics)


def _finite(number: Any, name: str, refuse: Any) -> float:
    if isinstance(number, torch.Tensor) and number.numel() == 1:
        number = number.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise refuse(f"metric {name!r} is {type(number).__name__}, not a number")
    value = float(number)
    if not math.isfinite(value):
        raise refuse(f"metric {name!r} is {value}, not finite")
    return value
