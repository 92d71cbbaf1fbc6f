"""Round state on a real redis-server."""

from __future__ import annotations

import pytest

from fedkube.errors import LeaseLost
from fedkube.state.roundstate import RoundStore, select_clients
from fedkube.wire.protocol import RoundState

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(redis_server):
    store = RoundStore.connect(redis_server.url, "jobx")
    yield store
    await store.close()


async def test_a_round_opens_collects_and_closes(store):
    info = await store.open_round(1, ["a-0", "b-0"], quorum=1, timeout_s=30, version=1)
    assert info.state == RoundState.collecting
    assert await store.current_round() == 1
    assert await store.selected(1) == {"a-0", "b-0"}
    assert await store.record_report(1, "a-0", 10.0)
    assert await store.transition(1, RoundState.collecting, RoundState.aggregating)
    assert not await store.transition(1, RoundState.collecting, RoundState.aggregating)
    await store.close_round(1, {"round": 1, "reported": 1, "dropped": 1}, ttl_seconds=60)
    assert (await store.round_info(1)).state == RoundState.closed
    assert [r["round"] for r in await store.history()] == [1]
    assert 0 < await store.redis.ttl(store.key("round", 1)) <= 60


async def test_the_same_report_twice_is_harmless_and_detected(store):
    await store.open_round(1, ["a-0"], quorum=1, timeout_s=30, version=1)
    assert await store.record_report(1, "a-0", 10.0)
    assert not await store.record_report(1, "a-0", 99.0)
    assert await store.reported(1) == {"a-0": 10.0}


async def test_an_evaluation_report_is_folded_into_its_tenants_sums_once(store):
    # prepare
    info = await store.open_evaluation(2, 3, ["a-0", "a-1", "b-0"], timeout_s=30, final=False)
    # execute
    first = await store.record_evaluation(2, "a-0", "a", 100, {"auroc": 0.9})
    again = await store.record_evaluation(2, "a-0", "a", 100, {"auroc": 0.1})
    await store.record_evaluation(2, "a-1", "a", 300, {"auroc": 0.5})
    await store.record_evaluation(2, "b-0", "b", 0, {}, error="evaluate: OSError: gone")
    # assert
    assert (first, again) == (True, False)
    assert (await store.evaluation()) == info and info.open
    assert await store.evaluation_done(2) == {"a-0", "a-1", "b-0"}
    sums, failed = await store.evaluation_results(2)
    assert sums == {"a|examples": "400", "a|clients": "2", "a|w|auroc": "240", "a|n|auroc": "400"}
    assert failed == {"b-0": "evaluate: OSError: gone"}
    await store.close_evaluation(2, ttl_seconds=60)
    assert not (await store.evaluation()).open


async def test_illegal_transitions_are_refused_before_touching_redis(store):
    await store.open_round(1, ["a-0"], quorum=1, timeout_s=30, version=1)
    with pytest.raises(ValueError, match="illegal"):
        await store.transition(1, RoundState.collecting, RoundState.closed)


async def test_a_finished_job_leaves_only_expiring_keys(store):
    await store.start_job(rounds=1)
    await store.open_round(1, ["a-0"], quorum=1, timeout_s=30, version=1)
    await store.finish_job("succeeded", "done", ttl_seconds=120)
    keys = [k async for k in store.redis.scan_iter(match=store.prefix + "*")]
    assert keys
    for key in keys:
        assert 0 < await store.redis.ttl(key) <= 120, key
    assert await store.delete_all() == len(keys)
    assert [k async for k in store.redis.scan_iter(match=store.prefix + "*")] == []


async def test_a_lease_has_one_holder(store):
    assert await store.acquire_lease("global", "one", ttl_ms=5000)
    assert not await store.acquire_lease("global", "two", ttl_ms=5000)
    await store.renew_lease("global", "one", ttl_ms=5000)
    with pytest.raises(LeaseLost):
        await store.renew_lease("global", "two", ttl_ms=5000)
    await store.release_lease("global", "one")
    assert await store.acquire_lease("global", "two", ttl_ms=5000)


def test_selection_is_seeded_and_sized_by_fraction():
    clients = [f"t{i}-0" for i in range(10)]
    assert select_clients(clients, 0.5, seed=1, number=3) == select_clients(clients, 0.5, 1, 3)
    assert len(select_clients(clients, 0.5, seed=1, number=3)) == 5
    assert select_clients(clients, 1.0, seed=1, number=3) == sorted(clients)
