"""The combiner's in-flight budget: what it admits, whom it refuses, and how it answers."""

from __future__ import annotations

import pytest

from fedkube.errors import UpdateRejected
from fedkube.service.bodies import Pace
from fedkube.service.inflight import RETRY_AFTER_S, InflightBudget
from fedkube.spec import Transport

MB = 1024 * 1024


def test_a_tenant_past_its_share_is_told_429_busy_with_retry_after_and_others_still_get_in():
    # prepare: 100 MB in all, 40 MB per tenant; tenant a holds 32 MB
    budget = InflightBudget(total=100 * MB, per_tenant=40 * MB)
    budget.admit("a", 32 * MB)
    # execute: a asks for 16 MB more, b for 32 MB
    with pytest.raises(UpdateRejected) as refused:
        budget.admit("a", 16 * MB)
    budget.admit("b", 32 * MB)
    # assert: a is refused by name and told when to come back; nothing of it was counted
    assert refused.value.reason == "busy" and refused.value.status == 429
    assert refused.value.retry_after == RETRY_AFTER_S
    assert "maxInflightBytesPerTenant" in refused.value.detail
    assert budget.of("a") == 32 * MB and budget.in_flight == 64 * MB


def test_the_combiner_past_its_total_answers_503_busy_whoever_asks():
    budget = InflightBudget(total=100 * MB, per_tenant=60 * MB)
    budget.admit("a", 60 * MB)
    budget.admit("b", 30 * MB)
    with pytest.raises(UpdateRejected) as refused:
        budget.admit("c", 20 * MB)
    assert refused.value.reason == "busy" and refused.value.status == 503
    assert "maxInflightBytes" in refused.value.detail
    assert budget.in_flight == 90 * MB and budget.high_water == 90 * MB


def test_what_is_held_is_given_back_however_the_upload_ends():
    # prepare
    budget = InflightBudget(total=10 * MB, per_tenant=10 * MB)
    # execute: one upload read to the end, one that failed half-way
    with budget.hold("a", 4 * MB):
        assert budget.of("a") == 4 * MB
    with pytest.raises(ConnectionResetError), budget.hold("a", 6 * MB):
        raise ConnectionResetError("the client went away")
    # assert: nothing left counted, and the whole budget is there again
    assert budget.in_flight == 0 and budget.of("a") == 0
    budget.admit("a", 10 * MB)


def test_giving_back_more_than_was_counted_is_a_bug_said_out_loud():
    budget = InflightBudget(total=10 * MB, per_tenant=10 * MB)
    budget.admit("a", MB)
    with pytest.raises(ValueError, match="does not hold"):
        budget.release("a", 2 * MB)


@pytest.mark.parametrize(
    ("tenants", "per_tenant", "expected"),
    [
        (1, None, 2048 * MB),
        (3, None, 1024 * MB),
        (3, 300 * MB, 300 * MB),
        (1, 4096 * MB, 2048 * MB),
    ],
)
def test_a_tenants_share_defaults_to_half_the_budget_where_it_has_company(
    tenants, per_tenant, expected
):
    transport = Transport(max_inflight_bytes_per_tenant=per_tenant)
    assert transport.inflight_per_tenant(tenants) == expected


def test_a_body_may_lag_the_minimum_rate_by_its_grace_whatever_length_it_announced():
    pace = Pace.of(Transport(body_timeout_seconds=30, min_upload_bytes_per_second=MB))
    # nothing received: due at the end of the grace; each MB received buys one second more
    assert pace.due(0) == 30
    assert pace.due(256 * MB) == 30 + 256
