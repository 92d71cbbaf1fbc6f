"""Manifest and policy files that YAML reads but JSON cannot hold: refused, naming why.

``fedkube run`` reads a manifest file, a site operator its policy file, a
worker its data binding: each must come back as a named problem (SpecError,
PolicyError), not as a UnicodeDecodeError, a RecursionError from PyYAML, or a
job accepted now that fails when it is written as JSON for the operator.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from fedkube.errors import PolicyError, SpecError
from fedkube.policy import load_data_binding, load_policy, parse_policy
from fedkube.spec import MAX_DOCUMENT_DEPTH, dump_job, load_job, parse_job
from tests.support import ROOT, small_job_dict

DIGITS = (ROOT / "examples" / "digits.yaml").read_text()
KWARGS = "kwargs: {hidden: 128}"
LAUGHS = (
    "kwargs: {"
    + ", ".join(
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "'lol'"] * 10) + "]" for i in range(8)
    )
    + "}"
)


def nested(depth: int) -> list:
    return functools.reduce(lambda inner, _: [inner], range(depth), [])


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (DIGITS.encode("utf-16"), "<file>", "is not UTF-8 text"),  # was a UnicodeDecodeError
        (DIGITS.replace(KWARGS, "kwargs: {x: " + "[" * 600 + "]" * 600 + "}"), None, "nest"),
        (DIGITS.replace(KWARGS, "kwargs: &k {self: *k}"), "spec.model.kwargs.self", "contains it"),
        (DIGITS.replace(KWARGS, LAUGHS), "<root>", "more than 1000000 values"),
    ],
    ids=["utf-16", "nested-600", "cycle", "billion-laughs"],
)
def test_a_manifest_file_yaml_reads_but_json_cannot_hold_is_refused_by_name(
    tmp_path: Path, text, field, words
):
    # prepare
    path = tmp_path / "job.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    # execute
    with pytest.raises(SpecError) as caught:
        load_job(path)
    # assert
    ((place, reason),) = caught.value.problems
    assert words in reason and (field is None or place == field)


def test_kwargs_nested_deeper_than_the_serializer_follows_are_refused_where_they_nest():
    # prepare: accepted before, then dump_job raised "Maximum serialization depth exceeded"
    deep = small_job_dict(model={"entrypoint": "fedkube.examples.digits:make_model"})
    deep["spec"]["model"]["kwargs"] = {"layers": nested(300)}
    fits = small_job_dict()
    fits["spec"]["model"]["kwargs"] = {"layers": nested(MAX_DOCUMENT_DEPTH - 5)}
    # execute
    with pytest.raises(SpecError) as caught:
        parse_job(deep)
    job = parse_job(fits)
    # assert: the field is named, and what is accepted can be written as JSON
    ((place, reason),) = caught.value.problems
    assert place.startswith("spec.model.kwargs.layers[0]") and "deeper than 100" in reason
    assert parse_job(dump_job(job)) == job


def test_a_policy_file_that_is_not_utf8_or_nests_too_deep_is_refused_by_name(tmp_path: Path):
    # prepare
    latin, deep = tmp_path / "latin.yaml", tmp_path / "deep.yaml"
    latin.write_bytes("images: ['régistre/']\n".encode("latin-1"))
    deep.write_text("dataBindings: {a: {kwargs: {x: " + "[" * 600 + "]" * 600 + "}}}\n")
    # execute / assert
    with pytest.raises(PolicyError, match="is not UTF-8 text"):
        load_policy(latin)
    with pytest.raises(PolicyError, match="nest"):
        load_policy(deep)
    with pytest.raises(PolicyError, match="deeper than 100 levels"):
        parse_policy({"dataBindings": {"a": {"kwargs": {"x": nested(200)}}}})


def test_a_data_binding_file_with_a_cycle_is_refused_naming_the_flag(tmp_path: Path):
    path = tmp_path / "binding.json"
    path.write_text("kwargs: &k {self: *k}\n")
    with pytest.raises(PolicyError) as caught:
        load_data_binding(path)
    ((place, reason),) = caught.value.problems
    assert place == "--data-binding kwargs.self" and "contains it" in reason


def test_a_policy_entrypoint_with_a_trailing_newline_is_refused():
    # re.match's $ matched before a final "\n": the rule was taken, and matched nothing
    with pytest.raises(PolicyError, match="neither module:callable"):
        parse_policy({"entrypoints": ["fedkube.examples.\n"]})


@pytest.mark.parametrize(
    ("where", "value"),
    [("kwargs", float("inf")), ("kwargs", float("nan")), ("timeout", float("inf"))],
)
def test_infinity_or_nan_in_a_manifest_is_refused_as_no_json_number(where, value):
    # prepare: in kwargs dump_job wrote them as null; no JSON (no Kubernetes object) holds them
    document = small_job_dict(participation={"roundTimeoutSeconds": 30})
    if where == "kwargs":
        document["spec"]["model"]["kwargs"] = {"scale": [1.0, value]}
    else:
        document["spec"]["participation"]["roundTimeoutSeconds"] = value
    # execute
    with pytest.raises(SpecError) as caught:
        parse_job(document)
    # assert
    ((place, reason),) = caught.value.problems
    field = "spec.model.kwargs.scale[1]" if where == "kwargs" else "spec.participation"
    assert place.startswith(field) and "is not a JSON number" in reason
