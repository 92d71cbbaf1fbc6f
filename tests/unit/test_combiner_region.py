"""The combiner's view of a round, without a network: its rules and its recovery after a restart.

The round rules are pure functions; recovery reads what an earlier
incarnation left in the round store, here a small in-memory stand-in with
the four calls it makes (the integration and chaos tiers run it on Redis).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fedkube.aggregator.combiner.accumulators import RobustBuffer, RunningSum, new_accumulator
from fedkube.aggregator.combiner.clear_intake import ClearIntake
from fedkube.aggregator.combiner.region import REATTACH_S, RegionRound, RegionState, check_open
from fedkube.errors import UpdateRejected
from fedkube.service.metrics import Metrics
from fedkube.spec import parse_job
from fedkube.state.roundstate import RoundInfo
from fedkube.wire.protocol import Reason, RoundState
from tests.support import small_job_dict

TEMPLATE = {"w": ((2, 2), np.dtype(np.float32)), "b": ((2,), np.dtype(np.float32))}


def info(number: int = 3, state: RoundState = RoundState.collecting) -> RoundInfo:
    return RoundInfo(
        round=number,
        state=state,
        token=f"t{number}",
        opened_at=0.0,
        deadline=60.0,
        version=number - 1,
        selected=3,
        quorum=2,
        extensions=0,
    )


def collecting(**fields: object) -> RegionRound:
    current = RegionRound(info=info(), selected={"a", "b", "c"})
    for name, value in fields.items():
        setattr(current, name, value)
    return current


class FakeStore:
    """What RegionState.begin reads and writes, in memory."""

    def __init__(self, selected: set[str], reported: set[str], partials: set[str]):
        self._selected, self._reported, self._partials = selected, reported, partials
        self.forgotten: list[str] = []

    async def selected(self, _number: int) -> set[str]:
        return set(self._selected)

    async def reported(self, _number: int) -> set[str]:
        return set(self._reported)

    async def partials(self, _number: int) -> set[str]:
        return set(self._partials)

    async def forget_reports(self, _number: int, clients: list[str]) -> None:
        self.forgotten += clients


class CountingStore(FakeStore):
    """Records each counter write; each write waits for a go, as a Redis round trip would."""

    def __init__(self) -> None:
        super().__init__(set(), set(), set())
        self.writes: list[tuple[int, dict[str, int]]] = []
        self.go = asyncio.Event()

    async def add_counters(self, number: int, **deltas: int) -> None:
        await self.go.wait()
        self.writes.append((number, deltas))


def region_over(store: FakeStore, timeout_s: float = 60.0) -> RegionState:
    return RegionState("job", "eu", {"a", "b", "c"}, store, Metrics(), timeout_s)  # type: ignore[arg-type]


# -- which update the round still takes ----------------------------------------


def reason_for(current: RegionRound | None, number: int, client: str) -> str:
    with pytest.raises(UpdateRejected) as refused:
        check_open(current, number, client)
    return refused.value.reason


def test_an_update_for_the_open_round_from_a_selected_client_is_taken():
    check_open(collecting(), 3, "a")


def test_an_update_for_a_round_not_yet_open_is_the_wrong_round():
    assert reason_for(collecting(), 4, "a") == Reason.wrong_round.value
    assert reason_for(None, 1, "a") == Reason.wrong_round.value


def test_a_second_update_from_a_folded_client_is_a_duplicate_even_after_the_flush():
    assert reason_for(collecting(folded={"a"}, flushed=True), 3, "a") == Reason.duplicate.value


def test_an_update_after_the_flush_or_for_an_earlier_round_is_late():
    assert reason_for(collecting(flushed=True), 3, "b") == Reason.late.value
    assert reason_for(collecting(), 2, "b") == Reason.late.value


def test_an_owed_resend_is_taken_after_the_deadline_but_a_new_update_is_late():
    # prepare: the global tier asked for the flush; "a" was folded by a dead incarnation
    current = collecting(owed={"a"})
    current.info = info(state=RoundState.aggregating)
    # execute / assert
    check_open(current, 3, "a")
    assert reason_for(current, 3, "b") == Reason.late.value


def test_an_update_from_a_client_not_selected_is_refused_by_name():
    current = collecting(selected={"a"})
    with pytest.raises(UpdateRejected, match="b was not selected for round 3"):
        check_open(current, 3, "b")


# -- the tasks a poll gets -------------------------------------------------------


def clear_intake() -> ClearIntake:
    job = parse_job(small_job_dict())
    return ClearIntake(job, region_over(FakeStore(set(), set(), set())), None, None)  # type: ignore[arg-type]


def test_selected_clients_that_have_not_reported_get_train_and_owed_clients_resend():
    # prepare
    current = collecting(folded={"b"}, owed={"c"})
    # execute
    tasks = clear_intake().tasks_for(current, {"a", "b", "c", "z"}, after=2)
    # assert
    assert [(t["client"], t["status"]) for t in tasks] == [("a", "train"), ("c", "resend")]
    assert all(t["round"] == 3 and t["version"] == 2 for t in tasks)


def test_a_client_that_already_saw_the_round_or_a_round_past_collecting_gets_no_train():
    assert clear_intake().tasks_for(collecting(), {"a"}, after=3) == []
    late = collecting()
    late.info = info(state=RoundState.aggregating)
    assert clear_intake().tasks_for(late, {"a"}, after=2) == []


def test_the_region_has_heard_from_all_once_each_selected_client_folded_or_failed():
    assert not collecting(folded={"a"}, failed={"b"}).heard_from_all()
    assert collecting(folded={"a", "c"}, failed={"b"}).heard_from_all()


# -- opening a round after a restart ---------------------------------------------


def test_a_fresh_round_selects_the_regions_clients_and_owes_nothing():
    # prepare
    region = region_over(FakeStore({"a", "b", "x-elsewhere"}, set(), set()))
    # execute
    current = asyncio.run(region.begin(info(), secure=False))
    # assert
    assert current.selected == {"a", "b"} and current.owed == set() and not current.flushed
    assert region.current is current


def test_a_restart_mid_round_owes_what_the_dead_incarnation_folded_for_a_bounded_window():
    # prepare: two reports in Redis, the sum that held them is gone
    region = region_over(FakeStore({"a", "b", "c"}, {"a", "b"}, set()), timeout_s=8.0)
    # execute
    before = time.monotonic()
    current = asyncio.run(region.begin(info(), secure=False))
    # assert: asked again, within half the round timeout (under REATTACH_S)
    assert current.owed == {"a", "b"}
    assert before + 4.0 <= current.reattach_by <= time.monotonic() + min(REATTACH_S, 4.0)
    assert current.waits_for_resends(before) and not current.waits_for_resends(before + 60)


def test_a_restart_after_the_global_tier_took_the_partial_has_nothing_to_collect():
    region = region_over(FakeStore({"a"}, {"a"}, {"eu"}))
    current = asyncio.run(region.begin(info(), secure=False))
    assert current.flushed and current.owed == set()


def test_a_restart_under_secure_aggregation_drops_the_clients_whose_keys_died():
    # prepare
    store = FakeStore({"a", "b", "c"}, {"a"}, set())
    # execute
    current = asyncio.run(region_over(store).begin(info(), secure=True))
    # assert: not owed (a second protocol run would reveal two sums), forgotten
    assert current.owed == set() and current.selected == {"b", "c"}
    assert store.forgotten == ["a"]


# -- where accepted updates go ------------------------------------------------------


def test_a_running_sum_folds_weighted_updates_into_one_partial():
    # prepare
    accumulator = new_accumulator(parse_job(small_job_dict()).spec.strategy, TEMPLATE, 2)
    one = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    # execute
    accumulator.add(one, 2.0, 2.0, 1.0)
    accumulator.add({k: 3 * v for k, v in one.items()}, 1.0, 1.0, 4.0)
    result = accumulator.reduce()
    # assert: Σ w·Δ = 2·1 + 1·3, Σ w = 3, Σ w·τ = 2·1 + 1·4
    assert isinstance(accumulator, RunningSum)
    np.testing.assert_allclose(result.tensors["w"], np.full((2, 2), 5.0))
    assert (result.weight, result.count, result.steps) == (3.0, 2, 6.0)


def test_a_robust_rule_buffers_updates_and_sends_its_estimate_times_the_weight():
    # prepare: a median over three updates, one of them huge
    strategy = parse_job(
        small_job_dict(strategy={"name": "fedavg", "robust": {"rule": "median"}})
    ).spec.strategy
    accumulator = new_accumulator(strategy, TEMPLATE, 3)
    # execute
    for value in (1.0, 2.0, 1000.0):
        update = {"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)}
        accumulator.add(update, 1.0, 1.0, 1.0)
    result = accumulator.reduce()
    # assert: median 2, times Σw 3
    assert isinstance(accumulator, RobustBuffer)
    np.testing.assert_allclose(result.tensors["b"], np.full(2, 6.0))
    assert (result.weight, result.count) == (3.0, 3)


# -- the round's counters ------------------------------------------------------


def test_counts_made_while_a_write_is_in_flight_go_in_one_write_and_are_all_in_before_the_partial():
    async def scenario() -> list[tuple[int, dict[str, int]]]:
        # prepare: Redis holds the first write until told to go
        store = CountingStore()
        region = region_over(store)
        # execute: one count starts a write; ten more arrive while it waits
        await region.count(3, bytes_down=100)
        await asyncio.sleep(0)  # the writer task starts and waits on "Redis"
        for _ in range(10):
            await region.count(3, bytes_up=40, duplicate=0)
        await region.count(4, late=1)
        store.go.set()
        await region.counted()
        return store.writes

    writes = asyncio.run(scenario())
    # assert: the first write alone, then the eleven others batched per round; nothing lost
    assert writes == [
        (3, {"bytes_down": 100}),
        (3, {"bytes_up": 400, "duplicate": 0}),
        (4, {"late": 1}),
    ]
