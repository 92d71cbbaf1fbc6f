"""The robust rules' buffer: bounded, refuses by name, reduces to a partial."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.combiner.update_buffer import UpdateBuffer
from fedkube.aggregator.validation import template_of
from fedkube.errors import UpdateRejected
from fedkube.spec import Robust

TEMPLATE = template_of({"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)})


def update(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 2), value, np.float32), "b": np.arange(3, dtype=np.float32) * value}


def first_row(updates: np.ndarray, weights: np.ndarray, params: Robust) -> np.ndarray:
    """A stand-in rule that shows what the rule was given."""
    return updates[0].copy()


def test_capacity_is_the_regions_clients_bounded_by_bytes():
    # prepare: 7 floats = 28 bytes per update
    # execute
    roomy = UpdateBuffer.for_template(TEMPLATE, clients=5, max_bytes=10_000)
    tight = UpdateBuffer.for_template(TEMPLATE, clients=5, max_bytes=60)
    # assert
    assert roomy.capacity == 5 and tight.capacity == 2


def test_an_update_past_capacity_is_refused_as_buffer_full_naming_the_setting():
    # prepare
    buffer = UpdateBuffer.for_template(TEMPLATE, clients=5, max_bytes=60)
    buffer.add(update(1.0), 1.0, weight=3.0, steps=1)
    buffer.add(update(2.0), 1.0, weight=3.0, steps=1)
    # execute
    with pytest.raises(UpdateRejected) as caught:
        buffer.check_room()
    # assert
    assert caught.value.reason == "buffer_full"
    assert "spec.strategy.robust.maxBufferBytes=60" in caught.value.detail


def test_rows_hold_the_scaled_update_and_reduce_gives_estimate_times_total_weight():
    # prepare: coefficients as FedNova's 1/τ would give them
    buffer = UpdateBuffer.for_template(TEMPLATE, clients=3, max_bytes=10_000)
    original = update(4.0)
    buffer.add(original, 0.5, weight=10.0, steps=2)
    buffer.add(update(8.0), 0.25, weight=30.0, steps=4)
    # execute
    sums, weight, count, steps = buffer.reduce(first_row, Robust())
    # assert: the first row (4·0.5 = 2) scaled by Σw = 40, reshaped by name
    np.testing.assert_allclose(sums["a"], np.full((2, 2), 80.0))
    np.testing.assert_allclose(sums["b"], [0.0, 80.0, 160.0])
    assert (weight, count, steps) == (40.0, 2, 10.0 * 2 + 30.0 * 4)
    np.testing.assert_array_equal(original["a"], np.full((2, 2), 4.0))  # untouched


def test_an_empty_buffer_reduces_to_an_empty_partial():
    buffer = UpdateBuffer.for_template(TEMPLATE, clients=3, max_bytes=10_000)
    assert buffer.reduce(first_row, Robust()) == ({}, 0.0, 0, 0.0)
