"""The round protocol: states, transitions, and what a message must say.

A round moves ``open -> collecting -> aggregating -> closed``; ``failed`` ends
the job. Transitions are a pure function so that every component (and the
tests) agree on them.

Every payload names its job, round, tenant, client and codec twice:
in HTTP headers (cheap to check before reading a body) and in the
safetensors metadata (bound to the bytes). The receiver checks both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedkube.errors import UpdateRejected


class RoundState(str, Enum):
    open = "open"
    collecting = "collecting"
    aggregating = "aggregating"
    closed = "closed"
    failed = "failed"


_TRANSITIONS: dict[RoundState, set[RoundState]] = {
    RoundState.open: {RoundState.collecting, RoundState.failed},
    RoundState.collecting: {RoundState.aggregating, RoundState.failed},
    RoundState.aggregating: {RoundState.closed, RoundState.collecting, RoundState.failed},
    RoundState.closed: set(),
    RoundState.failed: set(),
}


def can_transition(current: RoundState, target: RoundState) -> bool:
    """Whether a round in ``current`` may move to ``target``.

    ``aggregating -> collecting`` exists for a quorum miss that extends the
    deadline after combiners were asked to flush.
    """
    return target in _TRANSITIONS[current]


class Reason(str, Enum):
    """Why an update was rejected: the ``reason`` label of the metric."""

    unauthenticated = "unauthenticated"
    unknown_tenant = "unknown_tenant"
    not_selected = "not_selected"
    wrong_round = "wrong_round"
    late = "late"
    duplicate = "duplicate"
    oversized = "oversized"
    malformed = "malformed"
    metadata_mismatch = "metadata_mismatch"
    wrong_shape = "wrong_shape"
    wrong_dtype = "wrong_dtype"
    non_finite = "non_finite"
    norm_bound = "norm_bound"
    over_clip_norm = "over_clip_norm"  # above spec.privacy.dp.clipNorm
    bad_weight = "bad_weight"
    weight_above_cap = "weight_above_cap"
    bad_steps = "bad_steps"
    buffer_full = "buffer_full"
    # Secure aggregation: a key, sealed share or revealed share that is malformed,
    # of the wrong length, or not the one this step asks for.
    bad_share = "bad_share"
    # No signature, or one that does not verify with the tenant's public key
    # for this job, round, client and body (fedkube.wire.signing).
    bad_signature = "bad_signature"
    # Not the update's fault: the round state (Redis) could not record it. The
    # worker keeps the update and sends it again.
    unavailable = "unavailable"
    # Not the update's fault either: the combiner is receiving as many bytes as its
    # in-flight budget (spec.transport.maxInflightBytes, or the tenant's share)
    # allows. Answered 503 (the combiner's budget) or 429 (the tenant's) with
    # Retry-After; the worker keeps the update and sends it again.
    busy = "busy"
    # The body came slower than spec.transport.minUploadBytesPerSecond allows (408).
    slow_body = "slow_body"
    # A partial posted with the credential of another region's combiner (403).
    wrong_region = "wrong_region"
    # Under spec.transport.tls.mode mutual: the request came without the client
    # certificate of the tenant or region its token is for (403).
    bad_certificate = "bad_certificate"


# HTTP headers (lower-case, as aiohttp normalises lookups).
H_JOB = "X-Fedkube-Job"
H_ROUND = "X-Fedkube-Round"
H_TENANT = "X-Fedkube-Tenant"
H_CLIENT = "X-Fedkube-Client"
H_REGION = "X-Fedkube-Region"
H_CODEC = "X-Fedkube-Codec"
H_WEIGHT = "X-Fedkube-Weight"
H_SIGNATURE = "X-Fedkube-Signature"  # an update's Ed25519 signature (fedkube.wire.signing)

# Keys in the safetensors ``__metadata__`` of a payload.
M_JOB = "fedkube.job"
M_ROUND = "fedkube.round"
M_TENANT = "fedkube.tenant"
M_CLIENT = "fedkube.client"
M_REGION = "fedkube.region"
M_KIND = "fedkube.kind"
M_WEIGHT = "fedkube.weight"
M_COUNT = "fedkube.count"
M_VERSION = "fedkube.version"
M_STEPS = "fedkube.local_steps"  # an update: the client's local optimizer steps τ_i
M_WEIGHTED_STEPS = "fedkube.weighted_steps"  # a partial: Σ w_i·τ_i of its clients

MAX_LOCAL_STEPS = 10**9


@dataclass(frozen=True)
class Envelope:
    """Who sent a payload, for which round, with what weight."""

    job: str
    round: int
    sender: str  # client id for an update, region for a partial
    tenant: str
    weight: float

    def metadata(self, kind: str) -> dict[str, str]:
        return {
            M_JOB: self.job,
            M_ROUND: str(self.round),
            M_REGION if kind == "partial" else M_CLIENT: self.sender,
            M_TENANT: self.tenant,
            M_WEIGHT: repr(float(self.weight)),
            M_KIND: kind,
        }


def parse_int(value: str | None, field: str) -> int:
    try:
        return int(value) if value is not None else _missing(field)
    except ValueError:
        raise UpdateRejected(Reason.malformed.value, f"{field} is not an integer") from None


def parse_weight(value: str | None) -> float:
    try:
        weight = float(value) if value is not None else _missing("weight")
    except ValueError:
        raise UpdateRejected(Reason.bad_weight.value, "weight is not a number") from None
    if not (weight > 0 and weight < float("inf")):
        raise UpdateRejected(Reason.bad_weight.value, f"weight must be positive, got {weight}")
    return weight


def parse_steps(value: str | None, required: bool) -> int:
    """A client's claimed local steps: a positive integer (FedNova divides by it).

    Only FedNova's arithmetic depends on it, so only there is it ``required``;
    elsewhere an update that does not say counts as one step.
    """
    if value is None and not required:
        return 1
    try:
        steps = int(value) if value is not None else _missing("local steps")
    except ValueError:
        raise UpdateRejected(Reason.bad_steps.value, "local steps is not an integer") from None
    if not 1 <= steps <= MAX_LOCAL_STEPS:
        raise UpdateRejected(
            Reason.bad_steps.value, f"local steps must be 1..{MAX_LOCAL_STEPS}, got {steps}"
        )
    return steps


def int_field(document: Mapping[str, Any], name: str, low: int, high: int) -> int:
    """A JSON message's integer field, within ``low..high`` (not a bool, not a string)."""
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpdateRejected(
            Reason.malformed.value, f"{name}: expected an integer, got {type(value).__name__}"
        )
    if not low <= value <= high:
        raise UpdateRejected(Reason.malformed.value, f"{name}: {value} is not in {low}..{high}")
    return value


def first_line(text: str, limit: int) -> str:
    """What a report keeps of a failure's message: its first line, at most ``limit`` chars."""
    return (text.strip().splitlines() or ["(no message)"])[0][:limit]


def _missing(field: str) -> int:
    raise UpdateRejected(Reason.malformed.value, f"missing {field}")


def check_metadata(metadata: dict[str, str], expected: dict[str, str]) -> None:
    """Reject a payload whose embedded metadata disagrees with its headers."""
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise UpdateRejected(
                Reason.metadata_mismatch.value,
                f"payload metadata {key}={metadata.get(key)!r} but request says {value!r}",
            )
