"""The Client API: an existing training script, changed by a handful of lines, as a client.

The model of NVIDIA FLARE's Client API: the script keeps its own ``main()``,
its own model, data loader and loop, and asks fedkube for the round's model
and hands back what it trained::

    import fedkube.client as fl

    site = fl.init()                     # who and where: tenant, data kwargs (None alone)
    model = Net()
    while fl.running():                  # blocks until the next round (False: job over)
        fl.receive(model)                # the global model, loaded into yours
        train(model, loader, epochs)     # your loop, unchanged
        fl.send(model, examples=len(dataset), metrics={"loss": loss})

The job names the script in ``spec.task.script`` (a module, run as
``__main__``, or a ``.py`` file) and its command-line arguments in
``spec.task.args``; the worker runs it in a thread of its own process
(:class:`ScriptTask`), so a script hosts one client (no ``spec.simulation``).
Everything a worker does around a task still happens: the update is
``send()``'s weights minus ``receive()``'s; FedProx's and SCAFFOLD's terms
reach the script's optimizer steps (``receive`` adds the script's model to
the round's :class:`fedkube.training.strategy_hooks.RoundHooks`); DP, compression,
signing, secure aggregation and restarts are the worker's, as for any task.
The global tier builds the model from ``spec.model``, the factory the script
is expected to use too: ``receive`` refuses a model whose tensors differ.

Run directly (``python train.py``), with no worker around it, the script
trains once as it always did: ``running()`` is true once, ``receive``
leaves the model as it is and ``send`` only logs.
"""

from __future__ import annotations

import logging
import queue
import runpy
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedkube.classifier import Classifier
from fedkube.errors import FedkubeError
from fedkube.task import Result, TaskContext
from fedkube.training import strategy_hooks
from fedkube.training.learning import call_factory, float_state, load_float_state

log = logging.getLogger("fedkube.client")

# How often a waiting worker checks that the script is still alive.
POLL_S = 0.5


@dataclass(frozen=True)
class Round:
    """What ``receive`` says of the round: its context, as a task's ``ctx`` would."""

    ctx: TaskContext

    @property
    def number(self) -> int:
        return self.ctx.round


@dataclass
class _Offer:
    model: nn.Module  # the worker's model, holding the round's global weights
    ctx: TaskContext
    hooks: strategy_hooks.RoundHooks | None  # the round's strategy terms, for the script's model


class ScriptEnded(FedkubeError):
    """The script returned or raised while the worker waited for its ``send()``."""


class _Bridge:
    """The hand-off between the worker's training thread and the script's thread."""

    def __init__(self, setup: TaskContext | None) -> None:
        self.setup = setup  # the client's context, as its data was loaded
        self.offers: queue.Queue[_Offer | None] = queue.Queue()
        self.results: queue.Queue[Result | BaseException] = queue.Queue()
        self.next: _Offer | None = None  # taken by running(), loaded by receive()
        self.current: _Offer | None = None  # received, not yet sent
        self.over = False


# The script's thread knows its bridge; without one, the script runs standalone.
_local = threading.local()
_standalone = {"rounds": 0}


def _current() -> _Bridge | None:
    return getattr(_local, "bridge", None)


def init() -> TaskContext | None:
    """Who and where the script runs: its client, tenant and merged data kwargs.

    None when no worker runs the script (``python train.py``): it then
    trains once, standalone, on whatever its own arguments say.
    """
    bridge = _current()
    if bridge is None:
        log.warning("fedkube.client: no worker around this script; it trains once, standalone")
        return None
    return bridge.setup


def running() -> bool:
    """Wait for the next round: True when there is one, False once the job is over."""
    bridge = _current()
    if bridge is None:
        _standalone["rounds"] += 1
        return _standalone["rounds"] == 1
    if bridge.over:
        return False
    if bridge.next is None and bridge.current is None:
        offer = bridge.offers.get()
        if offer is None:
            bridge.over = True
            return False
        bridge.next = offer
    return True


def receive(model: nn.Module) -> Round | None:
    """Load the round's global model into ``model``; None once the job is over.

    From here until :func:`send`, the optimizer steps over ``model`` get the
    strategy's terms (FedProx, SCAFFOLD) and are counted.
    """
    bridge = _current()
    if bridge is None:
        return None
    if bridge.current is not None:
        raise FedkubeError("receive() again before send(): the round's model is already loaded")
    if not running():
        return None
    offer, bridge.next = bridge.next, None
    assert offer is not None
    mine, theirs = float_state(model), float_state(offer.model)
    if mine.keys() != theirs.keys() or any(mine[n].shape != theirs[n].shape for n in mine):
        missing = sorted(theirs.keys() - mine.keys())[:3]
        extra = sorted(mine.keys() - theirs.keys())[:3]
        raise FedkubeError(
            "receive(model): the script's model is not spec.model's "
            f"(missing {missing}, unexpected {extra}, or shapes differ)"
        )
    load_float_state(model, theirs)
    if offer.hooks is not None:
        offer.hooks.track(model)
    bridge.current = offer
    return Round(offer.ctx)


def send(model: nn.Module, examples: int, metrics: Mapping[str, float] | None = None) -> None:
    """Hand the trained ``model`` back with the examples it trained on and any metrics."""
    bridge = _current()
    if bridge is None:
        log.info("fedkube.client: standalone; trained on %d examples: %s", examples, metrics)
        return
    offer = bridge.current
    if offer is None:
        raise FedkubeError("send() without receive(): nothing to answer")
    load_float_state(offer.model, float_state(model))
    bridge.current = None
    bridge.results.put(Result(examples=examples, metrics=dict(metrics or {})))


class ScriptTask:
    """The task a worker runs for ``spec.task.script``: the script, in a thread of its own.

    ``train`` hands the round to the script's :func:`receive` and waits for
    its :func:`send`. A script that raises fails that round (with its
    traceback) and is started afresh for the next one; ``close`` tells a
    waiting script that the job is over. The global tier evaluates the model
    only where the job gives it data: with ``spec.data.entrypoint``, on its
    held-out split (role ``test``), as the built-in classifier does.
    """

    def __init__(self, script: str, args: Sequence[str] = (), central_data: str | None = None):
        self.script = script
        self.args = list(args)
        self.central_data = central_data
        if central_data is None:
            # Nothing to evaluate the global model on centrally (fedkube.task.Task.has).
            self.evaluate = None  # type: ignore[method-assign,assignment]
        self._thread: threading.Thread | None = None
        self._bridge: _Bridge | None = None
        self._setup: TaskContext | None = None

    def data(self, ctx: TaskContext) -> Any:
        """A client's data is the script's own (``init()`` hands it ``ctx``); the central
        side's is ``spec.data``'s, when the job has one."""
        if ctx.role == "train":
            self._setup = ctx
            return f"read by {self.script}"
        if self.central_data is None:
            raise FedkubeError(f"a script job has no {ctx.role} data without spec.data")
        return call_factory(self.central_data, ctx.job, ctx.role, ctx.client, ctx.data_kwargs)

    def evaluate(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        """The global model on ``spec.data``'s held-out split, as the built-in classifier does."""
        return Classifier().evaluate(model, data, ctx)

    def train(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        bridge = self._started()
        bridge.offers.put(_Offer(model, ctx, strategy_hooks.current()))
        while True:
            try:
                outcome = bridge.results.get(timeout=POLL_S)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:
                        outcome = bridge.results.get_nowait()
                        break
                    except queue.Empty:
                        raise ScriptEnded(f"{self.script} ended without send()") from None
        if isinstance(outcome, BaseException):
            raise ScriptEnded(f"{self.script} raised: {_first_line(outcome)}") from outcome
        return outcome

    def close(self) -> None:
        if self._bridge is not None and self._thread is not None and self._thread.is_alive():
            self._bridge.offers.put(None)
            self._thread.join(timeout=30)
        self._bridge = None

    def _started(self) -> _Bridge:
        if self._thread is not None and self._thread.is_alive() and self._bridge is not None:
            return self._bridge
        self._bridge = bridge = _Bridge(self._setup)
        log.info("starting the training script %s %s", self.script, " ".join(self.args))
        self._thread = threading.Thread(
            target=self._run, args=(bridge,), name="fedkube-script", daemon=True
        )
        self._thread.start()
        return bridge

    def _run(self, bridge: _Bridge) -> None:
        _local.bridge = bridge
        # The script parses its own arguments, not the worker's.
        sys.argv = [self.script, *self.args]
        try:
            if self.script.endswith(".py"):
                runpy.run_path(self.script, run_name="__main__")
            else:
                runpy.run_module(self.script, run_name="__main__", alter_sys=False)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                bridge.results.put(ScriptEnded(f"{self.script} exited with {exc.code}"))
        except BaseException as exc:  # noqa: BLE001 - handed to the worker, which reports it
            bridge.results.put(exc)


def _first_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()
