"""Leader election's decisions on a Lease as read (pure; the cluster test runs two replicas)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fedkube.operator.leader import Action, Election, build_lease_spec, decide

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def lease(holder: str, renewed: datetime, duration: int = 15) -> dict:
    return {
        "metadata": {"name": "fedkube-operator", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "leaseTransitions": 2,
        },
    }


def test_no_lease_is_created():
    assert decide(None, "a", NOW) is Action.create


def test_our_own_lease_is_renewed():
    assert decide(lease("a", NOW - timedelta(seconds=3)), "a", NOW) is Action.renew


def test_someone_elses_fresh_lease_is_waited_on():
    assert decide(lease("b", NOW - timedelta(seconds=14)), "a", NOW) is Action.wait


def test_an_expired_or_released_lease_is_taken():
    assert decide(lease("b", NOW - timedelta(seconds=15)), "a", NOW) is Action.acquire
    assert decide(lease("", NOW), "a", NOW) is Action.acquire


def test_taking_a_lease_counts_a_transition_and_renewing_does_not():
    election = Election(namespace="fedkube", name="fedkube-operator", identity="a")
    taken = build_lease_spec(election, NOW, lease("b", NOW - timedelta(seconds=60)))
    assert taken["holderIdentity"] == "a"
    assert taken["leaseTransitions"] == 3
    assert taken["acquireTime"] == taken["renewTime"]
    later = NOW + timedelta(seconds=2)
    renewed = build_lease_spec(election, later, {"spec": taken})
    assert renewed["leaseTransitions"] == 3
    assert renewed["acquireTime"] == taken["acquireTime"]
    assert renewed["renewTime"] != taken["renewTime"]


def test_timings_that_could_let_two_leaders_overlap_are_refused():
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        Election(namespace="n", name="l", identity="a", lease_duration_s=10, renew_deadline_s=10)
