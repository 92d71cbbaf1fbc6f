"""README, "From an empty folder to a running job": its files, run as a newcomer would.

The section's ``load.py`` and ``job.yaml`` are copied out of README.md into
an empty folder and ``fedkube run`` trains them there (fewer rounds): the
README cannot drift from what works.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.support import ROOT, fedkube_cli

pytestmark = pytest.mark.integration

SECTION = "### From an empty folder to a running job"


def section_blocks() -> dict[str, str]:
    """The section's fenced blocks, by language (python, yaml, sh)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    body = readme[start : readme.index("\n### ", start + len(SECTION))]
    return {lang: code for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, re.DOTALL)}


def test_the_readmes_task_runs_from_an_empty_folder_and_learns(tmp_path):
    # prepare: the README's two files, in an empty folder; 5 rounds instead of 30
    blocks = section_blocks()
    (tmp_path / "load.py").write_text(blocks["python"])
    job = yaml.safe_load(blocks["yaml"])
    job["spec"]["rounds"] = 5
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    # execute: as the README says, from that folder
    checked = fedkube_cli("validate", "job.yaml", cwd=tmp_path)
    done = fedkube_cli("run", "job.yaml", cwd=tmp_path, timeout=600)
    # assert: the job succeeded, and the task's own metric fell
    assert checked.returncode == 0, checked.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = (tmp_path / "runs" / "load" / "history.jsonl").read_text().splitlines()
    errors = [json.loads(line)["metrics"]["mae"] for line in history]
    assert len(errors) == 5 and errors[-1] < 0.8 * errors[0], errors
    # ... and the job is shown by it: lower is better, as its evaluation says.
    assert "  mae " in done.stdout and "acc" not in done.stdout, done.stdout[-2000:]
    assert re.search(rf"best mae +{min(errors):.4g} \(round", done.stdout), done.stdout[-1000:]
