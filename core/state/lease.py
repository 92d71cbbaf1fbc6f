"""Holding a role's lease in Redis: one writer per role (the global tier, each region's combiner).

A combiner and the global aggregator are Deployments of one replica, but a
rolling update, a node that looks dead and is not, or a second ``fedkube run``
against the same Redis can start a second copy. The lease (a Redis key with a
TTL, ``fedkube:{job}:lease:<role>``) decides which copy writes: the holder
renews it three times per TTL; a copy that finds it held by another stops.
A Redis outage is not a loss: renewal retakes a lease that lapsed meanwhile
(``RoundStore.renew_lease``), and only a lease that another process holds now
raises :class:`~fedkube.state.roundstate.LeaseLost`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from redis.exceptions import RedisError

from fedkube.service.logs import fields
from fedkube.state.roundstate import LeaseLost, RoundStore

# Long enough to ride out a scheduling hiccup on a busy node, short enough
# that a replacement takes over within seconds of a crash.
LEASE_TTL_MS = 5000

log = logging.getLogger("fedkube.state.lease")


class Lease:
    """One process's claim on ``role``; ``keep()`` is its renewal task."""

    def __init__(self, store: RoundStore, role: str, ttl_ms: int = LEASE_TTL_MS):
        self.store = store
        self.role = role
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(8)

    async def acquire(self) -> None:
        """Wait until this process holds the lease (another holder's TTL runs out first)."""
        while not await self.store.acquire_lease(self.role, self.token, self.ttl_ms):
            log.info("waiting for lease %s", self.role, extra=fields(job=self.store.job))
            await asyncio.sleep(self.ttl_ms / 4000)

    async def keep(self, stopped: asyncio.Event) -> None:
        """Renew until ``stopped``; sets ``stopped`` and raises LeaseLost if another took it.

        A renewal that fails on Redis is logged and tried again at the next
        tick: the lease survives an outage shorter than its TTL, and a longer
        one is retaken if nobody else took it meanwhile.
        """
        try:
            while not stopped.is_set():
                await asyncio.sleep(self.ttl_ms / 3000)
                try:
                    await self.store.renew_lease(self.role, self.token, self.ttl_ms)
                except RedisError as exc:
                    log.warning(
                        "lease %s: renewal failed: %s",
                        self.role,
                        exc,
                        extra=fields(job=self.store.job),
                    )
        except LeaseLost:
            log.error("lost lease %s; stopping", self.role, extra=fields(job=self.store.job))
            stopped.set()
            raise

    async def release(self) -> None:
        """Give the lease up now (a clean stop), so a successor need not wait for the TTL."""
        await self.store.release_lease(self.role, self.token)
