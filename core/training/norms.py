"""L2 norms and norm clipping, for every tier that bounds what one update can move.

The worker clips its update to ``spec.privacy.dp.clipNorm`` before it leaves
the client; the combiner measures each update (dense or still compressed) to
check ``transport.normBound`` and clips it to ``robust.normBound`` (as a
factor inside the fold); the strategies report their state's norms. One
definition, so that the norm a worker clipped to is the norm its combiner
checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedkube.wire.compression import Part

Tensors = dict[str, np.ndarray]


def l2_norm(tensors: Mapping[str, np.ndarray | Part]) -> float:
    """The global L2 norm, from dense arrays or from a compressed update's parts."""
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


def clip_scale(norm: float, bound: float) -> float:
    """``min(1, bound/norm)``: the factor that brings ``norm`` within ``bound``.

    A zero norm needs no scaling (1.0); an infinite one (an update whose norm
    overflowed float32) is scaled to 0.0. A NaN norm is an error: updates are
    checked finite before they get here.
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    if math.isnan(norm):
        raise ValueError("norm is NaN")
    if norm <= bound:
        return 1.0
    return bound / norm


def clip(tensors: Mapping[str, np.ndarray], bound: float) -> tuple[Tensors, float]:
    """The update scaled to a global L2 norm ``<= bound``, and the scale applied.

    Within the bound the same array objects come back (in a new dict) with
    scale 1.0; otherwise every tensor is a new array ``scale·t``. The inputs
    are never written. float32 rounding can leave the clipped norm a few ulps
    (relative ~1e-7) above ``bound``.
    """
    scale = clip_scale(l2_norm(tensors), bound)
    if scale == 1.0:
        return dict(tensors), 1.0
    factor = np.float32(scale)
    clipped = {name: (a * factor).astype(a.dtype, copy=False) for name, a in tensors.items()}
    return clipped, scale
