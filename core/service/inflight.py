"""How many update bytes a combiner receives at once: a budget, in total and per tenant.

A body's memory is committed as its bytes arrive (:mod:`fedkube.service.bodies`),
but a tenant that opens many uploads and feeds each of them steadily could
still grow a combiner until it fails, and every tenant of its region with it.
The budget counts each upload's announced length from the moment it is
admitted until its buffer is given back (after the update is folded). An
upload that would take its tenant past the tenant's share is answered
``429 busy``, one that would take the combiner past its total ``503 busy``,
both with ``Retry-After``: an honest worker keeps its update and sends it again,
so a full budget delays a round and loses nothing. The tenant's share keeps
one tenant from taking the whole budget while the others wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import Reason

# Seconds a refused sender waits before it tries again: long enough that a full
# combiner is not asked again at once, short against a round.
RETRY_AFTER_S = 1


class InflightBudget:
    """Announced bytes of the bodies being received, against ``total`` and ``per_tenant``."""

    def __init__(self, total: int, per_tenant: int):
        if not 0 < per_tenant <= total:
            raise ValueError(f"need 0 < per_tenant <= total, got {per_tenant} and {total}")
        self.total = total
        self.per_tenant = per_tenant
        self.in_flight = 0
        self.high_water = 0
        self._by_tenant: dict[str, int] = {}

    def of(self, tenant: str) -> int:
        """The bytes ``tenant``'s uploads hold now."""
        return self._by_tenant.get(tenant, 0)

    def admit(self, tenant: str, size: int) -> None:
        """Count ``size`` bytes for ``tenant``, or refuse them (busy) and count nothing."""
        held = self.of(tenant)
        if held + size > self.per_tenant:
            raise UpdateRejected(
                Reason.busy.value,
                f"tenant {tenant!r} is sending {held} bytes already; {size} more would pass "
                f"its share of {self.per_tenant} (spec.transport.maxInflightBytesPerTenant)",
                429,
                retry_after=RETRY_AFTER_S,
            )
        if self.in_flight + size > self.total:
            raise UpdateRejected(
                Reason.busy.value,
                f"receiving {self.in_flight} bytes already; {size} more would pass "
                f"{self.total} (spec.transport.maxInflightBytes)",
                503,
                retry_after=RETRY_AFTER_S,
            )
        self._by_tenant[tenant] = held + size
        self.in_flight += size
        self.high_water = max(self.high_water, self.in_flight)

    def release(self, tenant: str, size: int) -> None:
        """Give back what :meth:`admit` counted for one upload."""
        left = self.of(tenant) - size
        if left < 0 or size > self.in_flight:
            raise ValueError(f"releasing {size} bytes that tenant {tenant!r} does not hold")
        if left:
            self._by_tenant[tenant] = left
        else:
            del self._by_tenant[tenant]
        self.in_flight -= size

    @contextlib.contextmanager
    def hold(self, tenant: str, size: int) -> Iterator[None]:
        """:meth:`admit` for the block's duration, released however it ends."""
        self.admit(tenant, size)
        try:
            yield
        finally:
            self.release(tenant, size)
