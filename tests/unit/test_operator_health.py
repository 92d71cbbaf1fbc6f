"""The operator's ``/healthz`` reports on its event loop; ``/metrics`` stays as it was."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from fedkube.operator.health import Heartbeat, health_app, serve


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    clock = FakeClock()
    heartbeat = Heartbeat(clock=clock)
    registry = CollectorRegistry()
    Counter("fedkube_operator_example_total", "An example.", registry=registry).inc()
    server = serve(health_app(registry, heartbeat, max_age=30), "127.0.0.1", 0)
    yield clock, heartbeat, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_healthz_is_ok_while_the_loop_beats(served):
    # prepare
    clock, heartbeat, url = served
    clock.now += 25
    # execute
    status, body = get(f"{url}/healthz")
    # assert
    assert (status, body) == (200, "ok\n")


def test_healthz_fails_and_says_how_long_once_the_loop_stops_beating(served):
    # prepare
    clock, heartbeat, url = served
    clock.now += 45
    # execute
    status, body = get(f"{url}/healthz")
    # assert
    assert status == 503
    assert body == "event loop has not run for 45 s (limit 30 s)\n"


def test_a_new_beat_makes_it_healthy_again(served):
    # prepare
    clock, heartbeat, url = served
    clock.now += 45
    # execute
    heartbeat.beat()
    # assert
    assert get(f"{url}/healthz")[0] == 200


def test_metrics_are_served_beside_the_health_endpoint(served):
    # prepare
    _, _, url = served
    # execute
    status, body = get(f"{url}/metrics")
    # assert
    assert status == 200
    assert "fedkube_operator_example_total 1.0" in body


def test_the_heartbeat_task_beats_from_the_event_loop():
    # prepare: a clock that only the loop's task can move the beat forward on
    clock = FakeClock()
    heartbeat = Heartbeat(clock=clock)
    clock.now += 100

    async def run_briefly() -> None:
        task = asyncio.create_task(heartbeat.keep(interval=0.01))
        await asyncio.sleep(0.05)
        task.cancel()

    # execute
    asyncio.run(run_briefly())
    # assert
    assert heartbeat.age() == 0
