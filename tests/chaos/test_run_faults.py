"""Chaos suite: components of a real ``fedkube run`` job die or freeze mid-round.

Every service is its own process, Redis a real ``redis-server`` with its
append-only file, and the runner's supervision restarts what dies, as
Kubernetes would. Each test waits on the round state in Redis to pick its
moment (or, for a step inside a process, a test-only fault point) and then
checks that the job ends as if nothing had happened: every round once, every
accepted update in it, and, where training is deterministic, the very same
final model as an undisturbed run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedkube.local.runner import RunOptions, run_job
from fedkube.state import checkpoint
from tests.chaos.faults import Finished, chaos_run
from tests.support import small_job_dict

pytestmark = pytest.mark.integration

# Quorum is every client: a lost update would hold its round to the deadline
# and then fail the job, so "succeeded with 4 of 4 every round" means none lost.
STRICT = {"minFraction": 1.0, "roundTimeoutSeconds": 30, "maxExtensions": 0}


def write_job(folder: Path, name: str, **spec: Any) -> Path:
    document = small_job_dict(**spec)
    document["metadata"]["name"] = name
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The final model of the strict job when nothing goes wrong."""
    folder = tmp_path_factory.mktemp("undisturbed")
    job = write_job(folder, "chaos", rounds=3, participation=STRICT)
    result = run_job(RunOptions(job_path=job, out_dir=folder / "chaos", quiet=True))
    # run_job, in process, returns the history it wrote
    assert result.status == "succeeded", result.message
    assert [r["round"] for r in result.history] == [1, 2, 3]
    assert result.history_path is not None and result.history_path.exists()
    saved = checkpoint.load_latest(folder / "chaos" / "checkpoints", "chaos")
    assert saved is not None
    return saved.weights


def assert_nothing_lost(result: Finished, rounds: int) -> None:
    assert result.status == "succeeded", result.message
    assert [r["round"] for r in result.history] == list(range(1, rounds + 1))
    assert [(r["reported"], r["dropped"]) for r in result.history] == [(4, 0)] * rounds


def assert_same_model(result: Finished, undisturbed: dict[str, np.ndarray]) -> None:
    final = result.final_weights()
    assert final.keys() == undisturbed.keys()
    for name, value in undisturbed.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


def test_a_combiner_killed_mid_round_loses_no_accepted_update_and_the_model_is_exact(
    tmp_path, undisturbed
):
    # prepare: combiner-eu dies (SIGKILL, inside the process) as the second
    # update of round 2 reaches it, after it folded and acknowledged the first
    job = write_job(tmp_path, "chaos", rounds=3, participation=STRICT)
    with chaos_run(job, tmp_path, faults="combiner.eu.update2@2") as chaos:
        # execute: the runner restarts it on its port; the workers reattach
        result = chaos.finish()
    # assert: both eu updates of round 2 are in, once; the model is bit-identical
    assert result.restarts == {"combiner-eu": 1}
    assert_nothing_lost(result, 3)
    assert_same_model(result, undisturbed)
    log = (result.out / "logs" / "combiner-eu.log").read_text()
    assert "asking 1 clients to resend the updates folded before" in log


def test_the_global_aggregator_killed_between_reduce_and_checkpoint_and_between_checkpoint_and_close_repeats_and_skips_no_round(  # noqa: E501
    tmp_path, undisturbed
):
    # prepare: two test-only fault points, one per window of round closing
    job = write_job(tmp_path, "chaos", rounds=3, participation=STRICT)
    faults = "global.after_reduce@2,global.after_checkpoint@3"
    with chaos_run(job, tmp_path, faults=faults) as chaos:
        # execute: each time the runner restarts it with --resume
        result = chaos.finish()
    # assert
    assert result.restarts == {"global": 2}
    assert_nothing_lost(result, 3)
    assert_same_model(result, undisturbed)
    log = (result.out / "logs" / "global.log").read_text()
    assert "resuming after round 1 (2 partials kept)" in log
    assert "round 3 was checkpointed but not closed in Redis; closed it now" in log


def test_redis_killed_mid_round_is_restarted_from_its_append_only_file_and_nothing_is_lost(
    tmp_path, undisturbed
):
    # prepare: round 1 held open by a worker frozen before it registered (a
    # quorum of 3 lets the round open; the round still waits for all 4)
    job = write_job(tmp_path, "chaos", rounds=3, participation={**STRICT, "minFraction": 0.75})
    with chaos_run(job, tmp_path) as chaos:
        chaos.wait(lambda: (chaos.run.out / "pids" / "worker-d-0").exists(), "worker d-0")
        chaos.freeze("worker-d-0")
        chaos.wait(lambda: len(chaos.reported(1)) == 3, "three updates of round 1 recorded")
        # execute: SIGKILL redis-server mid-round; the runner starts it again on its port
        chaos.kill("redis")
        chaos.wait(lambda: len(chaos.reported(1)) == 3, "Redis back with the three reports")
        chaos.thaw("worker-d-0")
        result = chaos.finish()
    # assert: every component reconnected and the job went on at the same round
    assert result.restarts == {"redis": 1}
    assert_nothing_lost(result, 3)
    assert_same_model(result, undisturbed)


def test_redis_frozen_past_the_round_deadline_pauses_the_job_which_then_recovers(tmp_path):
    # prepare: round 1 held open by a worker frozen before it registered; the
    # round closes at its deadline with whoever reported (3 of 4 would do), so
    # 4 of 4 in round 1 shows that the outage's time was given back to it
    participation = {**STRICT, "minFraction": 0.75, "roundTimeoutSeconds": 8}
    job = write_job(tmp_path, "chaos", rounds=3, participation=participation)
    with chaos_run(job, tmp_path) as chaos:
        chaos.wait(lambda: (chaos.run.out / "pids" / "worker-d-0").exists(), "worker d-0")
        chaos.freeze("worker-d-0")
        chaos.wait(lambda: len(chaos.reported(1)) == 3, "three updates of round 1 recorded")
        deadline = float(chaos.redis.hget(chaos.prefix + "round:1", "deadline"))
        # execute: freeze redis-server (alive, silent) until well past the deadline
        chaos.freeze("redis")
        global_log = chaos.run.out / "logs" / "global.log"
        chaos.wait(
            lambda: "rounds pause until it is back" in global_log.read_text(),
            "the global aggregator to notice the outage",
            timeout=30,
        )
        chaos.wait(lambda: time.time() > deadline + 2, "the round's deadline to pass", 30)
        chaos.thaw("worker-d-0")
        chaos.thaw("redis")
        result = chaos.finish()
    # assert: a clear status during the outage, then the job carried on
    assert_nothing_lost(result, 3)
    assert any("round state (Redis) unreachable" in e for e in result.events), result.events
    assert any("round state (Redis) back after" in e for e in result.events), result.events


def test_a_regions_combiner_frozen_lets_rounds_close_on_the_other_region_and_rejoins(tmp_path):
    # prepare: quorum is half, so eu alone can carry a round
    participation = {"minFraction": 0.5, "roundTimeoutSeconds": 3}
    job = write_job(tmp_path, "chaos", rounds=7, participation=participation)
    with chaos_run(job, tmp_path) as chaos:
        chaos.wait(lambda: chaos.closed() >= 1, "round 1 to close")
        # execute: every combiner of region us stops answering for two rounds
        chaos.freeze("combiner-us")
        frozen_at = chaos.closed()
        chaos.wait(lambda: chaos.closed() >= frozen_at + 2, "two rounds to close", 60)
        thawed_at = chaos.closed()
        chaos.thaw("combiner-us")
        result = chaos.finish()
    # assert: rounds went on without us, said so, and us came back
    assert result.status == "succeeded", result.message
    assert [r["round"] for r in result.history] == [1, 2, 3, 4, 5, 6, 7]
    without_us = [r for r in result.history if r["missing_regions"] == ["us"]]
    assert without_us and all(r["regions"]["eu"]["reported"] == 2 for r in without_us)
    assert all(r["round"] > frozen_at for r in without_us)
    after = [r for r in result.history if r["round"] > thawed_at + 1]
    assert after and all(r["missing_regions"] == [] for r in after), result.history
