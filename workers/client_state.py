"""A client's durable state: what it must remember from one round to the next.

SCAFFOLD's client control variate ``c_i`` lives here (later: error-feedback
residuals of compressed updates). It is stored as safetensors under the
worker's state directory, replaced atomically, and tagged with the job and
client, so a restarted worker continues with the same ``c_i`` and never
picks up another job's. On Kubernetes the directory is on the pod's
``emptyDir``: it survives container restarts, not a replaced pod (whose
client then starts again from ``c_i = 0``, which SCAFFOLD tolerates).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedkube.errors import CodecError, FedkubeError
from fedkube.wire import codec


class ClientState:
    """Named tensor sets of one client, one safetensors file each."""

    def __init__(self, directory: Path, job: str, client: str):
        self.directory = directory
        self.tags = {"fedkube.job": job, "fedkube.client": client}

    def scratch(self) -> Path:
        """A directory of the client's own for its task (fedkube.task.TaskContext.scratch)."""
        path = self.directory / "scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def load(self, name: str, before_round: int) -> dict[str, np.ndarray] | None:
        """The set ``name`` saved in a round before ``before_round``, else None.

        A set saved in this round or later cannot belong to this run of the job
        (an earlier run of a job with the same name left it): it is ignored.
        """
        path = self._path(name)
        if not path.exists():
            return None
        try:
            tensors, meta = codec.decode(path.read_bytes())
        except (OSError, CodecError) as exc:
            raise FedkubeError(f"client state {path} is unreadable: {exc}") from None
        if any(meta.get(key) != value for key, value in self.tags.items()):
            return None  # another job's or client's leftovers: start afresh
        if (
            not meta.get("fedkube.round", "").isdigit()
            or int(meta["fedkube.round"]) >= before_round
        ):
            return None
        return {key: np.array(value) for key, value in tensors.items()}

    def save(self, name: str, tensors: Mapping[str, np.ndarray], round_no: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(codec.encode(dict(tensors), {**self.tags, "fedkube.round": str(round_no)}))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
