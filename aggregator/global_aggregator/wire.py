"""What travels between the global tier and the combiners: the model down, partials up.

Both directions are pure functions of bytes and tensors, shared by the
HTTP handlers (:mod:`.routes`), the model cache (:mod:`.persistence`) and a
restart that reloads the partials it had acknowledged from the checkpoint
volume: a reloaded partial is checked exactly as one that just arrived.
"""

from __future__ import annotations

import numpy as np

from fedkube.aggregator.strategies.sums import Partial, Tensors
from fedkube.aggregator.validation import Template, check_finite, check_structure
from fedkube.errors import CodecError, UpdateRejected
from fedkube.spec import WireCompression
from fedkube.wire import codec, compression
from fedkube.wire.protocol import (
    M_COUNT,
    M_JOB,
    M_KIND,
    M_REGION,
    M_ROUND,
    M_VERSION,
    M_WEIGHT,
    M_WEIGHTED_STEPS,
    Reason,
    check_metadata,
)


def encode_model(
    job: str, version: int, downlink: Tensors, down: WireCompression, seed: int
) -> bytes:
    """Model ``version`` (what the strategy sends down) in ``compression.down``'s form.

    The compression's randomness is seeded by the job's seed and the version,
    so every copy of the global tier encodes the same bytes.
    """
    rng = np.random.default_rng([seed, version])
    wire, meta, _decoded = compression.encode(downlink, down, rng, with_shapes=True)
    return codec.encode(
        wire,
        {**meta, M_JOB: job, M_VERSION: str(version), M_KIND: "model"},
    )


def decode_partial(
    body: bytes | bytearray | memoryview, job: str, number: int, region: str, template: Template
) -> Partial:
    """``region``'s partial for round ``number``, checked; raises UpdateRejected."""
    try:
        tensors, metadata = codec.decode(body)
    except CodecError as exc:
        raise UpdateRejected(Reason.malformed.value, str(exc)) from None
    check_metadata(
        metadata, {M_JOB: job, M_ROUND: str(number), M_REGION: region, M_KIND: "partial"}
    )
    try:
        weight = float(metadata[M_WEIGHT])
        count = int(metadata[M_COUNT])
        steps = float(metadata.get(M_WEIGHTED_STEPS, weight))
    except (KeyError, ValueError):
        raise UpdateRejected(Reason.bad_weight.value, "partial lacks weight/count") from None
    if not (weight >= 0 and count >= 0) or (count > 0) != (weight > 0):
        raise UpdateRejected(Reason.bad_weight.value, f"weight {weight} with count {count}")
    # Every τ_i ≥ 1, so Σ w_i·τ_i ≥ Σ w_i (up to rounding in the two sums).
    if not steps >= (weight * (1 - 1e-9) if count else 0) or steps == float("inf"):
        raise UpdateRejected(
            Reason.bad_steps.value, f"weighted steps {steps} below weight {weight}"
        )
    if count:
        check_structure(tensors, template)
        check_finite(tensors)
    return Partial(region=region, sums=dict(tensors), weight=weight, count=count, steps=steps)
