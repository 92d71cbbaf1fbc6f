"""Norm clipping of client updates (McMahan et al., 2018, "Learning Differentially
Private Recurrent Language Models"; Sun et al., 2019, "Can You Really Backdoor
Federated Learning?").

Every update is scaled down, as a whole, to a global L2 norm of at most
``robust.normBound`` before it is folded or buffered. A boosted (model
replacement) update must be large to survive averaging; clipping caps what
any one client can move the model by, while honest updates within the bound
pass unchanged. Sun et al. show this alone defeats most backdoor attacks at
little cost in accuracy. It needs no buffer, so it works with any fold.

A combiner that folds can skip the scaled copy: ``clip_scale`` of the
update's norm, passed to ``WeightedSum.fold(delta, w, scale=w·s)``, applies
the same clipping inside the fold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedkube.aggregator.strategies.fedavg import Tensors
from fedkube.aggregator.validation import l2_norm

NAME = "normBound"


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
