"""FederatedJob manifests (fedkube.spec): a job, or a SpecError naming each field.

A manifest comes from whoever submits the job: ``fedkube run job.yaml``
reads the file (:func:`load_job`), the operator the object the API server
stored (:func:`parse_job`). Inputs are the repository's own examples with
fields deleted, retyped, given values out of range or extra keys, and their
YAML text broken: cut, flipped, nested too deep, aliased into cycles or
billions of values, not UTF-8. An accepted job must come back unchanged
through :func:`dump_job` (what the operator and every worker are handed)
and list its clients and worker groups.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import given
from hypothesis import strategies as st

from fedkube.errors import SpecError
from fedkube.policy import DEFAULT_ENTRYPOINTS, check_central
from fedkube.spec import FederatedJob, dump_job, load_job, parse_job
from tests.fuzz.properties import (
    DOCUMENTS,
    TEXTS,
    YAML_DEPTHS,
    mutated,
    outcome,
    scaled,
    spec_problems_named,
)


def job_or_problems(call) -> FederatedJob | None:
    """The property: a job that survives its own round trip, or every problem named."""
    try:
        job = call()
    except SpecError as exc:
        spec_problems_named(exc)
        return None
    outcome("accepted")
    assert parse_job(dump_job(job)) == job
    assert job.clients() and job.worker_groups()
    check_central(job, DEFAULT_ENTRYPOINTS)
    return job


def test_every_example_is_a_job():
    for name, document in DOCUMENTS.items():
        assert job_or_problems(lambda d=document: parse_job(d)) is not None, name


@given(
    st.tuples(st.sampled_from(sorted(DOCUMENTS)), st.sampled_from([1, 1, 3])).flatmap(
        lambda choice: mutated(DOCUMENTS[choice[0]], choice[1])
    )
)
def test_an_example_with_fields_deleted_retyped_or_out_of_range_is_a_job_or_named(document):
    job_or_problems(lambda: parse_job(document))


# -- the file as `fedkube run` reads it --------------------------------------------------------
YAML_PIECES = [
    "&a ",
    "*a",
    "*b",
    "!!python/object:os.system ",
    "!!binary ",
    "\t",
    "{",
    "}",
    "[",
    "- ",
    ": ",
    "? ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "'",
    '"',
    "\\",
    "\ufeff",
    "\x00",
    "\x85",
    ".inf",
    ".nan",
    "0x10",
    "1e9999",
    "~",
    "<<: *a\n",
]


@st.composite
def broken_texts(draw: st.DrawFn) -> bytes:
    text = TEXTS[draw(st.sampled_from(sorted(TEXTS)))]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.integers(min_value=0, max_value=len(text)))
        how = draw(st.sampled_from(["insert", "delete", "truncate", "nest", "alias"]))
        if how == "insert":
            text = (
                text[:where]
                + draw(st.sampled_from(YAML_PIECES) | st.text(max_size=4))
                + text[where:]
            )
        elif how == "delete":
            text = text[:where] + text[where + draw(st.integers(1, 20)) :]
        elif how == "truncate":
            text = text[:where]
        elif how == "nest":
            depth = draw(st.sampled_from(YAML_DEPTHS))
            text = text.replace(
                "kwargs: {", "kwargs: {deep: " + "[" * depth + "]" * depth + ", ", 1
            )
        else:
            # a cycle, or aliases that expand to billions of values (a "billion laughs")
            cyclic = "kwargs: &a {self: *a, "
            laughs = (
                "kwargs: {"
                + ", ".join(
                    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "'lol'"] * 10) + "]"
                    for i in range(draw(st.integers(1, 9)))
                )
                + ", "
            )
            text = text.replace("kwargs: {", draw(st.sampled_from([cyclic, laughs])), 1)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        raw = (
            raw[: len(raw) // 2]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
            + raw[len(raw) // 2 :]
        )
    return raw


@scaled(0.5)
@given(broken_texts())
def test_a_broken_manifest_file_is_a_job_or_named(raw):
    with TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_bytes(raw)
        job_or_problems(lambda: load_job(path))
