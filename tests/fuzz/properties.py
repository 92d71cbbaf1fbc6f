"""What every fuzz test asserts, its volume, and the inputs the decoders share.

The property, for every decoder of bytes that a tenant or a site controls:
it returns, or it raises the project's own error for that decoder, naming
the problem. Any other exception (a ``KeyError``, a ``RecursionError``, an
``OverflowError``) would escape as a 500 at the HTTP boundary, or as a
traceback from ``fedkube run``.

Volume: the profile ``ci`` (the default, in ``make test``) keeps all of
tests/fuzz well under a minute on two cores; ``long`` (``make fuzz``, or
``FEDKUBE_FUZZ_PROFILE=long``) tries 25 times as many inputs. Both are
derandomised and keep no example database, so a run is reproducible, and
neither has a deadline, so a slow shared machine fails no test.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import yaml
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from fedkube.errors import SpecError, UpdateRejected
from fedkube.spec import KIND
from fedkube.wire.protocol import Reason
from tests.support import ROOT

PROFILE_ENV = "FEDKUBE_FUZZ_PROFILE"
CI_EXAMPLES = 80
LONG_FACTOR = 25

_common: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": True,
    # Payloads are large on purpose, and some inputs are refused before the
    # interesting part; neither is a reason to stop fuzzing.
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
}
settings.register_profile("ci", max_examples=CI_EXAMPLES, **_common)
settings.register_profile("long", max_examples=CI_EXAMPLES * LONG_FACTOR, **_common)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))


def scaled(fraction: float) -> settings:
    """The loaded profile, with ``fraction`` of its examples (a test whose input costs more)."""
    return settings(max_examples=max(5, math.ceil(settings.default.max_examples * fraction)))


REASONS = {reason.value for reason in Reason}


def outcome(label: str) -> None:
    """Count ``label`` in --hypothesis-show-statistics (how many inputs were accepted)."""
    if currently_in_test_context():
        event(label)


def refused_by_name(exc: UpdateRejected) -> None:
    """An update refusal carries a known reason label, a detail and an HTTP error status."""
    assert exc.reason in REASONS, exc.reason
    assert exc.detail.strip(), exc
    assert 400 <= exc.status < 500, exc.status
    outcome(f"refused: {exc.reason}")


def spec_problems_named(exc: SpecError) -> None:
    """A manifest or policy refusal names at least one field and says what is wrong with it."""
    assert exc.problems, exc
    for field, reason in exc.problems:
        assert isinstance(field, str) and field, exc.problems
        assert isinstance(reason, str) and reason.strip(), exc.problems
    assert str(exc).strip()
    outcome("refused")


# -- JSON values ----------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    """``[[[...]]]`` ``depth`` deep: what makes json's C parser raise RecursionError."""
    return open_ * depth + close * depth


DEPTHS = [3, 50, 900, 990, 1000, 1100, 5000, 100_000]
# PyYAML, which is pure Python, gives up near 500 levels, and takes its time at 5000.
YAML_DEPTHS = [3, 50, 400, 600]
deep_json_text = st.one_of(
    st.sampled_from(DEPTHS).map(nested),
    st.sampled_from(DEPTHS).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(DEPTHS).map(lambda n: "[" * n),  # never closed
)


# -- the repository's example manifests -----------------------------------------------------
TEXTS = {path.name: path.read_text() for path in sorted((ROOT / "examples").glob("*.yaml"))}
DOCUMENTS = {
    name: next(d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") == KIND)
    for name, text in TEXTS.items()
}


# -- mutating a document --------------------------------------------------------------------
def paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON-like tree (the root is ``()``)."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += paths(value, (*prefix, index))
    return found


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``document`` with ``path`` set to ``value`` (the rest shared, not copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        return {**document, head: replaced(document[head], rest, value)}
    copy = list(document)
    copy[head] = replaced(copy[head], rest, value)
    return copy


def deleted(document: Any, path: tuple[Any, ...]) -> Any:
    """A copy of ``document`` without what ``path`` names."""
    if len(path) == 1:
        if isinstance(document, dict):
            return {k: v for k, v in document.items() if k != path[0]}
        return [v for i, v in enumerate(document) if i != path[0]]
    head = path[0]
    if isinstance(document, dict):
        return {**document, head: deleted(document[head], path[1:])}
    copy = list(document)
    copy[head] = deleted(copy[head], path[1:])
    return copy


# Values that a field of the wrong type, or out of its range, might hold.
wrong_values = st.one_of(
    scalars,
    st.sampled_from(
        [
            -1,
            0,
            2**31,
            2**63,
            10**30,
            -(10**30),
            1e308,
            -1e308,
            float("inf"),
            float("-inf"),
            float("nan"),
            "",
            " ",
            "\n",
            "x" * 300,
            "fedkube.examples.digits:make_model",
            "a b",
            [],
            {},
            [[]],
            {"": None},
            True,
        ]
    ),
    json_values,
)


@st.composite
def mutated(draw: st.DrawFn, document: Any, edits: int = 3) -> Any:
    """``document`` with up to ``edits`` places deleted, retyped or given extra keys."""
    for _ in range(draw(st.integers(min_value=1, max_value=edits))):
        where = draw(st.sampled_from(paths(document)))
        kind = draw(st.sampled_from(["replace", "replace", "delete", "extra", "wrap"]))
        if kind == "delete" and where:
            document = deleted(document, where)
        elif kind == "extra":
            target = _get(document, where)
            if isinstance(target, dict):
                key = draw(st.text(max_size=12))
                document = replaced(document, where, {**target, key: draw(wrong_values)})
            else:
                document = replaced(document, where, draw(wrong_values))
        elif kind == "wrap":
            document = replaced(document, where, [_get(document, where)])
        else:
            document = replaced(document, where, draw(wrong_values))
    return document


def _get(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        document = document[part]
    return document


def never_unnamed(call: Callable[[], Any], *named: type[BaseException]) -> Any:
    """``call()``'s result, or None when it raised one of ``named`` (asserting its message)."""
    try:
        return call()
    except named as exc:
        assert str(exc).strip(), repr(exc)
        return None
