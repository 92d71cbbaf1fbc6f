"""The global tier's round decisions (pure): when a round opens, closes, waits or fails."""

from __future__ import annotations

from fedkube.aggregator.global_aggregator.decision import (
    Close,
    Closing,
    Extend,
    Fail,
    Flush,
    Hold,
    Missed,
    Open,
    RoundView,
    Wait,
    before_opening,
    decide,
    eligible,
    failures_text,
    gone,
    missed_causes,
    on_quorum_missed,
    over_budget,
    participants,
)
from fedkube.spec import DifferentialPrivacy, Participation
from fedkube.wire.protocol import RoundState

TENANT_OF = {"a-0": "a", "a-1": "a", "b-0": "b", "b-1": "b"}
NOW = 1_000.0


def view(**changes) -> RoundView:
    """Round 3, collecting, quorum 2 of 4 clients in regions eu and us, before its deadline."""
    values = {
        "round": 3,
        "state": RoundState.collecting,
        "quorum": 2,
        "deadline": NOW + 30,
        "now": NOW,
        "selected": 4,
        "expected": frozenset({"eu", "us"}),
        "partials": {},
    }
    values.update(changes)
    return RoundView(**values)


# -- before a round opens -------------------------------------------------------------


def test_a_round_opens_once_a_quorum_of_its_selected_clients_registered():
    # prepare
    selected = ["a-0", "a-1", "b-0"]
    # execute
    decision = before_opening(
        number=1, selected=selected, needed=2, tenant_of=TENANT_OF, refused={}, ready=2,
        waited=0.0, limit=600.0,
    )  # fmt: skip
    # assert
    assert decision == Open()


def test_a_round_waits_while_fewer_than_a_quorum_registered_within_the_start_timeout():
    decision = before_opening(
        number=1, selected=["a-0", "b-0"], needed=2, tenant_of=TENANT_OF, refused={}, ready=1,
        waited=599.0, limit=600.0,
    )  # fmt: skip
    assert decision == Wait()


def test_a_round_fails_when_its_quorum_did_not_register_within_the_start_timeout():
    decision = before_opening(
        number=4, selected=["a-0", "b-0", "b-1"], needed=2, tenant_of=TENANT_OF, refused={},
        ready=1, waited=600.0, limit=600.0,
    )  # fmt: skip
    assert decision == Fail(
        "round 4: only 1 of the 3 selected clients registered within 600s (quorum is 2)"
    )


def test_a_round_fails_at_once_when_refused_tenants_leave_too_few_clients_for_the_quorum():
    decision = before_opening(
        number=2, selected=["a-0", "a-1", "b-0"], needed=2, tenant_of=TENANT_OF,
        refused={"a": "policy says no", "c": "not selected"}, ready=1, waited=0.0, limit=600.0,
    )  # fmt: skip
    assert decision == Fail(
        "round 2: quorum is 2 of the 3 selected clients, but only 1 can take part: "
        "refused at their site: tenant a: policy says no"
    )


def test_the_refusal_check_comes_before_the_registrations():
    # Everybody registered, but a refused tenant's clients cannot count.
    decision = before_opening(
        number=2, selected=["a-0", "b-0"], needed=2, tenant_of=TENANT_OF, refused={"b": "no"},
        ready=2, waited=0.0, limit=600.0,
    )  # fmt: skip
    assert isinstance(decision, Fail)


def test_clients_of_refused_tenants_are_not_eligible():
    assert eligible(["a-0", "b-0", "b-1"], TENANT_OF, {"b": "no"}) == {"a-0"}


def test_a_round_opens_without_refused_and_gone_clients_in_selection_order():
    chosen = participants(["b-1", "a-0", "b-0", "a-1"], TENANT_OF, {"a": "no"}, {"b-0"})
    assert chosen == ["b-1"]


def test_a_client_is_gone_once_its_registration_is_older_than_the_ttl():
    seen = {"a-0": NOW - 300, "a-1": NOW - 299, "b-0": NOW - 301}
    assert gone(["a-0", "a-1", "b-0", "b-1"], seen, NOW, 300) == {"a-0", "b-0"}


def test_a_client_that_never_registered_is_not_gone():
    assert gone(["b-1"], {}, NOW, 300) == set()


# -- while a round is open ------------------------------------------------------------


def test_a_round_waits_for_its_partials_before_the_deadline():
    assert decide(view(partials={"eu": 2})) == Wait()


def test_a_round_closes_once_every_expected_region_sent_a_partial_that_makes_the_quorum():
    assert decide(view(partials={"eu": 1, "us": 1})) == Close(Closing.all_in)


def test_every_region_in_closes_even_after_the_deadline_and_while_paused():
    decision = decide(view(partials={"eu": 2, "us": 0}, now=NOW + 60, paused=True))
    assert decision == Close(Closing.all_in)


def test_every_region_in_but_short_of_the_quorum_fails_naming_the_task_failures():
    # Nobody else can report: waiting longer cannot help.
    decision = decide(view(partials={"eu": 1, "us": 0}))
    assert decision == Fail(
        "round 3: 1 of 4 selected clients reported, quorum is 2", name_task_failures=True
    )


def test_every_region_in_with_no_client_counted_fails_even_with_a_quorum_of_zero():
    decision = decide(view(quorum=0, partials={"eu": 0, "us": 0}))
    assert isinstance(decision, Fail)


def test_a_round_closes_without_regions_whose_secure_aggregation_failed_if_the_rest_make_quorum():
    decision = decide(view(partials={"eu": 2}, region_failures={"us": "share missing"}))
    assert decision == Close(Closing.secure_failed, causes="region us: share missing")


def test_a_round_fails_when_the_regions_left_after_secure_failures_miss_the_quorum():
    failures = {"us": "share missing", "eu": "timeout"}
    decision = decide(view(partials={}, region_failures=failures))
    assert decision == Fail(
        "round 3: 0 of 4 selected clients in the regions' sums, quorum is 2; "
        "secure aggregation failed in region eu: timeout; region us: share missing"
    )


def test_a_secure_failure_waits_while_another_region_has_neither_sent_nor_failed():
    assert decide(view(partials={}, region_failures={"us": "share missing"})) == Wait()


def test_a_paused_collecting_round_is_held():
    assert decide(view(paused=True, now=NOW + 60, reported=4)) == Hold()


def test_at_the_deadline_with_a_quorum_reported_the_combiners_are_asked_to_flush():
    assert decide(view(now=NOW + 30, reported=2, partials={"eu": 1})) == Flush(reported=2)


def test_at_the_deadline_short_of_the_quorum_the_round_misses_it_and_checks_every_region():
    decision = decide(view(now=NOW + 30, reported=1, partials={"eu": 1}))
    assert decision == Missed(reported=1, flushed=False, regions=("eu", "us"))


def test_an_aggregating_round_waits_for_the_partials_until_its_flush_deadline():
    decision = decide(view(state=RoundState.aggregating, flush_deadline=NOW + 1, partials={}))
    assert decision == Wait()


def test_an_aggregating_round_without_a_flush_deadline_waits():
    assert decide(view(state=RoundState.aggregating, now=NOW + 99)) == Wait()


def test_a_flush_that_expired_with_a_quorum_in_closes_without_the_silent_regions():
    decision = decide(view(state=RoundState.aggregating, flush_deadline=NOW, partials={"eu": 2}))
    assert decision == Close(Closing.flush_expired, missing=("us",))


def test_a_flush_that_expired_short_of_the_quorum_misses_it_naming_the_silent_regions():
    decision = decide(view(state=RoundState.aggregating, flush_deadline=NOW, partials={"eu": 1}))
    assert decision == Missed(reported=1, flushed=True, regions=("us",))


def test_a_closed_round_seen_by_the_loop_is_only_waited_on():
    assert decide(view(state=RoundState.closed, now=NOW + 99)) == Wait()


# -- a missed quorum ------------------------------------------------------------------


def test_regions_whose_combiner_holds_no_lease_are_named_when_the_deadline_is_missed():
    missed = Missed(reported=1, flushed=False, regions=("eu", "us"))
    assert missed_causes(missed, running={"eu"}) == [
        "region us has no running combiner (its lease lapsed)"
    ]


def test_regions_silent_after_a_flush_are_named_whatever_their_leases():
    missed = Missed(reported=1, flushed=True, regions=("us",))
    assert missed_causes(missed, running={"us"}) == [
        "no partial from region us (is its combiner running?)"
    ]


def test_a_missed_quorum_extends_the_deadline_while_extensions_are_left():
    policy = Participation(on_quorum_missed="extend", max_extensions=3)
    decision = on_quorum_missed(
        policy, round=3, quorum=2, extensions=2, reported=1, selected=4,
        causes=["region us has no running combiner (its lease lapsed)"], failures="",
    )  # fmt: skip
    assert decision == Extend("; region us has no running combiner (its lease lapsed)")


def test_a_missed_quorum_fails_once_the_extensions_are_used_up():
    policy = Participation(on_quorum_missed="extend", max_extensions=3)
    decision = on_quorum_missed(
        policy, round=3, quorum=2, extensions=3, reported=1, selected=4, causes=[],
        failures="; the task failed at tenant a (client a-0): boom",
    )  # fmt: skip
    assert decision == Fail(
        "round 3: 1 of 4 selected clients reported, quorum is 2 (after 3 deadline extensions)"
        "; the task failed at tenant a (client a-0): boom"
    )


def test_a_missed_quorum_fails_at_once_when_the_policy_says_fail():
    policy = Participation(on_quorum_missed="fail", max_extensions=3)
    decision = on_quorum_missed(
        policy, round=1, quorum=2, extensions=0, reported=0, selected=2, causes=[], failures=""
    )
    assert decision == Fail(
        "round 1: 0 of 2 selected clients reported, quorum is 2 (after 0 deadline extensions)"
    )


def test_task_failures_are_named_by_tenant_and_client():
    text = failures_text({"b-0": "ValueError: bad", "a-0": "OOM"}, TENANT_OF)
    assert text == (
        "; the task failed at tenant a (client a-0): OOM; tenant b (client b-0): ValueError: bad"
    )


def test_no_task_failures_add_nothing():
    assert failures_text({}, TENANT_OF) == ""


# -- the privacy budget ---------------------------------------------------------------


def test_a_round_runs_while_its_epsilon_stays_within_the_budget():
    dp = DifferentialPrivacy(clip_norm=1.0, budget=2.0)
    assert over_budget(dp, ran=3, after=2.0, spent=lambda: 1.5) is None


def test_a_job_without_a_budget_is_never_over_it():
    dp = DifferentialPrivacy(clip_norm=1.0)
    assert over_budget(dp, ran=3, after=99.0, spent=lambda: 50.0) is None


def test_a_round_that_would_pass_the_budget_does_not_run_and_says_why():
    dp = DifferentialPrivacy(clip_norm=1.0, budget=2.0, delta=1e-5)
    assert over_budget(dp, ran=3, after=2.25, spent=lambda: 1.9) == (
        "privacy budget reached: round 4 would bring ε to 2.250 (δ=1e-05), over "
        "spec.privacy.dp.budget 2; 3 rounds ran, ε 1.900"
    )
