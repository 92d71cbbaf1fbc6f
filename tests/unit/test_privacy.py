"""Differential privacy's pure parts: the accountant, clipping, noise, the spec's rules."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.spec import DifferentialPrivacy, DpMode, parse_job
from fedkube.training import norms, privacy
from tests.support import small_job_dict


def test_the_accountant_reproduces_a_published_epsilon():
    # Opacus' documentation of compute_dp_sgd_privacy (an RDP accountant, from
    # TF Privacy): sampling rate 1 %, noise multiplier 1.0, 300 steps, delta
    # 1e-5, orders 2, 5, 10, 20, 100 -> "epsilon = 2.39", optimal order 5.
    epsilon = privacy.epsilon_of(
        DpMode.central, 1.0, [0.01] * 300, 1e-5, orders=[2, 5, 10, 20, 100]
    )
    assert epsilon == pytest.approx(2.39, abs=0.005)
    # With the accountant's own, finer orders the bound only gets tighter.
    assert privacy.epsilon_of(DpMode.central, 1.0, [0.01] * 300, 1e-5) < epsilon


def test_a_target_epsilon_is_met_by_the_noise_multiplier_solved_for_it():
    # prepare: 50 rounds sampling 10 % of the clients, target epsilon 4
    z = privacy.noise_multiplier_for(DpMode.central, 4.0, 1e-5, 0.1, 50)
    # execute
    spent = privacy.epsilon_of(DpMode.central, z, [0.1] * 50, 1e-5)
    # assert: just at the target, and a little less noise would pass it
    assert spent == pytest.approx(4.0, rel=0.01) and spent <= 4.0 + 1e-6
    assert privacy.epsilon_of(DpMode.central, 0.95 * z, [0.1] * 50, 1e-5) > 4.0


def test_local_noise_is_not_amplified_by_sampling():
    central = privacy.epsilon_of(DpMode.central, 1.0, [0.1] * 20, 1e-5)
    local = privacy.epsilon_of(DpMode.local, 1.0, [0.1] * 20, 1e-5)
    assert local > 3 * central


def test_the_accountant_counts_rounds_only_when_told():
    dp = DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.2)
    accountant = privacy.Accountant(dp, 1.2)
    preview = accountant.epsilon_after(0.1)
    assert accountant.rates == [] and accountant.epsilon() == 0.0
    assert accountant.spend(0.1) == pytest.approx(preview)
    assert accountant.epsilon_after(0.1) > accountant.epsilon()


def test_the_workers_dp_clip_bounds_the_norm_and_leaves_its_input_alone():
    # prepare: an update of norm 5 and one of norm 0.5
    big = {"w": np.full((5,), 1.0, np.float32), "b": np.full((20,), 1.0, np.float32)}
    small = {"w": np.full((4,), 0.25, np.float32)}
    # execute: the clip the worker applies under spec.privacy.dp
    clipped, scale = norms.clip(big, 1.0)
    kept, small_scale = norms.clip(small, 1.0)
    # assert
    assert scale == pytest.approx(1.0 / 5.0)
    total = np.sqrt(sum(float((a**2).sum()) for a in clipped.values()))
    assert total == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(big["w"], np.ones(5, np.float32))  # not mutated
    assert small_scale == 1.0
    np.testing.assert_array_equal(kept["w"], small["w"])


def test_noise_has_the_asked_standard_deviation():
    zeros = {"w": np.zeros((200_000,), np.float32)}
    noised = privacy.add_gaussian_noise(zeros, 0.3, np.random.default_rng(1))
    assert float(noised["w"].std()) == pytest.approx(0.3, rel=0.01)
    assert noised["w"].dtype == np.float32 and not zeros["w"].any()


def dp_job(**dp):
    return small_job_dict(privacy={"dp": {"clipNorm": 1.0, **dp}})


def problems_of(document) -> dict[str, str]:
    from fedkube.errors import SpecError

    with pytest.raises(SpecError) as caught:
        parse_job(document)
    return dict(caught.value.problems)


def test_dp_needs_exactly_one_of_noise_multiplier_and_epsilon():
    assert "exactly one" in problems_of(dp_job())["spec.privacy.dp"]
    assert "exactly one" in problems_of(dp_job(noiseMultiplier=1.0, epsilon=4))["spec.privacy.dp"]
    assert parse_job(dp_job(epsilon=4)).spec.privacy.dp.delta == 1e-5


def test_what_would_break_the_privacy_bound_is_refused_by_field():
    document = dp_job(noiseMultiplier=1.0)
    document["spec"]["strategy"] = {"name": "scaffold"}
    document["spec"]["compression"] = {"up": {"scheme": "int8"}}
    problems = problems_of(document)
    assert "not accounted" in problems["spec.strategy.name"]
    assert "clipNorm" in problems["spec.compression.up.scheme"]


def test_the_sampling_rate_is_the_selected_share_of_the_clients():
    job = parse_job(small_job_dict(participation={"fraction": 0.3}))
    assert privacy.sampling_rate(job.spec, 10) == pytest.approx(0.3)
    assert privacy.sampling_rate(job.spec, 2) == pytest.approx(0.5)  # at least one client
