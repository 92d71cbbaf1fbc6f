"""Round state machine and message checks."""

import pytest

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import RoundState, can_transition, check_metadata, parse_weight


def test_rounds_move_forward_only():
    assert can_transition(RoundState.open, RoundState.collecting)
    assert can_transition(RoundState.collecting, RoundState.aggregating)
    assert can_transition(RoundState.aggregating, RoundState.closed)
    assert not can_transition(RoundState.closed, RoundState.collecting)
    assert not can_transition(RoundState.collecting, RoundState.closed)


@pytest.mark.parametrize("value", [None, "abc", "0", "-3", "inf", "nan"])
def test_weights_must_be_positive_finite_numbers(value):
    with pytest.raises(UpdateRejected) as caught:
        parse_weight(value)
    assert caught.value.reason in ("bad_weight", "malformed")


def test_metadata_must_agree_with_the_request():
    check_metadata({"fedkube.round": "3"}, {"fedkube.round": "3"})
    with pytest.raises(UpdateRejected, match="metadata"):
        check_metadata({"fedkube.round": "2"}, {"fedkube.round": "3"})
