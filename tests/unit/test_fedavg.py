"""FedAvg maths: the fold, the hierarchical reduction, the server step."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import (
    FOLD_CHUNK,
    Partial,
    WeightedSum,
    apply_delta,
    reduce_partials,
)
from fedkube.wire import codec


def updates(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # One tensor larger than a fold chunk, so chunk boundaries are exercised.
    return [
        {
            "big": rng.standard_normal(FOLD_CHUNK * 2 + 17).astype(np.float32),
            "small": rng.standard_normal((3, 5)).astype(np.float32),
        }
        for _ in range(count)
    ]


def test_fold_equals_the_weighted_sum_and_leaves_updates_untouched():
    # prepare
    deltas, weights = updates(5), [10.0, 1.0, 3.0, 7.0, 0.5]
    before = [{k: v.copy() for k, v in d.items()} for d in deltas]
    acc = WeightedSum.zeros_like(deltas[0])
    # execute
    for delta, weight in zip(deltas, weights, strict=True):
        acc.fold(delta, weight)
    # assert
    for name in deltas[0]:
        expected = sum(w * d[name].astype(np.float64) for d, w in zip(deltas, weights, strict=True))
        np.testing.assert_allclose(acc.sums[name], expected, rtol=1e-5, atol=1e-5)
        for original, delta in zip(before, deltas, strict=True):
            np.testing.assert_array_equal(original[name], delta[name])
    assert acc.weight == sum(weights) and acc.count == 5


def test_hierarchical_fedavg_equals_flat_fedavg():
    # prepare: 7 clients in 3 regions of uneven size
    deltas, weights = updates(7, seed=1), [5.0, 9.0, 1.0, 4.0, 4.0, 12.0, 2.0]
    regions = {"eu": [0, 1, 2], "us": [3, 4], "ap": [5, 6]}
    # execute
    partials = []
    for region, members in regions.items():
        acc = WeightedSum.zeros_like(deltas[0])
        for i in members:
            acc.fold(deltas[i], weights[i])
        partials.append(Partial(region, acc.sums, acc.weight, acc.count))
    hierarchical = reduce_partials(partials)
    flat = flat_fedavg(deltas, weights)
    # assert
    for name in flat:
        np.testing.assert_allclose(hierarchical[name], flat[name], rtol=0, atol=1e-6)


def test_regions_where_nobody_reported_are_skipped():
    deltas = updates(2)
    acc = WeightedSum.zeros_like(deltas[0])
    acc.fold(deltas[0], 2.0)
    acc.fold(deltas[1], 2.0)
    empty = Partial("quiet", {}, 0.0, 0)
    result = reduce_partials([Partial("eu", acc.sums, acc.weight, acc.count), empty])
    np.testing.assert_allclose(
        result["small"], (deltas[0]["small"] + deltas[1]["small"]) / 2, rtol=1e-5
    )


def test_no_weight_at_all_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="no partial"):
        reduce_partials([Partial("eu", {}, 0.0, 0)])


def test_server_step_returns_new_arrays():
    weights = {"w": np.ones(3, np.float32)}
    delta = {"w": np.full(3, 0.5, np.float32)}
    result = apply_delta(weights, delta, lr=2.0)
    np.testing.assert_array_equal(result["w"], np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(weights["w"], np.ones(3, np.float32))
    assert result["w"].dtype == np.float32


def test_a_fold_into_a_read_only_safetensors_view_of_an_update_reads_it_in_place():
    # prepare: an update decoded from its wire bytes, as the combiner folds it
    delta = updates(1, seed=9)[0]
    views, _ = codec.decode(codec.encode(delta, {"k": "v"}))
    acc = WeightedSum.zeros_like(delta)
    # execute
    acc.fold(views, 3.0)
    # assert
    for name in delta:
        assert not views[name].flags.writeable
        np.testing.assert_allclose(acc.sums[name], 3.0 * delta[name], rtol=1e-6)
