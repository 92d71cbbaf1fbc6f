"""Data factories for real, tenant-local data.

``load_npz`` is what a tenant points ``tenants[].data.kwargs.path`` at: an
``.npz`` file on the tenant's own storage with arrays ``x`` (features) and
``y`` (integer labels), and at ``validationPath`` the tenant's own held-out
file (evaluation at the sites). The global tier reads its held-out set from
``spec.data.kwargs.testPath``. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedkube.learning import ArrayData, DataContext


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
