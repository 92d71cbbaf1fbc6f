"""A generated workload that is hard for plain FedAvg: skewed labels *and* shifted features.

The data. ``make_classification`` (scikit-learn, fixed seed, nothing to
download) draws ``classes`` classes in ``features`` dimensions, each class a
union of ``clusters`` Gaussian blobs placed on the vertices of a hypercube in
an informative subspace, so no linear boundary separates them; the features
are then standardised. Alternatively ``path`` names an ``.npz`` file with
arrays ``x`` and ``y`` (the format of :func:`fedkube.datasets.read_npz`) whose
rows replace the generated ones: everything below applies to them unchanged.

The tenants. The samples are split across ``tenants`` simulated tenants by
label (Dirichlet(α) over the tenants for every class, ``spec.data.partition``;
α = 0.1 leaves most tenants with one to three dominant classes), and every
tenant then sees its samples through its own affine map ``x ↦ x·A_t + b_t``
(``A_t = I + shift·G/√d``, ``b_t ~ N(0, offset²)``, drawn from the seed): the
same class looks different at every tenant, as scanners or sensors differ
between sites.

Why it is hard. Label skew makes every tenant's local optimum a classifier
for its few classes; the feature shift means the tenants also disagree on
*where* a class lies, so their local updates pull the shared first layer in
different directions. With several local epochs per round the clients drift
far from one another (what SCAFFOLD's control variates and FedProx's
proximal term correct), and a tenant training alone learns neither the other
classes nor the other tenants' views.

The splits. A held-out ``testFraction`` of *every tenant's* (shifted) samples
forms role ``test``, so the global tier measures the federation's model on
everyone's data; role ``pooled`` is the union of all tenants' training parts
(the centralised baseline); role ``train`` is one tenant's training part,
divided across its replicas, and role ``validation`` its held-out part, divided
the same way (evaluation at the sites). Everything is a pure function of the job's seed
(and the file), so every process computes the same split and keeps only its
own part.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import make_classification
from torch import nn

from fedkube.datasets import ArrayData, DataContext, read_npz
from fedkube.training import partition

# Separate random streams (numpy SeedSequence entropy [seed, purpose, ...]) so
# that changing one size does not reshuffle an unrelated choice.
_SPLIT, _SHIFT = 1, 2


def make_model(
    features: int = 32, classes: int = 16, hidden: int = 128, layers: int = 2
) -> nn.Module:
    """An MLP: ``layers`` hidden ReLU layers of width ``hidden``."""
    if layers < 1:
        raise ValueError("make_model: layers must be at least 1")
    blocks: list[nn.Module] = []
    width = features
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    blocks.append(nn.Linear(width, classes))
    return nn.Sequential(*blocks)


@dataclass(frozen=True)
class TenantPart:
    """One simulated tenant's data, already in its own (shifted) feature space.

    ``train_index`` / ``test_index`` are rows of the base data set, kept so
    that tests can check the split without re-deriving it.
    """

    train: ArrayData
    test: ArrayData
    train_index: np.ndarray
    test_index: np.ndarray


def base_data(
    seed: int,
    path: str | None = None,
    samples: int = 12000,
    features: int = 32,
    informative: int = 16,
    classes: int = 16,
    clusters: int = 3,
    separation: float = 1.0,
    noise: float = 0.01,
) -> ArrayData:
    """The unshifted data set: generated from ``seed``, or read from ``path``.

    Features are standardised (zero mean, unit variance per column) so that
    the shift strengths mean the same whatever the source.
    """
    if path is not None:
        data = read_npz(path)
        x, y = data.x.reshape(len(data.y), -1), data.y
    else:
        x, y = make_classification(
            n_samples=samples,
            n_features=features,
            n_informative=informative,
            n_redundant=0,
            n_repeated=0,
            n_classes=classes,
            n_clusters_per_class=clusters,
            class_sep=separation,
            flip_y=noise,
            random_state=seed,
        )
    x = np.asarray(x, dtype=np.float64)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)
    return ArrayData(x.astype(np.float32), np.asarray(y, dtype=np.int64))


def tenant_transform(
    seed: int, tenant: int, features: int, shift: float, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tenant ``tenant``'s affine map ``(A, b)``: ``x ↦ x·A + b``."""
    rng = np.random.default_rng([seed, _SHIFT, tenant])
    mixing = np.eye(features) + shift * rng.standard_normal((features, features)) / np.sqrt(
        features
    )
    bias = offset * rng.standard_normal(features)
    return mixing.astype(np.float32), bias.astype(np.float32)


def tenant_parts(
    base: ArrayData,
    tenants: int,
    seed: int,
    scheme: str = "dirichlet",
    alpha: float = 0.1,
    test_fraction: float = 0.2,
    shift: float = 0.5,
    offset: float = 0.5,
) -> list[TenantPart]:
    """Split ``base`` across tenants (by label), hold out a share of each, shift each."""
    if tenants < 1:
        raise ValueError("tenant_parts: tenants must be at least 1")
    if scheme == "dirichlet":
        parts = partition.dirichlet(base.y, tenants, alpha, seed)
    else:
        parts = partition.iid(len(base.y), tenants, seed)
    result = []
    for index, rows in enumerate(parts):
        order = np.random.default_rng([seed, _SPLIT, index]).permutation(rows)
        held = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        test_index, train_index = np.sort(order[:held]), np.sort(order[held:])
        mixing, bias = tenant_transform(seed, index, base.x.shape[1], shift, offset)
        result.append(
            TenantPart(
                train=_shifted(base, train_index, mixing, bias),
                test=_shifted(base, test_index, mixing, bias),
                train_index=train_index,
                test_index=test_index,
            )
        )
    return result


def _shifted(base: ArrayData, rows: np.ndarray, mixing: np.ndarray, bias: np.ndarray) -> ArrayData:
    return ArrayData(base.x[rows] @ mixing + bias, base.y[rows])


def make_data(
    context: DataContext,
    path: str | None = None,
    shift: float = 0.5,
    offset: float = 0.5,
    **sizes: int | float,
) -> ArrayData:
    """The split for ``context.role`` (see the module docstring).

    ``sizes`` go to :func:`base_data` (``samples``, ``features``,
    ``informative``, ``classes``, ``clusters``, ``separation``, ``noise``);
    with ``path`` only the file's rows are used.
    """
    client = context.client
    parts = _parts(
        context.seed,
        path,
        tuple(sorted(sizes.items())),
        context.num_tenants,
        context.partition_scheme,
        context.alpha,
        context.test_fraction,
        shift,
        offset,
    )
    if context.role == "test":
        return _concat([part.test for part in parts])
    if context.role == "pooled":
        return _concat([part.train for part in parts])
    if client is None:
        raise ValueError(f"role {context.role!r} needs a client")
    tenant = parts[client.tenant_index]
    own = tenant.test if context.role == "validation" else tenant.train
    mine = partition.split_replicas(np.arange(len(own)), client.replicas, client.replica)
    return ArrayData(own.x[mine], own.y[mine])


@functools.lru_cache(maxsize=2)
def _parts(
    seed: int,
    path: str | None,
    sizes: tuple[tuple[str, int | float], ...],
    tenants: int,
    scheme: str,
    alpha: float,
    test_fraction: float,
    shift: float,
    offset: float,
) -> list[TenantPart]:
    """Every tenant's split, computed once per process: a worker hosting many
    virtual clients (spec.simulation) asks for a client's shard each time it
    trains one, and a shard is a slice of these."""
    base = base_data(seed, path, **dict(sizes))  # type: ignore[arg-type]
    return tenant_parts(
        base,
        tenants,
        seed,
        scheme=scheme,
        alpha=alpha,
        test_fraction=test_fraction,
        shift=shift,
        offset=offset,
    )


def _concat(parts: list[ArrayData]) -> ArrayData:
    return ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
