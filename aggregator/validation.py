"""Checks on a decoded update or partial, before it may touch a sum; and on who sent it.

Pure functions over arrays: each failure raises
:class:`~fedkube.errors.UpdateRejected` with the ``reason`` label used in
``fedkube_updates_rejected_total``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedkube.errors import UpdateRejected
from fedkube.spec import Client
from fedkube.wire.protocol import Reason

Template = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def check_client(clients: Mapping[str, Client], client: str, tenant: str, region: str) -> Client:
    """The client a message names, which must be the sending tenant's and in ``region``."""
    known = clients.get(client)
    if known is None or known.tenant != tenant:
        raise UpdateRejected(
            Reason.unknown_tenant.value,
            f"client {client!r} is not a client of tenant {tenant!r} in region {region}",
            403,
        )
    return known


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


def finite_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm, checking on the way that every value is finite.

    One BLAS dot product per tensor, with no temporary array: a NaN or ±Inf
    anywhere makes ``‖a‖²`` NaN or +Inf (squares cannot cancel). Only then
    is the element-wise check run, to tell a non-finite value (refused) from
    finite values whose squares overflow float32 (summed again in float64).
    """
    total = 0.0
    for name, array in tensors.items():
        flat = array.reshape(-1)
        if flat.dtype.kind != "f":
            flat = flat.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # told apart below
            squared = float(np.dot(flat, flat))
        if not math.isfinite(squared):
            if not np.isfinite(flat).all():
                raise UpdateRejected(Reason.non_finite.value, f"{name} holds NaN or Inf")
            wide = flat.astype(np.float64)
            squared = float(np.dot(wide, wide))
        total += squared
    return math.sqrt(total)


def check_bound(norm: float, bound: float | None) -> None:
    if bound is not None and norm > bound:
        raise UpdateRejected(Reason.norm_bound.value, f"update L2 norm {norm:.4g} > bound {bound}")


def check_update(
    tensors: Mapping[str, np.ndarray], template: Template, norm_bound: float | None
) -> float:
    """Everything an update must satisfy, cheapest checks first; returns its L2 norm."""
    check_structure(tensors, template)
    norm = finite_norm(tensors)
    check_bound(norm, norm_bound)
    return norm
