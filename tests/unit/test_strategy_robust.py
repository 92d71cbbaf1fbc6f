"""Robust rules: coordinate-wise median and trimmed mean (Yin et al. 2018),
Krum / Multi-Krum (Blanchard et al. 2017) and norm clipping (Sun et al. 2019),
each checked against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.strategies import krum, median, trimmed_mean
from fedkube.aggregator.strategies.sums import WeightedSum
from fedkube.spec import Robust
from fedkube.training import norms


def matrix(rows) -> np.ndarray:
    """A read-only float32 (n, d) matrix: a write into it raises."""
    array = np.array(rows, np.float32)
    array.setflags(write=False)
    return array


def counts(*values: float) -> np.ndarray:
    return np.array(values, np.float64)


def byzantine_toy() -> tuple[np.ndarray, np.ndarray]:
    """7 honest rows within ±0.01 of 1.0 and 2 Byzantine rows at −100."""
    rng = np.random.default_rng(0)
    honest = 1.0 + rng.uniform(-0.01, 0.01, size=(7, 6))
    attack = np.full((2, 6), -100.0)
    return matrix(np.vstack([honest, attack])), counts(*([10.0] * 9))


# -- median ---------------------------------------------------------------------


def test_median_of_an_odd_number_of_rows():
    # prepare
    updates = matrix([[1, 5, -1], [3, 2, -2], [2, 9, -3]])

    # execute
    result = median.estimate(updates, counts(1, 1, 1), Robust(rule="median"))

    # assert
    np.testing.assert_array_equal(result, np.array([2, 5, -2], np.float32))
    assert result.dtype == np.float32 and result.shape == (3,)


def test_median_of_an_even_number_of_rows_is_the_mean_of_the_middle_two():
    # prepare
    updates = matrix([[1, 0], [4, 10], [2, 3], [3, 1]])

    # execute
    result = median.estimate(updates, counts(1, 1, 1, 1), Robust(rule="median"))

    # assert: sorted columns [1, 2, 3, 4] and [0, 1, 3, 10]
    np.testing.assert_array_equal(result, np.array([2.5, 2.0], np.float32))


def test_median_ignores_the_sample_counts():
    # prepare: a Byzantine row claiming a huge sample count
    updates = matrix([[1.0], [2.0], [-100.0]])

    # execute
    result = median.estimate(updates, counts(1, 1, 1e9), Robust(rule="median"))

    # assert
    np.testing.assert_array_equal(result, np.array([1.0], np.float32))


# -- trimmed mean ---------------------------------------------------------------


def test_trimmed_mean_cuts_floor_beta_n_values_at_each_end():
    # prepare: n = 5, β = 0.2, so k = 1
    updates = matrix([[10, 0], [1, 0], [2, 0], [3, 0], [-50, 100]])

    # execute
    result = trimmed_mean.estimate(
        updates, counts(1, 1, 1, 1, 1), Robust(rule="trimmedMean", trim_fraction=0.2)
    )

    # assert: sorted [-50, 1, 2, 3, 10] → mean(1, 2, 3); [0, 0, 0, 0, 100] → mean(0, 0, 0)
    np.testing.assert_allclose(result, np.array([2.0, 0.0], np.float32))
    assert result.dtype == np.float32


def test_trimmed_mean_with_k_zero_is_the_plain_mean():
    # prepare: n = 5, β = 0.1, so k = ⌊0.5⌋ = 0
    updates = matrix([[10], [1], [2], [3], [-50]])

    # execute
    result = trimmed_mean.estimate(
        updates, counts(1, 1, 1, 1, 1), Robust(rule="trimmedMean", trim_fraction=0.1)
    )

    # assert: (10 + 1 + 2 + 3 − 50) / 5
    np.testing.assert_allclose(result, np.array([-6.8], np.float32), rtol=1e-6)


def test_trimmed_mean_keeps_the_middle_of_an_even_column():
    # prepare: n = 4, β = 0.49, so k = ⌊1.96⌋ = 1
    updates = matrix([[4], [1], [100], [2]])

    # execute
    result = trimmed_mean.estimate(
        updates, counts(1, 1, 1, 1), Robust(rule="trimmedMean", trim_fraction=0.49)
    )

    # assert: sorted [1, 2, 4, 100] → mean(2, 4)
    np.testing.assert_allclose(result, np.array([3.0], np.float32))


def test_trim_count():
    assert trimmed_mean.trim_count(9, 0.25) == 2
    assert trimmed_mean.trim_count(10, 0.1) == 1
    assert trimmed_mean.trim_count(3, 0.49) == 1
    assert trimmed_mean.trim_count(2, 0.49) == 0  # ⌊0.98⌋


# -- Krum -------------------------------------------------------------------------

# Four 2-D points; squared distances by hand:
# d01 = 1, d02 = 9, d03 = 36 + 64 = 100, d12 = 1 + 9 = 10, d13 = 25 + 64 = 89,
# d23 = 36 + 25 = 61.
POINTS = [[0, 0], [1, 0], [0, 3], [6, 8]]
DISTANCES = [[0, 1, 9, 100], [1, 0, 10, 89], [9, 10, 0, 61], [100, 89, 61, 0]]


def test_pairwise_squared_distances():
    # execute
    result = krum.pairwise_sq_distances(matrix(POINTS))

    # assert
    np.testing.assert_allclose(result, np.array(DISTANCES, np.float64), atol=1e-9)


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest():
    # prepare: n = 4, f = 0, so 2 neighbours
    updates = matrix(POINTS)

    # execute
    result = krum.scores(updates, f=0)

    # assert: row 0: 1 + 9; row 1: 1 + 10; row 2: 9 + 10; row 3: 61 + 89
    np.testing.assert_allclose(result, [10.0, 11.0, 19.0, 150.0], atol=1e-9)


def test_krum_select_returns_the_lowest_scores_best_first():
    # execute
    chosen = krum.select(matrix(POINTS), f=0, m=3)

    # assert
    assert chosen.tolist() == [0, 1, 2]


def test_krum_estimate_is_a_copy_of_the_best_row():
    # prepare
    updates = matrix(POINTS)

    # execute
    result = krum.estimate_krum(updates, counts(1, 1, 1, 1), Robust(rule="krum", byzantine=0))

    # assert
    np.testing.assert_array_equal(result, np.array([0, 0], np.float32))
    assert result.dtype == np.float32 and not np.shares_memory(result, updates)


def test_multi_krum_is_the_sample_weighted_mean_of_the_kept_rows():
    # prepare: keep 2 (rows 0 and 1), counts 1 and 3
    params = Robust(rule="multiKrum", byzantine=0, multi_krum_keep=2)

    # execute
    result = krum.estimate_multi_krum(matrix(POINTS), counts(1, 3, 1, 1), params)

    # assert: (1·[0, 0] + 3·[1, 0]) / 4
    np.testing.assert_allclose(result, np.array([0.75, 0.0], np.float32))
    assert result.dtype == np.float32


def test_multi_krum_keeps_n_minus_f_by_default():
    # prepare: n = 4, f = 1 → m = 3; with 1 neighbour the scores are 1, 1, 9, 61
    params = Robust(rule="multiKrum", byzantine=1)

    # execute
    result = krum.estimate_multi_krum(matrix(POINTS), counts(1, 1, 2, 1), params)

    # assert: rows 0, 1, 2 with counts 1, 1, 2: ([0, 0] + [1, 0] + 2·[0, 3]) / 4
    np.testing.assert_allclose(result, np.array([0.25, 1.5], np.float32))


def test_multi_krum_keep_is_clamped_to_the_updates():
    assert krum.keep_count(4, Robust(multi_krum_keep=10)) == 4
    assert krum.keep_count(4, Robust(byzantine=9)) == 1
    assert krum.keep_count(4, Robust(byzantine=1)) == 3
    assert krum.keep_count(4, Robust(byzantine=1, multi_krum_keep=2)) == 2


def test_krum_with_fewer_than_one_neighbour_scores_on_the_nearest_one():
    # prepare: n = 3, f = 1 → n − f − 2 = 0, so 1 neighbour
    # squared distances: d01 = 1, d02 = 25, d12 = 16
    updates = matrix([[0], [1], [5]])

    # execute
    result = krum.scores(updates, f=1)
    chosen = krum.select(updates, f=1, m=2)
    best = krum.estimate_krum(updates, counts(1, 1, 1), Robust(rule="krum", byzantine=1))

    # assert: scores 1, 1, 16; the tie goes to the lower index
    np.testing.assert_allclose(result, [1.0, 1.0, 16.0], atol=1e-9)
    assert chosen.tolist() == [0, 1]
    np.testing.assert_array_equal(best, np.array([0], np.float32))


def test_krum_with_one_or_two_updates():
    # prepare
    one, two = matrix([[3, 4]]), matrix([[0], [2]])

    # execute
    one_score = krum.scores(one, f=1)
    two_scores = krum.scores(two, f=5)

    # assert: a single row has no neighbour; two rows are each other's neighbour
    np.testing.assert_array_equal(one_score, [0.0])
    np.testing.assert_allclose(two_scores, [4.0, 4.0], atol=1e-9)
    one_best = krum.estimate_krum(one, counts(1), Robust(byzantine=1))
    np.testing.assert_array_equal(one_best, np.array([3, 4], np.float32))


def test_multi_krum_refuses_non_positive_counts():
    with pytest.raises(ValueError, match="positive"):
        krum.estimate_multi_krum(matrix(POINTS), counts(1, 0, 1, 1), Robust())


# -- robustness, chunking, inputs ---------------------------------------------------


def test_robust_rules_resist_two_byzantine_rows_where_the_mean_does_not():
    # prepare
    updates, weights = byzantine_toy()
    params = Robust(trim_fraction=0.25, byzantine=2)  # trimmedMean: k = ⌊2.25⌋ = 2

    # execute
    results = {
        "median": median.estimate(updates, weights, params),
        "trimmedMean": trimmed_mean.estimate(updates, weights, params),
        "krum": krum.estimate_krum(updates, weights, params),
        "multiKrum": krum.estimate_multi_krum(updates, weights, params),
    }
    plain_mean = updates.mean(axis=0)

    # assert: (7·1 − 2·100) / 9 ≈ −21.4 for the mean
    for name, result in results.items():
        np.testing.assert_allclose(result, 1.0, atol=0.011, err_msg=name)
    assert np.all(plain_mean < -20)
    assert set(krum.select(updates, f=2, m=7).tolist()) == set(range(7))  # the honest rows


def chunk_case() -> tuple[np.ndarray, np.ndarray]:
    """n = 5 rows of d = 37 columns: with 16 values per block, 3 columns per block,
    so 13 blocks, the last one a single column."""
    rng = np.random.default_rng(7)
    updates = rng.standard_normal((5, 37)).astype(np.float32)
    updates[:, 5] = 2.0  # a column of ties
    return matrix(updates), counts(1, 2, 3, 4, 5)


def test_median_across_blocks_equals_the_whole_matrix_median():
    # prepare
    updates, weights = chunk_case()

    # execute
    chunked = median.estimate(updates, weights, Robust(), chunk_elements=16)

    # assert
    np.testing.assert_allclose(chunked, np.median(updates, axis=0), rtol=1e-6)


def test_trimmed_mean_across_blocks_equals_the_whole_matrix_trimmed_mean():
    # prepare: n = 5, β = 0.2 → k = 1
    updates, weights = chunk_case()

    # execute
    chunked = trimmed_mean.estimate(updates, weights, Robust(trim_fraction=0.2), chunk_elements=16)

    # assert
    expected = np.sort(updates.astype(np.float64), axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(chunked, expected, rtol=1e-6, atol=1e-7)


def test_krum_distances_across_blocks_equal_the_direct_differences():
    # prepare
    updates, weights = chunk_case()
    x = updates.astype(np.float64)
    direct = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)

    # execute
    chunked = krum.pairwise_sq_distances(updates, chunk_elements=16)
    multi = krum.estimate_multi_krum(updates, weights, Robust(byzantine=1), chunk_elements=16)

    # assert
    np.testing.assert_allclose(chunked, direct, rtol=1e-5, atol=1e-5)
    scores = np.sort(np.where(np.eye(5, dtype=bool), np.inf, direct), axis=1)[:, :2].sum(axis=1)
    kept = np.sort(np.argsort(scores, kind="stable")[:4])
    expected = (weights[kept, None] * x[kept]).sum(axis=0) / weights[kept].sum()
    np.testing.assert_allclose(multi, expected, rtol=1e-5, atol=1e-6)


def test_krum_distances_survive_a_large_shared_component():
    # prepare: rows 1000 + tiny noise; the raw Gram formula would cancel in float32
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((4, 5000)) * 1e-3
    updates = matrix(1000.0 + noise)
    x = updates.astype(np.float64)
    direct = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)

    # execute
    result = krum.pairwise_sq_distances(updates, chunk_elements=4000)

    # assert
    np.testing.assert_allclose(result, direct, rtol=1e-3)


def test_robust_rules_leave_their_inputs_alone():
    # prepare: read-only inputs (a write raises); copies to compare with
    updates, weights = byzantine_toy()
    before_updates, before_weights = updates.copy(), weights.copy()
    params = Robust(trim_fraction=0.25, byzantine=2)

    # execute
    outputs = [
        median.estimate(updates, weights, params),
        trimmed_mean.estimate(updates, weights, params),
        krum.estimate_krum(updates, weights, params),
        krum.estimate_multi_krum(updates, weights, params),
    ]

    # assert
    np.testing.assert_array_equal(updates, before_updates)
    np.testing.assert_array_equal(weights, before_weights)
    for output in outputs:
        assert not np.shares_memory(output, updates) and output.flags.writeable


@pytest.mark.parametrize(
    "rule",
    [median.estimate, trimmed_mean.estimate, krum.estimate_krum, krum.estimate_multi_krum],
)
def test_robust_rules_check_their_shapes(rule):
    with pytest.raises(ValueError, match="matrix"):
        rule(np.zeros((0, 3), np.float32), counts(), Robust())
    with pytest.raises(ValueError, match="weights"):
        rule(np.zeros((2, 3), np.float32), counts(1, 1, 1), Robust())


# -- norm clipping --------------------------------------------------------------------


def test_clip_scale():
    assert norms.clip_scale(10.0, 5.0) == 0.5
    assert norms.clip_scale(3.0, 5.0) == 1.0
    assert norms.clip_scale(5.0, 5.0) == 1.0
    assert norms.clip_scale(0.0, 5.0) == 1.0
    assert norms.clip_scale(float("inf"), 5.0) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        norms.clip_scale(float("nan"), 5.0)
    with pytest.raises(ValueError, match="bound"):
        norms.clip_scale(1.0, 0.0)


def test_clip_scales_the_whole_update_to_the_bound():
    # prepare: global norm √(3² + 4²) = 5
    tensors = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[0.0, 4.0]], np.float32)}
    for array in tensors.values():
        array.setflags(write=False)

    # execute
    clipped, scale = norms.clip(tensors, 2.5)

    # assert
    assert scale == 0.5
    np.testing.assert_array_equal(clipped["a"], np.array([1.5, 0.0], np.float32))
    np.testing.assert_array_equal(clipped["b"], np.array([[0.0, 2.0]], np.float32))
    assert clipped["a"].dtype == np.float32
    np.testing.assert_array_equal(tensors["a"], np.array([3.0, 0.0], np.float32))
    np.testing.assert_array_equal(tensors["b"], np.array([[0.0, 4.0]], np.float32))


def test_clip_within_the_bound_returns_the_same_arrays():
    # prepare
    tensors = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[0.0, 4.0]], np.float32)}

    # execute
    clipped, scale = norms.clip(tensors, 5.0)

    # assert
    assert scale == 1.0
    assert clipped["a"] is tensors["a"] and clipped["b"] is tensors["b"]


def test_clip_scale_inside_the_fold_equals_folding_the_clipped_update():
    # prepare: the combiner's copy-free path, WeightedSum.fold(scale=w·s)
    rng = np.random.default_rng(1)
    update = {"w": rng.standard_normal(50).astype(np.float32)}
    bound, weight = 0.5, 3.0
    via_copy, fused = WeightedSum.zeros_like(update), WeightedSum.zeros_like(update)

    # execute
    clipped, scale = norms.clip(update, bound)
    via_copy.fold(clipped, weight)
    fused.fold(update, weight, scale=weight * scale)

    # assert
    assert scale < 1.0
    np.testing.assert_allclose(fused.sums["w"], via_copy.sums["w"], rtol=1e-6, atol=1e-7)
    assert float(np.linalg.norm(clipped["w"])) == pytest.approx(bound, rel=1e-6)
