"""The synthetic workload: deterministic, disjoint, skewed, shifted, loadable from a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedkube.datasets import ArrayData, DataContext
from fedkube.examples import synthetic
from fedkube.spec import Client

# Small enough to be quick; the same structure as examples/synthetic.yaml.
SIZES = {"samples": 3000, "features": 16, "informative": 8, "classes": 10, "clusters": 2}
TENANTS = 6


def context(
    role: str, client: Client | None = None, seed: int = 5, tenants: int = TENANTS
) -> DataContext:
    return DataContext(
        role=role,  # type: ignore[arg-type]
        client=client,
        partition_scheme="dirichlet",
        alpha=0.1,
        test_fraction=0.2,
        seed=seed,
        num_tenants=tenants,
    )


def client(tenant: int, replica: int = 0, replicas: int = 1) -> Client:
    return Client(f"t{tenant}-{replica}", f"t{tenant}", "eu", replica, replicas, tenant, TENANTS)


def data(role: str, who: Client | None = None, seed: int = 5, **kwargs: object) -> ArrayData:
    return synthetic.make_data(context(role, who, seed), **SIZES, **kwargs)


def rows(part: ArrayData) -> set[bytes]:
    """Each sample as bytes (features and label), to compare sets of samples."""
    return {x.tobytes() + int(y).to_bytes(8, "little") for x, y in zip(part.x, part.y, strict=True)}


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    for role, who in (("test", None), ("pooled", None), ("train", client(2))):
        first, again = data(role, who), data(role, who)
        assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
        other = data(role, who, seed=6)
        assert first.x.shape != other.x.shape or not np.array_equal(first.x, other.x)


def test_clients_parts_are_disjoint_and_together_the_pooled_set():
    replicas = {0: 2, 3: 3}  # some tenants split across replicas
    parts = [
        data("train", client(t, r, replicas.get(t, 1)))
        for t in range(TENANTS)
        for r in range(replicas.get(t, 1))
    ]
    pooled = data("pooled")
    assert sum(len(p) for p in parts) == len(pooled)
    joined = ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    assert np.array_equal(joined.x, pooled.x) and np.array_equal(joined.y, pooled.y)
    seen: set[bytes] = set()
    for part in parts:
        mine = rows(part)
        assert len(mine) == len(part) and not seen & mine
        seen |= mine
    # The held-out set shares no sample with the training data.
    assert not rows(data("test")) & seen


def label_skew(scheme: str) -> float:
    """Mean total-variation distance of the tenants' label mix from the overall one."""
    base = synthetic.base_data(5, **SIZES)
    overall = np.bincount(base.y, minlength=SIZES["classes"]) / len(base.y)
    parts = synthetic.tenant_parts(base, TENANTS, 5, scheme, alpha=0.1, test_fraction=0.2)
    distances = []
    for part in parts:
        mix = np.bincount(part.train.y, minlength=SIZES["classes"]) / len(part.train)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_alpha_0_1_skews_the_labels_of_every_tenant():
    # Each tenant's label mix is far from the overall one under Dirichlet
    # alpha = 0.1 (about 0.6 here), and close to it under an IID split.
    assert label_skew("dirichlet") > 0.4
    assert label_skew("iid") < 0.15
    # make_data passes the manifest's partition on: one tenant, mostly few classes.
    labels = data("train", client(0)).y
    counts = np.sort(np.bincount(labels, minlength=SIZES["classes"]))[::-1]
    assert counts[:3].sum() / counts.sum() > 0.6


def test_every_tenant_sees_its_own_shifted_view_and_the_test_set_covers_all_of_them():
    seed = 5
    base = synthetic.base_data(seed, **SIZES)
    parts = synthetic.tenant_parts(base, TENANTS, seed, "dirichlet", 0.1, 0.2)
    test = data("test", seed=seed)
    assert len(test) == sum(len(part.test) for part in parts)
    offset = 0
    for index, part in enumerate(parts):
        assert len(part.test) >= 1
        mixing, bias = synthetic.tenant_transform(seed, index, SIZES["features"], 0.5, 0.5)
        expected = base.x[part.test_index] @ mixing + bias
        chunk = test.x[offset : offset + len(part.test)]
        np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-5)
        offset += len(part.test)
        # Each tenant's held-out rows are a share of its own samples, not others'.
        assert not set(part.test_index) & set(part.train_index)
    transforms = [
        synthetic.tenant_transform(seed, i, SIZES["features"], 0.5, 0.5) for i in range(3)
    ]
    assert not np.allclose(transforms[0][0], transforms[1][0])
    assert not np.allclose(transforms[1][1], transforms[2][1])


def test_the_held_out_share_of_every_tenant_is_about_test_fraction():
    base = synthetic.base_data(5, **SIZES)
    parts = synthetic.tenant_parts(base, TENANTS, 5, "dirichlet", 0.1, 0.2)
    for part in parts:
        total = len(part.test) + len(part.train)
        assert abs(len(part.test) - 0.2 * total) <= 1


def test_the_npz_path_replaces_the_generated_rows(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=400)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    pooled = synthetic.make_data(context("pooled", tenants=3), path=str(path))
    test = synthetic.make_data(context("test", tenants=3), path=str(path))
    assert len(pooled) + len(test) == 400
    assert pooled.x.shape[1] == 6 and set(np.unique(pooled.y)) <= {0, 1, 2, 3}
    assert pooled.x.dtype == np.float32 and pooled.y.dtype == np.int64
    mine = synthetic.make_data(
        context("train", Client("t1-0", "t1", "eu", 0, 1, 1, 3), tenants=3), path=str(path)
    )
    assert 0 < len(mine) < len(pooled)


def test_an_npz_without_x_and_y_is_refused_by_name(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="expected arrays 'x' and 'y'"):
        synthetic.make_data(context("test", tenants=2), path=str(path))


def test_the_model_maps_features_to_class_logits():
    import torch

    model = synthetic.make_model(features=16, classes=10, hidden=32, layers=3)
    assert model(torch.zeros(5, 16)).shape == (5, 10)
