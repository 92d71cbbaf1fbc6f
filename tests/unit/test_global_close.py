"""The close of a round on the global tier, its pure pieces: noise, participation, record."""

from __future__ import annotations

import numpy as np

from fedkube.aggregator.global_aggregator.close import (
    history_record,
    participation,
    privacy_record,
)
from fedkube.aggregator.strategies.sums import Partial
from fedkube.spec import DifferentialPrivacy, DpMode
from fedkube.training.privacy import central_noise_std

REGION_OF = {"a-0": "eu", "a-1": "eu", "b-0": "us", "c-0": "asia"}


def partial(region: str, count: int, weight: float) -> Partial:
    return Partial(region=region, sums={"w": np.zeros(2, np.float32)}, weight=weight, count=count)


def test_central_noise_scales_with_the_clip_norm_over_the_clients_in_the_mean():
    dp = DifferentialPrivacy(mode=DpMode.central, clip_norm=2.0)
    assert central_noise_std(dp, noise_multiplier=1.5, count=4) == 0.75


def test_no_central_noise_is_added_for_an_empty_mean_or_in_local_mode():
    assert (
        central_noise_std(DifferentialPrivacy(mode=DpMode.central, clip_norm=1.0), 1.0, 0) is None
    )
    assert central_noise_std(DifferentialPrivacy(mode=DpMode.local, clip_norm=1.0), 1.0, 5) is None


def test_the_privacy_record_rounds_epsilon_and_the_noise_and_keeps_the_rate():
    record = privacy_record(1.23456789, 1e-5, 0.987654321, 0.5)
    assert record == {
        "epsilon": 1.234568,
        "delta": 1e-5,
        "noise_multiplier": 0.987654,
        "dp_rate": 0.5,
    }


def test_participation_counts_per_region_and_names_regions_that_sent_nothing():
    # prepare: asia had nobody selected; us had one client and sent no partial
    selected = {"a-0", "a-1", "b-0"}
    partials = {"eu": partial("eu", 1, 10.0)}
    # execute
    by_region, missing = participation({"eu", "us", "asia"}, selected, REGION_OF, partials)
    # assert
    assert by_region == {
        "asia": {"selected": 0, "reported": 0},
        "eu": {"selected": 2, "reported": 1},
        "us": {"selected": 1, "reported": 0},
    }
    assert missing == ["us"]


def test_the_history_record_sums_the_partials_and_reads_the_counters():
    record = history_record(
        number=3,
        evaluated={"loss": 0.5, "accuracy": 0.9, "auc": 0.8},
        selected=4,
        partials=[partial("eu", 2, 20.0), partial("us", 1, 5.0)],
        duration_s=1.5,
        counters={"bytes_up": 100, "duplicate": 2},
        regions={"eu": {"selected": 3, "reported": 2}},
        missing=[],
        extensions=1,
        task_failures={"b-1": "boom"},
        strategy="fedavg",
        robust="mean",
        server_state={},
        privacy={"epsilon": 1.0},
        secure=False,
    )
    assert record["reported"] == 3 and record["dropped"] == 1
    assert record["participation"] == 0.75 and record["weight"] == 25.0
    assert (record["loss"], record["accuracy"]) == (0.5, 0.9)
    assert record["metrics"] == {"loss": 0.5, "accuracy": 0.9, "auc": 0.8}
    assert (record["bytes_up"], record["bytes_down"], record["duplicates"], record["late"]) == (
        100, 0, 2, 0,
    )  # fmt: skip
    assert record["epsilon"] == 1.0 and "secagg_bytes" not in record


def test_an_unevaluated_round_with_nobody_selected_records_no_loss_and_no_participation():
    record = history_record(
        number=1, evaluated={}, selected=0, partials=[], duration_s=0.0, counters={},
        regions={}, missing=[], extensions=0, task_failures={}, strategy="fedavg",
        robust="mean", server_state={}, privacy={}, secure=True,
    )  # fmt: skip
    assert record["loss"] is None and record["accuracy"] is None
    assert record["participation"] == 0.0
    assert record["secagg_bytes"] == 0
