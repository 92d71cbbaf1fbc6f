"""When a region's secure aggregation moves on to its next step, and what each client is asked.

:class:`fedkube.wire.secagg.ServerSession` holds the protocol's state and checks
every message; this module decides the timing, with no I/O, so that the
combiner only feeds it messages and the clock. A step ends when every client
still in has answered, or when ``phaseTimeoutSeconds`` ran out (the first
step, key advertisement, ends instead when every selected client advertised
or when the global tier asks for the region's partial at the round's
deadline). The clients that did not answer in time are the round's dropouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fedkube.errors import SecureAggregationFailed
from fedkube.spec import MIN_SECURE_REGION, SecureAggregation
from fedkube.wire.secagg import ServerSession


class Claim(NamedTuple):
    """What a client said with its keys: its samples, what it counts for, its local steps."""

    weight: float
    counted: float  # its weight in the sum (1 under differential privacy)
    steps: int


@dataclass
class SecureRegion:
    """One round's secure aggregation in one region, and its clock."""

    session: ServerSession
    selected: set[str]
    config: SecureAggregation
    step_deadline: float = 0.0  # time.monotonic() at which the current step stops waiting
    claims: dict[str, Claim] = field(default_factory=dict)

    @property
    def step(self) -> str:
        return self.session.step

    def waiting_on(self) -> set[str]:
        """The clients the current step still waits for."""
        s = self.session
        if s.step == "advertise":
            return self.selected - s.members.keys()
        if s.step == "share":
            return s.members.keys() - s.shared
        if s.step == "mask":
            return s.shared - s.masked
        if s.step == "unmask":
            return s.masked - s.unmasked
        return set()

    def due(self, now: float, flush_requested: bool) -> bool:
        """Whether the current step ends now."""
        if self.step in ("finish", "done"):
            return False
        if self.step == "advertise":
            return bool(self.session.members) and (flush_requested or not self.waiting_on())
        return not self.waiting_on() or now >= self.step_deadline

    def advance(self, now: float) -> None:
        """End the current step (``due`` said so) and start the next one.

        Raises :class:`SecureAggregationFailed` when too few clients are left
        for the sum to hide any one of them, or to rebuild the secrets.
        """
        s = self.session
        if s.step == "advertise":
            self._need(len(s.members), MIN_SECURE_REGION, "sent their keys")
            s.close_advertising()
        elif s.step == "share":
            self._need(len(s.shared), MIN_SECURE_REGION, "shared their secrets")
            s.close_sharing()
        elif s.step == "mask":
            # Bonawitz: fewer than t masked updates and the server must not unmask.
            self._need(len(s.masked), max(s.threshold, MIN_SECURE_REGION), "sent masked updates")
            s.close_masking()
        elif s.step == "unmask":
            s.step = "finish"
            return
        self.step_deadline = now + self.config.phase_timeout_seconds

    def _need(self, have: int, needed: int, what: str) -> None:
        if have < needed:
            raise SecureAggregationFailed(
                f"round {self.session.round}: {have} clients {what}, at least {needed} needed"
            )

    def task(self, client: str) -> dict[str, object] | None:
        """What ``client`` should do for the protocol now, or None."""
        s = self.session
        if client not in s.members:
            return None
        if s.step == "share" and client not in s.shared:
            return {"status": "share", **s.share_task(client)}
        if s.step == "mask" and client in s.shared and client not in s.masked:
            return {"status": "mask", **s.mask_task(client)}
        if s.step == "unmask" and client in s.masked and client not in s.unmasked:
            return {"status": "unmask", **s.unmask_task(client)}
        return None
