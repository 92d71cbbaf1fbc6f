"""The README's manifest reference is generated from the spec model."""

from fedkube import specdoc
from tests.support import ROOT


def test_readme_manifest_reference_matches_the_spec_model():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(specdoc.BEGIN) + len(specdoc.BEGIN)
    end = readme.index(specdoc.END)
    assert readme[start:end].strip() == specdoc.table().strip(), (
        "README.md's manifest reference is stale: regenerate it with python -m fedkube.specdoc"
    )


def test_readme_names_the_two_setup_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
