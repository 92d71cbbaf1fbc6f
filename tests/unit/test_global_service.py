"""run_global's final status: the round loop's, "stopped", or "lease-lost" (no Redis).

The aggregator is replaced by a stand-in that keeps the real lease (with a
store whose renewal says another process holds it) and the real round-loop
check of ``stopping``: a lost lease stops the loop and must still read as
"lease-lost", whichever of the two tasks the event loop finishes first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedkube.aggregator.global_aggregator import service
from fedkube.errors import LeaseLost
from fedkube.state.lease import Lease


class Store:
    job = "job"

    def __init__(self, taken: bool):
        self.taken = taken

    async def renew_lease(self, role: str, token: str, ttl_ms: int) -> None:
        if self.taken:
            raise LeaseLost(f"lease {role!r} is held by another process")

    async def release_lease(self, role: str, token: str) -> None:
        pass


class StandIn:
    """What run_global uses of GlobalAggregator, with its real lease handling."""

    lease_lost = service.GlobalAggregator.lease_lost
    check_stopping = service.GlobalAggregator.check_stopping
    instances: list[StandIn] = []

    def __init__(self, _config: Any, *, taken: bool = False, status: str | None = None):
        self.stopping = asyncio.Event()
        self.lease = Lease(Store(taken), "global", ttl_ms=30)  # type: ignore[arg-type]
        self.lease_task: asyncio.Task[None] | None = None
        self.status = status
        self.port = 8080
        self.stopped = False
        StandIn.instances.append(self)

    async def start(self) -> None:
        self.lease_task = asyncio.create_task(self.lease.keep(self.stopping))

    async def run(self) -> str:
        while self.status is None:
            self.check_stopping()
            await asyncio.sleep(0.001)
        return self.status

    async def stop(self) -> None:
        self.stopping.set()
        self.stopped = True


def stand_in(monkeypatch: pytest.MonkeyPatch, **behaviour: Any) -> None:
    StandIn.instances.clear()
    monkeypatch.setattr(service, "GlobalAggregator", lambda config: StandIn(config, **behaviour))


async def test_a_lease_taken_by_another_process_ends_the_run_as_lease_lost(monkeypatch):
    # prepare
    stand_in(monkeypatch, taken=True)
    # execute
    status = await asyncio.wait_for(service.run_global(None, asyncio.Event()), timeout=5)  # type: ignore[arg-type]
    # assert
    assert status == "lease-lost"
    assert StandIn.instances[0].stopped


async def test_the_round_loops_status_is_the_runs_status(monkeypatch):
    stand_in(monkeypatch, status="succeeded")
    status = await asyncio.wait_for(service.run_global(None, asyncio.Event()), timeout=5)  # type: ignore[arg-type]
    assert status == "succeeded"


async def test_a_stop_request_ends_the_run_as_stopped(monkeypatch):
    stand_in(monkeypatch)
    stop = asyncio.Event()
    ports: list[int] = []
    run = asyncio.create_task(service.run_global(None, stop, ports.append))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(run, timeout=5) == "stopped"
    assert ports == [8080] and StandIn.instances[0].stopped
