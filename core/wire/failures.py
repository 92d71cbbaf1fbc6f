"""What a client says when its task failed a round: so the round need not wait for it.

A worker whose task raised (or returned a bad result) sends nothing for the
round. Without a word, its combiner would wait for the round's deadline; with
this report it knows at once, closes its region's share of the round on the
others, and the global tier can name the tenant and the failure's first line
in the round's record, and in the job's message if the quorum is lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import Reason, first_line, int_field

STEPS = ("model", "data", "train", "evaluate")
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class FailureReport:
    client: str
    round: int
    step: str
    message: str  # the failure's first line

    def document(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "round": self.round,
            "step": self.step,
            "error": self.message,
        }


def check_failure(document: Any) -> FailureReport:
    """A worker's failure report, checked field by field."""

    def refuse(problem: str) -> UpdateRejected:
        return UpdateRejected(Reason.malformed.value, problem)

    if not isinstance(document, Mapping):
        raise refuse('expected {"client", "round", "step", "error"}')
    client, step, error = document.get("client"), document.get("step"), document.get("error")
    if not isinstance(client, str) or not client:
        raise refuse("client: expected a client id")
    number = int_field(document, "round", 1, 10**9)
    if step not in STEPS:
        raise refuse(f"step: expected one of {', '.join(STEPS)}")
    if not isinstance(error, str):
        raise refuse("error: expected the failure's first line")
    return FailureReport(client, number, step, first_line(error, MAX_MESSAGE_CHARS))


def describe(failures: Mapping[str, str], tenant_of: Mapping[str, str]) -> str:
    """``tenant b (client b-0): <first line>; ...``, for a job's message."""
    return "; ".join(
        f"tenant {tenant_of.get(client, '?')} (client {client}): {message}"
        for client, message in sorted(failures.items())
    )
