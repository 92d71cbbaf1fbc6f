"""Norm clipping of client updates (McMahan et al., 2018, "Learning Differentially
Private Recurrent Language Models"; Sun et al., 2019, "Can You Really Backdoor
Federated Learning?").

Every update is scaled down, as a whole, to a global L2 norm of at most
``robust.normBound`` before it is folded or buffered. A boosted (model
replacement) update must be large to survive averaging; clipping caps what
any one client can move the model by, while honest updates within the bound
pass unchanged. Sun et al. show this alone defeats most backdoor attacks at
little cost in accuracy. It needs no buffer, so it works with any fold.

A combiner that folds can skip the scaled copy: :func:`fedkube.training.norms.clip_scale`
of the update's norm, passed to ``WeightedSum.fold(delta, w, scale=w·s)``,
applies the same clipping inside the fold. The clip itself is
:func:`fedkube.training.norms.clip`, the same one a worker applies for DP's clipNorm.
"""

NAME = "normBound"
