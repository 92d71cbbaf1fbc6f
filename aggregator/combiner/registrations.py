"""Which clients polled lately: written to Redis no more often than liveness needs.

The global tier treats a client whose registration is older than
``spec.participation.registrationTtlSeconds`` as gone. Every poll used to
rewrite its clients' registrations: a hundred clients polling through a round
cost a hundred Redis writes that changed nothing the TTL could see. A client's
registration is rewritten once it is older than a quarter of the TTL, so it
never looks older than 1.25 x its true age, which leaves the TTL its margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class Registrations:
    """The time this combiner last wrote each client's registration (monotonic clock)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.refresh_s = ttl_s / 4
        self.clock = clock
        self._written: dict[str, float] = {}

    def due(self, clients: Sequence[str]) -> list[str]:
        """Those of ``clients`` whose registration should be written now."""
        now = self.clock()
        return [c for c in clients if now - self._written.get(c, -float("inf")) >= self.refresh_s]

    def written(self, clients: Sequence[str]) -> None:
        now = self.clock()
        for client in clients:
            self._written[client] = now
