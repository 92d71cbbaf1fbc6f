"""Site policies (fedkube.policy): a policy, or a PolicyError naming each field.

A policy is the site's own file (``fedkube operator --policy``, the chart's
``site.policy``); its data binding reaches the site's workers as a file too
(``--data-binding``). Inputs are a policy that uses every field, with fields
deleted, retyped or out of range, and its YAML text broken. An accepted
policy must check every example job without an error of its own (quantities
compared, entrypoints and images matched) and hand its bindings to the
workers unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fedkube.errors import PolicyError
from fedkube.policy import (
    ENTRYPOINT_RULE,
    DataBinding,
    SitePolicy,
    check,
    data_binding_document,
    load_data_binding,
    load_policy,
    parse_policy,
)
from fedkube.spec import QUANTITY, parse_job
from tests.fuzz.properties import (
    DOCUMENTS,
    YAML_DEPTHS,
    mutated,
    outcome,
    scaled,
    spec_problems_named,
)

POLICY = {
    "participate": True,
    "entrypoints": ["fedkube.examples.", "fedkube.datasets:", "hospital.models:net", "run.py"],
    "images": ["registry.example/fedkube:", "fedkube/worker:1.0"],
    "maxGpus": 4,
    "maxMemory": "16Gi",
    "dataBindings": {
        "hospital-a": {
            "entrypoint": "fedkube.datasets:load_npz",
            "kwargs": {"path": "/data/a.npz"},
            "volume": {"claim": "scans-a", "mountPath": "/data"},
        },
        "hospital-b": {"kwargs": {"root": "/mnt/b"}, "volume": {"hostPath": "/srv/b"}},
    },
}
JOBS = [parse_job(document) for document in DOCUMENTS.values()]
SITES = [None, "hospital-a", "nowhere"]


def policy_or_problems(call) -> SitePolicy | None:
    """The property: a policy that checks every job and hands on its bindings, or named problems."""
    try:
        policy = call()
    except PolicyError as exc:
        spec_problems_named(exc)
        return None
    outcome("accepted")
    assert all(re.fullmatch(ENTRYPOINT_RULE, item) for item in policy.entrypoints)
    for job in JOBS:
        for site in SITES:
            for refusal in check(job, policy, site, "fedkube/worker:1.0"):
                assert refusal.field and refusal.rule and refusal.message.strip()
    for binding in policy.data_bindings.values():
        assert DataBinding.model_validate(data_binding_document(binding)) == binding
    return policy


def test_the_full_policy_is_a_policy():
    assert policy_or_problems(lambda: parse_policy(POLICY)) is not None


@given(st.sampled_from([1, 1, 3]).flatmap(lambda edits: mutated(POLICY, edits)))
def test_a_policy_with_fields_deleted_retyped_or_out_of_range_is_a_policy_or_named(document):
    policy_or_problems(lambda: parse_policy(document))


quantities = st.from_regex(QUANTITY, fullmatch=True).filter(lambda q: len(q) < 40)


@given(quantities, quantities, st.integers(min_value=1, max_value=5))
def test_any_memory_quantity_the_spec_and_the_policy_accept_compares(asked, limit, replicas):
    # prepare: a job whose tenants ask ``asked`` each, a site that caps them at ``limit``
    document = {**DOCUMENTS["digits.yaml"]}
    spec = dict(document["spec"])
    spec["tenants"] = [
        {**tenant, "replicas": replicas, "resources": {"memory": asked}}
        for tenant in spec["tenants"]
    ]
    job = parse_job({**document, "spec": spec})
    policy = parse_policy({"maxMemory": limit})
    # execute / assert: every tenant is in or out, by rule and without an error
    for refusal in check(job, policy, None, "fedkube/worker:1.0"):
        assert refusal.rule == "maxMemory"


# -- the files as the operator and a worker read them ------------------------------------------
TEXT = yaml.safe_dump(POLICY)
PIECES = ["&a ", "*a", "!!python/name:os.system ", "\t", "{", "[", "- ", ": ", "---\n", "'", "~"]


@st.composite
def policy_texts(draw: st.DrawFn) -> bytes:
    text = TEXT
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.integers(min_value=0, max_value=len(text)))
        how = draw(st.sampled_from(["insert", "delete", "truncate", "nest", "cycle"]))
        if how == "insert":
            text = text[:where] + draw(st.sampled_from(PIECES) | st.text(max_size=3)) + text[where:]
        elif how == "delete":
            text = text[:where] + text[where + draw(st.integers(1, 12)) :]
        elif how == "truncate":
            text = text[:where]
        elif how == "nest":
            depth = draw(st.sampled_from(YAML_DEPTHS))
            text = text.replace(
                "kwargs:\n", "kwargs:\n      deep: " + "[" * depth + "]" * depth + "\n", 1
            )
        else:
            text = text.replace("kwargs:\n", "kwargs: &k\n      self: *k\n", 1)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        raw = b"\xff" + raw
    return raw


@scaled(0.5)
@given(policy_texts())
def test_a_broken_policy_file_is_a_policy_or_named(raw):
    with TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        path.write_bytes(raw)
        policy_or_problems(lambda: load_policy(path))


@scaled(0.5)
@given(
    st.sampled_from(sorted(POLICY["dataBindings"])).flatmap(
        lambda tenant: mutated(POLICY["dataBindings"][tenant], 2)
    )
)
def test_a_broken_data_binding_file_is_a_binding_or_named(document):
    binding_or_problems(yaml.safe_dump(document).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"kwargs: &k {self: *k}\n",  # accepted, then failed as JSON for the worker
        b"kwargs: {deep: " + b"[" * 200 + b"]" * 200 + b"}\n",  # beyond pydantic's serializer
        b"kwargs: {deep: " + b"[" * 2000 + b"]" * 2000 + b"}\n",  # RecursionError in PyYAML
        b"\xc3(",  # UnicodeDecodeError
        b"kwargs: {}\n---\nkwargs: {}\n",
    ],
    ids=["cycle", "nested-200", "nested-2000", "not-utf8", "two-documents"],
)
def test_a_data_binding_file_that_is_no_binding_is_refused_naming_the_flag(raw):
    with pytest.raises(PolicyError, match="--data-binding"):
        binding_or_problems(raw, refused=True)


def binding_or_problems(raw: bytes, refused: bool = False) -> None:
    """The property for a binding file: one the worker can be handed, or named problems."""
    with TemporaryDirectory() as folder:
        path = Path(folder) / "binding.json"
        path.write_bytes(raw)
        try:
            binding = load_data_binding(path)
        except PolicyError as exc:
            spec_problems_named(exc)
            if refused:
                raise
            return
    outcome("accepted")
    assert DataBinding.model_validate(data_binding_document(binding)) == binding
