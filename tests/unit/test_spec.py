"""The job spec: one typed model, errors that name the field."""

from __future__ import annotations

import typing

import pytest

from fedkube.aggregator.strategies import REGISTRY, ROBUST_RULES
from fedkube.errors import SpecError
from fedkube.spec import Robust, Strategy, load_job, parse_job, quorum
from tests.support import ROOT, small_job_dict


def problems_of(document) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_job(document)
    return dict(caught.value.problems)


def test_the_example_manifest_is_valid_and_has_the_demo_shape():
    job = load_job(ROOT / "examples" / "digits.yaml")
    assert len(job.spec.regions) == 2
    assert len(job.spec.tenants) >= 4
    assert job.spec.data.partition.scheme.value == "dirichlet"
    assert job.spec.data.partition.alpha == 0.5
    assert job.spec.rounds == 20


def test_defaults_are_filled_and_camel_case_names_map_to_attributes():
    job = parse_job(small_job_dict())
    assert job.spec.training.batch_size == 64
    assert job.spec.participation.round_timeout_seconds == 30
    assert job.spec.strategy.name == "fedavg"
    assert [c.id for c in job.clients()] == ["a-0", "b-0", "c-0", "d-0"]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"tenants": []}, "spec.tenants", "at least 1"),
        ({"rounds": -1}, "spec.rounds", "greater than or equal to 1"),
        ({"model": {"entrypoint": "not an entrypoint"}}, "spec.model.entrypoint", "pattern"),
        ({"tenants": [{"name": "a", "region": "mars"}]}, "spec.tenants[0].region", "mars"),
        (
            {"tenants": [{"name": "a", "region": "eu"}, {"name": "a", "region": "us"}]},
            "spec.tenants[1].name",
            "duplicate tenant",
        ),
        ({"participation": {"minClients": 9}}, "spec.participation.minClients", "exceeds"),
        ({"trainig": {"epochs": 2}}, "spec.trainig", "Extra inputs"),
        ({"tenants": [{"name": "Bad_Name", "region": "eu"}]}, "spec.tenants[0].name", "pattern"),
    ],
)
def test_an_invalid_manifest_names_the_field_and_the_reason(overrides, field, words):
    problems = problems_of(small_job_dict(**overrides))
    assert field in problems, problems
    assert words in problems[field]


def test_wrong_kind_and_missing_metadata_are_reported():
    document = small_job_dict()
    document["kind"] = "Deployment"
    del document["metadata"]
    problems = problems_of(document)
    assert "kind" in problems and "metadata" in problems


def test_load_job_reports_unreadable_files_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)


@pytest.mark.parametrize(
    ("selected", "min_fraction", "min_clients", "expected"),
    [
        (6, 0.5, None, 3),
        (5, 0.5, None, 3),
        (1, 0.5, None, 1),
        (6, 1.0, None, 6),
        (6, 0.5, 4, 4),
        (2, 0.5, 4, 2),
    ],
)
def test_quorum(selected, min_fraction, min_clients, expected):
    job = parse_job(small_job_dict(participation={"minFraction": min_fraction}))
    policy = job.spec.participation.model_copy(update={"min_clients": min_clients})
    assert quorum(policy, selected) == expected


def test_strategy_names_in_the_spec_match_the_registry():
    allowed = set(typing.get_args(Strategy.model_fields["name"].annotation))
    assert allowed == set(REGISTRY)


def test_strategy_parameters_are_validated_by_field():
    problems = problems_of(
        small_job_dict(
            strategy={"name": "fedmagic", "serverMomentum": 1.5, "robust": {"trimFraction": 0.5}}
        )
    )
    assert "spec.strategy.name" in problems
    assert "spec.strategy.serverMomentum" in problems
    assert "spec.strategy.robust.trimFraction" in problems


def test_the_server_learning_rate_defaults_per_strategy():
    assert Strategy(name="fedavg").server_lr == 1.0
    assert Strategy(name="fedadam").server_lr == 0.1
    assert Strategy(name="fedyogi", server_learning_rate=0.03).server_lr == 0.03


def test_scaffold_refuses_an_optimizer_it_cannot_correct():
    problems = problems_of(
        small_job_dict(strategy={"name": "scaffold"}, training={"optimizer": "adam"})
    )
    assert "SGD" in problems["spec.training.optimizer"]


def test_krum_needs_two_f_plus_three_clients_in_every_region():
    # the small job has two clients per region
    problems = problems_of(small_job_dict(strategy={"robust": {"rule": "krum", "byzantine": 1}}))
    message = problems["spec.strategy.robust.byzantine"]
    assert "2f+3=5" in message and "eu has 2" in message and "us has 2" in message
    problems = problems_of(
        small_job_dict(
            strategy={"robust": {"rule": "multiKrum", "byzantine": 0, "multiKrumKeep": 3}}
        )
    )
    assert "spec.strategy.robust.multiKrumKeep" in problems


def test_robust_rule_names_in_the_spec_match_the_registry():
    allowed = set(typing.get_args(Robust.model_fields["rule"].annotation))
    assert allowed == {"none", *ROBUST_RULES}


def test_a_tenants_weight_cap_overrides_the_jobs_and_unset_means_no_cap():
    document = small_job_dict(participation={"maxWeight": 500})
    document["spec"]["tenants"][1]["maxWeight"] = 50
    job = parse_job(document)
    assert [job.weight_cap(t) for t in ("a", "b", "c")] == [500, 50, 500]
    assert parse_job(small_job_dict()).weight_cap("a") is None
    with pytest.raises(SpecError, match="maxWeight"):
        parse_job(small_job_dict(participation={"maxWeight": 0}))


def test_virtual_clients_are_grouped_per_tenant_into_workers_of_clients_per_worker():
    # prepare: tenant a with 5 clients, 2 to a worker; b with 1
    document = small_job_dict(
        tenants=[{"name": "a", "region": "eu", "replicas": 5}, {"name": "b", "region": "us"}],
        simulation={"clientsPerWorker": 2},
    )
    # execute
    groups = parse_job(document).worker_groups()
    # assert
    assert [(g.name, [c.id for c in g.clients]) for g in groups] == [
        ("a-v0", ["a-0", "a-1"]),
        ("a-v1", ["a-2", "a-3"]),
        ("a-v2", ["a-4"]),
        ("b-v0", ["b-0"]),
    ]
    assert groups[0].worker_args(True) == ["--group", "a-v0"]


def test_without_simulation_every_client_is_its_own_worker():
    document = small_job_dict(tenants=[{"name": "a", "region": "eu", "replicas": 2}])
    groups = parse_job(document).worker_groups()
    assert [(g.name, len(g.clients)) for g in groups] == [("a-0", 1), ("a-1", 1)]
    assert groups[1].worker_args(False) == ["--client", "a-1"]


def test_more_than_a_thousand_workers_for_a_tenant_is_refused_naming_the_field():
    too_many_pods = small_job_dict(tenants=[{"name": "a", "region": "eu", "replicas": 1001}])
    assert "spec.simulation" in problems_of(too_many_pods)["spec.tenants[0].replicas"]
    too_small_groups = small_job_dict(
        tenants=[{"name": "a", "region": "eu", "replicas": 5000}],
        simulation={"clientsPerWorker": 4},
    )
    message = problems_of(too_small_groups)["spec.simulation.clientsPerWorker"]
    assert "1250 worker processes" in message and "at least 5" in message
    fine = small_job_dict(
        tenants=[{"name": "a", "region": "eu", "replicas": 100_000}],
        simulation={"clientsPerWorker": 100},
    )
    assert len(parse_job(fine).clients()) == 100_000


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_manifest_is_valid(path):
    assert load_job(path).spec.rounds >= 1


def test_an_inflight_budget_that_could_never_hold_the_largest_update_names_its_field():
    # prepare: updates up to 3 GiB, the combiner's budget left at its 2 GiB default
    document = small_job_dict(transport={"maxUpdateBytes": 3 * 1024**3})
    # execute
    problems = problems_of(document)
    # assert: the budget is named, and why it cannot stand
    assert "below maxUpdateBytes" in problems["spec.transport.maxInflightBytes"]


@pytest.mark.parametrize("seed", [-1, 2**53])
def test_a_seed_that_numpy_or_torch_would_refuse_is_refused_by_name(seed):
    # numpy refuses a negative seed; past 2^53 - 1 not every JSON parser reads it exactly
    assert "spec.seed" in problems_of(small_job_dict(seed=seed))
