"""Update checks: each bad update is refused with its own reason."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.validation import check_update, template_of
from fedkube.errors import UpdateRejected

MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def good() -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), 0.1, np.float32), "b": np.full(3, 0.1, np.float32)}


def with_(**changes):
    update = good()
    update.update(changes)
    return {k: v for k, v in update.items() if v is not None}


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (with_(w=np.zeros((3, 2), np.float32)), "wrong_shape"),
        (with_(b=None), "wrong_shape"),
        (with_(extra=np.zeros(1, np.float32)), "wrong_shape"),
        (with_(w=np.zeros((2, 3), np.float64)), "wrong_dtype"),
        (with_(b=np.array([0.0, np.nan, 0.0], np.float32)), "non_finite"),
        (with_(b=np.array([0.0, np.inf, 0.0], np.float32)), "non_finite"),
        (with_(b=np.array([0.0, -np.inf, np.inf], np.float32)), "non_finite"),
        (with_(w=np.full((2, 3), 100.0, np.float32)), "norm_bound"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(update, reason):
    with pytest.raises(UpdateRejected) as caught:
        check_update(update, template_of(MODEL), norm_bound=10.0)
    assert caught.value.reason == reason


def test_a_good_update_passes_and_its_norm_is_returned():
    norm = check_update(good(), template_of(MODEL), norm_bound=10.0)
    assert norm == pytest.approx(np.sqrt(9 * 0.01), rel=1e-6)


def test_finite_values_whose_squares_overflow_float32_are_finite_not_refused():
    # prepare: 1e30² overflows float32, so the one-pass check sees +Inf
    huge = with_(w=np.full((2, 3), 1e30, np.float32))
    # execute
    norm = check_update(huge, template_of(MODEL), norm_bound=None)
    # assert: the norm is summed again in float64
    assert norm == pytest.approx(np.sqrt(6) * 1e30, rel=1e-6)
