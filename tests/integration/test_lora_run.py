"""A LoRA job end to end: real processes, only adapters on the wire, perplexity falls."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from fedkube.local.runner import RunOptions, run_job
from fedkube.spec import load_job, parse_job
from fedkube.tools.export import export_merged
from fedkube.training.learning import build_model, float_state
from fedkube.wire import codec
from tests.support import ROOT

pytestmark = pytest.mark.integration


def short_lora_job() -> dict:
    """examples/lora.yaml, shrunk to run in well under a minute on 2 cores."""
    document = yaml.safe_load((ROOT / "examples" / "lora.yaml").read_text())
    spec = document["spec"]
    spec["rounds"] = 3
    spec["model"]["kwargs"] = {"context": 32, "width": 256, "layers": 2, "heads": 4}
    spec["data"]["kwargs"] = {"seq_len": 32, "windows_per_topic": 96, "split": "topic"}
    spec["participation"]["roundTimeoutSeconds"] = 120
    return document


def test_a_lora_job_moves_only_adapters_and_lowers_held_out_perplexity(tmp_path):
    document = short_lora_job()
    manifest = tmp_path / "lora.yaml"
    manifest.write_text(yaml.safe_dump(document))
    job = load_job(manifest)
    without_peft = copy.deepcopy(document)
    del without_peft["spec"]["training"]["peft"]
    full_model_bytes = len(codec.encode(float_state(build_model(parse_job(without_peft))), {}))

    result = run_job(RunOptions(job_path=manifest, out_dir=tmp_path / "run", quiet=True))

    assert result.status == "succeeded", result.message
    history = result.history
    assert [r["round"] for r in history] == [1, 2, 3]
    for record in history:
        clients = record["reported"]
        assert clients == len(job.clients())
        assert 0 < record["bytes_up"] / clients <= full_model_bytes / 100, record
        assert 0 < record["bytes_down"] / clients <= full_model_bytes / 100, record
    first, last = (math.exp(r["loss"]) for r in (history[0], history[-1]))
    assert last < first, [math.exp(r["loss"]) for r in history]
    # the checkpoint holds the adapters only, and exports as the merged model
    done = export_merged(job, result.out_dir / "checkpoints", tmp_path / "merged.safetensors")
    assert done.round == 3 and 100 * done.adapter_bytes <= done.model_bytes
