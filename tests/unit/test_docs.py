"""The README's manifest and strategy references are generated from the spec model."""

import typing

from fedkube.spec import ROBUST_GUIDE, STRATEGY_GUIDE, Robust, Strategy
from fedkube.tools import specdoc
from tests.support import ROOT


def between(text: str, begin: str, end: str) -> str:
    start = text.index(begin) + len(begin)
    return text[start : text.index(end, start)].strip()


def test_readme_manifest_reference_matches_the_spec_model():
    readme = (ROOT / "README.md").read_text()
    assert between(readme, specdoc.BEGIN, specdoc.END) == specdoc.table().strip(), (
        "README.md's manifest reference is stale: run python -m fedkube.tools.specdoc --write"
    )


def test_readme_strategy_reference_matches_the_spec_model():
    readme = (ROOT / "README.md").read_text()
    generated = specdoc.strategy_table().strip()
    assert between(readme, specdoc.STRATEGIES_BEGIN, specdoc.STRATEGIES_END) == generated, (
        "README.md's strategy reference is stale: run python -m fedkube.tools.specdoc --write"
    )


def test_the_strategy_guide_names_every_strategy_rule_and_field_and_nothing_else():
    strategy_fields = {info.alias for info in Strategy.model_fields.values()}
    robust_fields = {info.alias for info in Robust.model_fields.values()}
    assert set(STRATEGY_GUIDE) == set(typing.get_args(Strategy.model_fields["name"].annotation))
    assert set(ROBUST_GUIDE) == set(typing.get_args(Robust.model_fields["rule"].annotation))
    for _what, _where, params in STRATEGY_GUIDE.values():
        assert set(params) <= strategy_fields
    for _what, params in ROBUST_GUIDE.values():
        assert set(params) <= robust_fields


def test_readme_names_the_two_setup_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_names_every_site_policy_field_with_its_default():
    from fedkube.policy import DEFAULT_ENTRYPOINTS, SitePolicy

    readme = (ROOT / "README.md").read_text()
    section = between(readme, "### What a site controls", "### Operator metrics")
    for info in SitePolicy.model_fields.values():
        assert f"| `{info.alias}` |" in section, info.alias
    assert all(f"`{prefix}`" in section for prefix in DEFAULT_ENTRYPOINTS)
