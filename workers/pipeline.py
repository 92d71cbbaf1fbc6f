"""The update pipeline: a client's trained weights become the signed bytes it sends.

``train result → Δw (and SCAFFOLD's Δc) → DP (clip, local noise) →
compression with error feedback → encode → sign``, one stage a function (or,
where a stage remembers something, a small class). The maths takes its
state as arguments and returns the state to keep: SCAFFOLD's ``c_i`` and
top-k's residual are read from the client's durable state by the caller and
come back in :attr:`LocalUpdate.keep`, to be saved once the combiner has
accepted the update (:func:`keep_accepted`), so that the state on disk
always goes with an update the federation took.

Also here: the downlink's counterpart of compression (:func:`decode_model`)
and the seed a client's round uses everywhere (:func:`round_seed`).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedkube.spec import Client, FederatedJob, WireCompression
from fedkube.task import TaskFailed
from fedkube.training import privacy
from fedkube.training.learning import LocalResult
from fedkube.training.strategy_client import CONTROL, ClientStrategy, client_control_update
from fedkube.wire import codec, compression, signing
from fedkube.wire.protocol import M_STEPS, Envelope
from fedkube.workers.client_state import ClientState

Tensors = dict[str, np.ndarray]

# The names of the client's durable tensor sets (fedkube.workers.client_state).
SCAFFOLD_STATE = "scaffold-control"
# What top-k left unsent, added to the next update (error feedback).
RESIDUAL_STATE = "compression-residual"


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
class Outgoing:
    """An encoded update, kept until its round closes (for a resend)."""

    round: int
    body: codec.Encoded  # views of the update's arrays: sent without a copy
    update: LocalUpdate
    weight: float
    train_s: float
    signature: str  # over the job, round, client and the body's digest: a resend repeats it
    accepted: bool = False


def round_seed(job_seed: int, client: str, number: int) -> int:
    """A client's seed for round ``number`` (its task's ``ctx.seed``): the same after a restart."""
    return job_seed * 1_000_003 + number * 7919 + zlib.crc32(client.encode())


# -- the trained result: Δw, and the strategy's part --------------------------
def scaffold_start(
    control: Mapping[str, np.ndarray], saved: Mapping[str, np.ndarray] | None
) -> tuple[Tensors, Tensors]:
    """``(c_i, c − c_i)``: the client's variate (saved, else zeros) and its gradient correction.

    A saved ``c_i`` of other tensors than the server's ``c`` (another model)
    is not used.
    """
    c_i = (
        dict(saved)
        if saved is not None and saved.keys() == control.keys()
        else {name: np.zeros_like(c) for name, c in control.items()}
    )
    return c_i, {name: control[name] - c_i[name] for name in control}


def form_update(
    result: LocalResult,
    start: Mapping[str, np.ndarray],
    end: Mapping[str, np.ndarray],
    strategy: ClientStrategy,
    task: str,
    scaffold: tuple[Tensors, Tensors] | None = None,
) -> LocalUpdate:
    """The update of a round that trained from ``start`` to ``end``.

    ``scaffold`` is ``(c_i, c)`` under SCAFFOLD: ``Δc`` then travels beside
    ``Δw`` (as ``control/<tensor>``) and ``c_i⁺`` is kept. :class:`TaskFailed`
    (``task`` names the user's code) when the loop took no optimizer step that
    the strategy needs, or trained to non-finite weights.
    """
    if strategy.needs_steps and result.steps == 0:
        raise TaskFailed(
            task,
            "train",
            f"no torch.optim step over the model: {strategy.name} corrects and counts "
            "the steps of a torch optimizer",
        )
    delta = {name: end[name] - start[name] for name in start}
    # A float64 sum of float32 values cannot overflow, and NaN or ±Inf anywhere
    # makes it non-finite: one pass, no model-sized temporary.
    bad = next(
        (name for name, d in delta.items() if not np.isfinite(d.sum(dtype=np.float64))), None
    )
    if bad is not None:
        raise TaskFailed(task, "train", f"the trained {bad} is not finite")
    update = LocalUpdate(
        delta=delta,
        loss=result.loss,
        steps=result.steps,
        metrics=result.metrics,
        weight=float(result.examples),
    )
    if scaffold is not None:
        c_i, control = scaffold
        new_c_i, delta_c = client_control_update(
            c_i, control, start, end, result.steps, result.rate
        )
        update.delta.update({CONTROL + name: d for name, d in delta_c.items()})
        update.keep[SCAFFOLD_STATE] = new_c_i
    return update


# -- differential privacy ------------------------------------------------------
class Privatiser:
    """Under ``spec.privacy.dp``: every update clipped to clipNorm, and in local mode noised.

    The noise multiplier is solved once, when first needed (it may take an
    accountant's search). The clipped update is what is kept and sent: a
    resend is the same release, not a second one.
    """

    def __init__(self, job: FederatedJob):
        self.job = job
        self._noise_multiplier: float | None = None

    def apply(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dp = self.job.spec.privacy.dp
        if dp is None:
            return delta
        return privacy.privatise_update(dp, delta, self._solved_noise_multiplier)

    def _solved_noise_multiplier(self) -> float:
        if self._noise_multiplier is None:
            self._noise_multiplier = privacy.noise_multiplier(
                self.job.spec, len(self.job.clients())
            )
        return self._noise_multiplier


# -- compression ---------------------------------------------------------------
@dataclass(frozen=True)
class Compressed:
    """An update in its wire form, and what top-k's error feedback keeps for the next one."""

    wire: Tensors
    scheme: dict[str, str]
    residual: Tensors | None = None


def uses_feedback(up: WireCompression) -> bool:
    return up.scheme == "topk" and up.error_feedback


def compress(
    delta: Tensors,
    up: WireCompression,
    residual: Mapping[str, np.ndarray] | None,
    seed: int,
) -> Compressed:
    """``delta`` in ``up``'s form; with error feedback, ``residual`` added first.

    What top-k leaves out of ``delta + residual`` comes back as the next
    residual. A residual of other tensors (another model) is not added.
    """
    if up.scheme == "none":
        return Compressed(delta, {})
    feedback = uses_feedback(up)
    if feedback and residual is not None and residual.keys() == delta.keys():
        delta = {name: delta[name] + residual[name] for name in delta}
    rng = np.random.default_rng([seed, 1])
    wire, scheme, decoded = compression.encode(delta, up, rng)
    if not feedback:
        return Compressed(wire, scheme)
    return Compressed(wire, scheme, {name: delta[name] - decoded[name] for name in delta})


def compress_update(
    update: LocalUpdate, up: WireCompression, state: ClientState, number: int, seed: int
) -> Compressed:
    """:func:`compress` with the client's saved residual; the new one kept with the update."""
    residual = state.load(RESIDUAL_STATE, before_round=number) if uses_feedback(up) else None
    compressed = compress(update.delta, up, residual, seed)
    if compressed.residual is not None:
        update.keep[RESIDUAL_STATE] = compressed.residual
    return compressed


def decode_model(payload: bytes, down: WireCompression) -> Tensors:
    """The round's model as float32 arrays, whatever form it travelled in."""
    tensors, meta = codec.decode(payload)
    if down.scheme == "none":
        return tensors
    return compression.dense(*compression.parse_model(tensors, meta, down))


# -- encode and sign -------------------------------------------------------------
def encode_update(
    job: str, number: int, client: Client, update: LocalUpdate, compressed: Compressed
) -> codec.Encoded:
    """The update's safetensors body: who sent it, for which round, its weight and steps."""
    envelope = Envelope(job, number, client.id, client.tenant, float(update.weight))
    metadata = {**envelope.metadata("update"), M_STEPS: str(update.steps)}
    return codec.encode_parts(compressed.wire, {**metadata, **compressed.scheme})


async def sign(
    key: signing.SigningKey, job: str, body: codec.Encoded, number: int, client: str
) -> str:
    """The signature of ``body`` as ``client``'s update of round ``number``.

    Once per update, in a thread (BLAKE3 releases the GIL), over the
    pieces that will be sent: nothing is joined or copied.
    """
    loop = asyncio.get_running_loop()
    digest = await loop.run_in_executor(None, signing.payload_digest, body.chunks())
    return signing.sign(key, job, number, client, digest)


def keep_accepted(state: ClientState, update: LocalUpdate, number: int) -> None:
    """Save the client state that goes with an update the combiner accepted."""
    for name, kept in update.keep.items():
        state.save(name, kept, number)
