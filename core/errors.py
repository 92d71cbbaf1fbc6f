"""Every exception fedkube raises on purpose, in one place.

Callers catch these by meaning (a bad manifest, a rejected update) instead of
catching broad exceptions that would hide real bugs.
"""

from __future__ import annotations


class FedkubeError(Exception):
    """Base class for fedkube's own errors."""


class SpecError(FedkubeError):
    """A FederatedJob manifest is invalid.

    ``problems`` holds ``(field_path, reason)`` pairs, so that the CLI, the
    operator and the tests can all name the offending field.
    """

    subject = "FederatedJob"

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{path}: {reason}" for path, reason in problems]
        super().__init__(f"invalid {self.subject}:\n  " + "\n  ".join(lines))


class ConfigError(SpecError):
    """The operator's flags are invalid (same shape as a manifest problem)."""

    subject = "operator configuration"


class PolicyError(SpecError):
    """A site policy file is invalid (same shape as a manifest problem)."""

    subject = "site policy"


class SigningKeyError(SpecError):
    """A tenant's signing key or public key is missing or malformed (names its source)."""

    subject = "signing key"


class PolicyRefused(SpecError):
    """A job asks a site for something its policy refuses; ``problems`` name each rule."""

    subject = "FederatedJob for this policy"

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        FedkubeError.__init__(
            self, "refused by the policy:\n  " + "\n  ".join(m for _, m in problems)
        )


class RefusalNotDelivered(FedkubeError):
    """A site could not tell the central combiner that it refuses a tenant (retried)."""


class EntrypointError(FedkubeError):
    """A ``module:callable`` entrypoint cannot be resolved."""


class CodecError(FedkubeError):
    """Bytes that claim to be a tensor payload are not one we accept."""


class UpdateRejected(FedkubeError):
    """A worker's update (or a combiner's partial) failed validation.

    ``reason`` is a short stable token used as the ``reason`` label of
    ``fedkube_updates_rejected_total``; ``status`` is the HTTP status returned;
    ``retry_after`` (seconds), when set, goes out as the Retry-After header of
    a refusal that asks the sender to come back (busy).
    """

    def __init__(self, reason: str, detail: str, status: int = 400, retry_after: int | None = None):
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{reason}: {detail}")


class QuorumNotReached(FedkubeError):
    """A round hit its deadline without enough reports and may not extend."""


class SecureAggregationFailed(FedkubeError):
    """A region's secure aggregation cannot produce its sum (too few shares, a bad task)."""


class CheckpointError(FedkubeError):
    """A checkpoint is missing, unreadable or belongs to another job."""


class LeaseLost(FedkubeError):
    """Another process holds the lease this one needs (split-brain guard)."""


class ExportError(FedkubeError):
    """A job's result cannot be exported (no adapters, no checkpoint, a mismatch)."""
