"""A client's durable state: kept across restarts, never another run's."""

from __future__ import annotations

import numpy as np

from fedkube.workers.client_state import ClientState


def test_a_saved_set_comes_back_in_later_rounds(tmp_path):
    # prepare
    state = ClientState(tmp_path, "job", "a-0")
    saved = {"w": np.arange(4, dtype=np.float32)}
    # execute
    state.save("scaffold-control", saved, round_no=3)
    restarted = ClientState(tmp_path, "job", "a-0")  # a new worker process
    # assert
    loaded = restarted.load("scaffold-control", before_round=4)
    assert loaded is not None
    np.testing.assert_array_equal(loaded["w"], saved["w"])
    assert not list(tmp_path.glob("*.tmp"))


def test_another_jobs_or_clients_or_a_later_rounds_state_is_ignored(tmp_path):
    # prepare
    ClientState(tmp_path, "job", "a-0").save("s", {"w": np.ones(2, np.float32)}, round_no=5)
    # execute / assert
    assert ClientState(tmp_path, "other-job", "a-0").load("s", before_round=9) is None
    assert ClientState(tmp_path, "job", "b-0").load("s", before_round=9) is None
    # a new run of the same job starts at round 1: round 5's state is not its own
    assert ClientState(tmp_path, "job", "a-0").load("s", before_round=1) is None
    assert ClientState(tmp_path, "job", "a-0").load("never-saved", before_round=9) is None
