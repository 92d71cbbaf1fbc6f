"""The test-only fault points: parsed strictly, fired once, inert when unset."""

from __future__ import annotations

import pytest

from fedkube.errors import FedkubeError
from fedkube.service import faults


def test_fault_points_parse_into_points_and_rounds():
    assert faults.parse("global.after_reduce@2, combiner.eu.update2@3,global.after_reduce@5") == {
        "global.after_reduce": {2, 5},
        "combiner.eu.update2": {3},
    }
    assert faults.parse("") == {}


@pytest.mark.parametrize("text", ["global.after_reduce", "@2", "global@x", "a@-1"])
def test_a_malformed_fault_point_is_an_error_not_ignored(text):
    with pytest.raises(FedkubeError, match="POINT@ROUND"):
        faults.parse(text)


def test_an_unset_fault_point_is_passed_through():
    # the process is still alive after it: nothing in this test's environment asks for faults
    faults.reached("global.after_reduce", 1)
