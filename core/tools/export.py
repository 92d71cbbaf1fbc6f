"""Export a LoRA job's result as one full model: base + adapters, merged.

A job with ``spec.training.peft`` checkpoints only its adapters (the frozen
base is built from the seed, or loaded, on every tier). :func:`export_merged`
builds the job's model as every tier does, loads the newest checkpoint's
adapters into it, folds them into the base weights (peft's
``merge_and_unload``: ``W ← W + (alpha/r)·B·A``) and writes the merged
model's floating-point state as safetensors, under the names a full-model
job's checkpoint would use (the entrypoint's model, no peft wrapper), so
``make_model(**kwargs)`` followed by ``load_state_dict`` reads it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedkube.errors import ExportError, FedkubeError
from fedkube.spec import FederatedJob
from fedkube.state import checkpoint
from fedkube.training.learning import build_model, float_state, is_adapted, load_float_state
from fedkube.wire import codec

KIND = "merged-model"


@dataclass(frozen=True)
class Exported:
    """What :func:`export_merged` wrote."""

    path: Path
    round: int
    adapter_tensors: int
    adapter_bytes: int
    model_tensors: int
    model_bytes: int


def merge(job: FederatedJob, adapters: codec.Tensors) -> codec.Tensors:
    """The job's base model with ``adapters`` merged in, as float32 arrays by name.

    Raises :class:`ExportError` when the job trains no adapters, or when
    ``adapters`` are not exactly the job's adapter tensors (names and shapes).
    """
    require_peft(job)
    model = build_model(job)
    if not is_adapted(model):  # pragma: no cover - build_model wraps every peft job
        raise ExportError(f"job {job.name!r}: the model was not wrapped with adapters")
    expected = float_state(model)
    missing = sorted(set(expected) - set(adapters))
    unexpected = sorted(set(adapters) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"job {job.name!r}: the checkpoint's tensors are not this job's adapters "
            f"(missing {_few(missing)}; unexpected {_few(unexpected)}): was it written by "
            "another job, or with another spec.training.peft or spec.model?"
        )
    for name, array in adapters.items():
        if tuple(array.shape) != tuple(expected[name].shape):
            raise ExportError(
                f"job {job.name!r}: adapter {name} has shape {tuple(array.shape)} in the "
                f"checkpoint but {tuple(expected[name].shape)} in the job's model"
            )
    load_float_state(model, adapters)
    merged = model.merge_and_unload()
    return float_state(merged)


def require_peft(job: FederatedJob) -> None:
    if job.spec.training.peft is None:
        raise ExportError(
            f"job {job.name!r} has no spec.training.peft: it trains the whole model, so its "
            "checkpoints already hold the full model and there are no adapters to merge"
        )


def export_merged(job: FederatedJob, checkpoint_dir: Path, out: Path) -> Exported:
    """Merge the newest checkpoint's adapters into the base and write ``out``."""
    require_peft(job)
    try:
        saved = checkpoint.load_latest(Path(checkpoint_dir), job.name)
    except FedkubeError as exc:
        raise ExportError(str(exc)) from None
    if saved is None:
        raise ExportError(
            f"no checkpoint of job {job.name!r} in {checkpoint_dir} (no latest.json): "
            "has a round closed yet?"
        )
    merged = merge(job, saved.weights)
    lora = job.spec.training.peft
    assert lora is not None
    source = job.spec.model or job.spec.task
    assert source is not None  # the spec requires one of them
    metadata = {
        "fedkube.kind": KIND,
        "fedkube.job": job.name,
        "fedkube.round": str(saved.round),
        # What builds the base model: spec.model, else the task's model().
        "fedkube.model": json.dumps(source.model_dump(mode="json", by_alias=True), sort_keys=True),
        "fedkube.lora": json.dumps(lora.model_dump(mode="json", by_alias=True), sort_keys=True),
    }
    body = codec.encode(merged, metadata)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, out)
    return Exported(
        path=out,
        round=saved.round,
        adapter_tensors=len(saved.weights),
        adapter_bytes=codec.payload_nbytes(saved.weights),
        model_tensors=len(merged),
        model_bytes=len(body),
    )


def _few(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
