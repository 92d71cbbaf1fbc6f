"""Checkpoints of the global model: safetensors weights plus JSON metadata.

After round ``r`` closes, ``round-<r>.safetensors`` holds model version
``r + 1`` (the input of the next round), ``round-<r>.json`` its metadata
(job, round, metrics) and, for a strategy with server state (FedAdam's
moments, SCAFFOLD's control variate), ``round-<r>.state.safetensors`` that
state, so that a restarted aggregator continues the same optimisation.
``latest.json`` names the newest one and is replaced atomically, so a crash
mid-write never leaves a torn "latest". Partials that the global tier
acknowledged for the round in progress are kept beside them
(``partials/round-<r>/<region>.safetensors``) so that a restarted aggregator
loses none of them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkube.errors import CheckpointError, CodecError
from fedkube.wire import codec

KEEP = 5


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    metadata: dict[str, Any]
    state: dict[str, np.ndarray]


def _atomic_write(path: Path, data: bytes | bytearray | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def save(
    directory: Path,
    job: str,
    number: int,
    weights: dict[str, np.ndarray],
    metadata: dict[str, Any],
    keep: int = KEEP,
    state: dict[str, np.ndarray] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"round-{number:06d}"
    tags = {"fedkube.job": job, "fedkube.round": str(number)}
    _atomic_write(directory / f"{stem}.safetensors", codec.encode(weights, tags))
    if state:
        # Before latest.json moves: a pointer never names a round without its state.
        _atomic_write(directory / f"{stem}.state.safetensors", codec.encode(state, tags))
    meta = {"job": job, "round": number, **metadata}
    _atomic_write(directory / f"{stem}.json", json.dumps(meta, sort_keys=True).encode())
    _atomic_write(directory / "latest.json", json.dumps({"round": number, "stem": stem}).encode())
    for old in sorted(directory.glob("round-??????.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
        old.with_suffix(".state.safetensors").unlink(missing_ok=True)
    return directory / f"{stem}.safetensors"


def load_latest(directory: Path, job: str) -> Checkpoint | None:
    pointer = directory / "latest.json"
    if not pointer.exists():
        return None
    try:
        stem = json.loads(pointer.read_text())["stem"]
        meta = json.loads((directory / f"{stem}.json").read_text())
        tensors, tmeta = codec.decode((directory / f"{stem}.safetensors").read_bytes())
        state_path = directory / f"{stem}.state.safetensors"
        state, smeta = codec.decode(state_path.read_bytes()) if state_path.exists() else ({}, tmeta)
    except (OSError, KeyError, json.JSONDecodeError, CodecError) as exc:
        raise CheckpointError(f"checkpoint in {directory} is unreadable: {exc}") from None
    if {meta.get("job"), tmeta.get("fedkube.job"), smeta.get("fedkube.job")} != {job}:
        raise CheckpointError(f"checkpoint in {directory} belongs to job {meta.get('job')!r}")
    return Checkpoint(
        round=int(meta["round"]),
        weights={name: np.array(array) for name, array in tensors.items()},
        metadata=meta,
        state={name: np.array(array) for name, array in state.items()},
    )


def clear(directory: Path) -> None:
    """Remove every checkpoint (a fresh, non-resumed run)."""
    if directory.exists():
        shutil.rmtree(directory)


def partial_dir(directory: Path, number: int) -> Path:
    return directory / "partials" / f"round-{number:06d}"


def save_partial(
    directory: Path, number: int, region: str, body: bytes | bytearray | memoryview
) -> None:
    target = partial_dir(directory, number)
    target.mkdir(parents=True, exist_ok=True)
    _atomic_write(target / f"{region}.safetensors", body)


def load_partials(directory: Path, number: int) -> dict[str, bytes]:
    target = partial_dir(directory, number)
    if not target.exists():
        return {}
    return {path.stem: path.read_bytes() for path in sorted(target.glob("*.safetensors"))}


def drop_partials(directory: Path, upto: int) -> None:
    root = directory / "partials"
    if not root.exists():
        return
    for path in root.glob("round-*"):
        if int(path.name.split("-")[1]) <= upto:
            shutil.rmtree(path, ignore_errors=True)
