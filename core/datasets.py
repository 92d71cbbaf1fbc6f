"""What a data factory is told and returns, and the built-in factory for real data.

A job's ``spec.data.entrypoint`` (or a tenant's) names a ``module:callable``
that takes a :class:`DataContext` and returns :class:`ArrayData` (a task's own
``data`` may return anything its ``train`` reads). These two types are the
contract, imported by a user's code as ``fedkube.datasets.DataContext`` and
``fedkube.datasets.ArrayData``.

``load_npz`` is what a tenant points ``tenants[].data.kwargs.path`` at: an
``.npz`` file on the tenant's own storage with arrays ``x`` (features) and
``y`` (integer labels), and at ``validationPath`` the tenant's own held-out
file (evaluation at the sites). The global tier reads its held-out set from
``spec.data.kwargs.testPath``. Nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkube.spec import Client
from fedkube.task import Role


@dataclass(frozen=True)
class DataContext:
    """What a data factory is told: who is asking, and for which split.

    ``role`` is ``train`` for one client's own partition, ``validation`` for
    its own held-out part, ``test`` for the global tier's held-out split and
    ``pooled`` for all training data (the centralised baseline only).
    """

    role: Role
    client: Client | None
    partition_scheme: str
    alpha: float
    test_fraction: float
    seed: int
    num_tenants: int = 1  # tenants of the job: a simulated split needs it for every role


@dataclass(frozen=True)
class ArrayData:
    """Features and integer labels, as numpy arrays."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(len(self.y))


def load_npz(
    context: DataContext,
    path: str | None = None,
    testPath: str | None = None,  # noqa: N803
    pooledPath: str | None = None,  # noqa: N803
    validationPath: str | None = None,  # noqa: N803
) -> ArrayData:
    chosen = {
        "train": path,
        "validation": validationPath,
        "test": testPath,
        "pooled": pooledPath,
    }[context.role]
    if not chosen:
        raise ValueError(f"load_npz: no file given for role {context.role!r}")
    return read_npz(chosen)


def read_npz(path: str | Path) -> ArrayData:
    """Arrays ``x`` (as float32) and ``y`` (as int64) of one ``.npz`` file.

    Shared by :func:`load_npz` and the example factories that accept a file in
    place of generated data, so every loader checks the format the same way.
    """
    with np.load(Path(path), allow_pickle=False) as archive:
        if "x" not in archive or "y" not in archive:
            raise ValueError(f"{path}: expected arrays 'x' and 'y', found {sorted(archive)}")
        return ArrayData(archive["x"].astype(np.float32), archive["y"].astype(np.int64))
