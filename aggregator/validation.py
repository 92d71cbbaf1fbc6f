"""Checks on a decoded update or partial, before it may touch a sum.

Pure functions over arrays: each failure raises
:class:`~fedkube.errors.UpdateRejected` with the ``reason`` label used in
``fedkube_updates_rejected_total``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedkube.compression import Part
from fedkube.errors import UpdateRejected
from fedkube.protocol import Reason

Template = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def template_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of a model: what every update must match."""
    return {name: (tuple(array.shape), array.dtype) for name, array in tensors.items()}


def check_structure(tensors: Mapping[str, np.ndarray], template: Template) -> None:
    missing = template.keys() - tensors.keys()
    extra = tensors.keys() - template.keys()
    if missing or extra:
        raise UpdateRejected(
            Reason.wrong_shape.value,
            f"tensor names differ from the model: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}",
        )
    for name, (shape, dtype) in template.items():
        array = tensors[name]
        if array.dtype != dtype:
            raise UpdateRejected(
                Reason.wrong_dtype.value, f"{name}: dtype {array.dtype}, model has {dtype}"
            )
        if tuple(array.shape) != shape:
            raise UpdateRejected(
                Reason.wrong_shape.value, f"{name}: shape {tuple(array.shape)}, model has {shape}"
            )


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise UpdateRejected(Reason.non_finite.value, f"{name} holds NaN or Inf")


def l2_norm(tensors: Mapping[str, np.ndarray | Part]) -> float:
    """The update's L2 norm, from dense arrays or from a compressed update's parts."""
    return float(
        np.sqrt(
            sum(
                a.squared_norm()
                if isinstance(a, Part)
                else float(np.dot(a.reshape(-1), a.reshape(-1)))
                for a in tensors.values()
            )
        )
    )


def check_norm(tensors: Mapping[str, np.ndarray | Part], bound: float | None) -> None:
    if bound is None:
        return
    norm = l2_norm(tensors)
    if norm > bound:
        raise UpdateRejected(Reason.norm_bound.value, f"update L2 norm {norm:.4g} > bound {bound}")


def check_update(
    tensors: Mapping[str, np.ndarray], template: Template, norm_bound: float | None
) -> None:
    """Everything an update must satisfy, cheapest checks first."""
    check_structure(tensors, template)
    check_finite(tensors)
    check_norm(tensors, norm_bound)
