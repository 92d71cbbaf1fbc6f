"""The chest X-ray-like example: its files on disk, its dataset, its AUROC."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fedkube.examples import chest


def test_every_site_has_its_own_scanner_case_mix_and_size():
    # prepare / execute
    hospitals = chest.sites(6, seed=0)
    # assert: six sizes from 600 down to 150, two at half resolution, skewed prevalences
    assert [h.sizes[0] for h in hospitals] == [600, 510, 420, 330, 240, 150]
    assert [h.downsample for h in hospitals] == [1, 1, 2, 1, 1, 2]
    assert len({h.contrast for h in hospitals}) == 6
    prevalence = np.array([h.prevalence for h in hospitals])
    assert (prevalence.max(axis=0) / prevalence.min(axis=0) > 2).all(), prevalence
    assert chest.sites(6, seed=0) == hospitals  # a pure function of the seed


def test_prepare_writes_pngs_with_their_labels_once(tmp_path):
    # execute
    root = chest.prepare(tmp_path / "chest", count=2, seed=3, scale=0.05)
    stamp = (root / "h1" / "train" / "labels.csv").stat().st_mtime_ns
    chest.prepare(root, count=2, seed=3, scale=0.05)
    # assert
    with (root / "h1" / "train" / "labels.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["file", *chest.FINDINGS] and len(rows) == 1 + 30
    assert all((root / "h1" / "train" / row[0]).is_file() for row in rows[1:])
    assert sorted(p.name for p in (root / "h2").iterdir()) == ["test", "train", "validation"]
    assert (root / "h1" / "train" / "labels.csv").stat().st_mtime_ns == stamp  # not rewritten


def test_a_sites_files_load_lazily_as_centred_tensors_and_replicas_share_them(tmp_path):
    root = chest.prepare(tmp_path / "chest", count=1, seed=3, scale=0.05)
    whole = chest.ImageFiles(root / "h1" / "train")
    image, labels = whole[0]
    assert image.shape == (1, chest.SIZE, chest.SIZE) and image.dtype == torch.float32
    assert labels.shape == (len(chest.FINDINGS),)
    assert -3 < float(image.mean()) < 3
    halves = [chest.ImageFiles(root / "h1" / "train", part, 2) for part in (0, 1)]
    assert sorted(halves[0].files + halves[1].files) == sorted(whole.files)


def test_a_finding_shows_in_the_image():
    # prepare: the same anatomy and noise, with and without an enlarged heart
    site = chest.sites(1)[0]
    without = chest.render([0, 0, 0, 0, 0], site, np.random.default_rng(5)).astype(float)
    with_it = chest.render([0, 0, 1, 0, 0], site, np.random.default_rng(5)).astype(float)
    # assert: brighter where the heart widened, and nowhere else by much
    assert (with_it - without).sum() > 500


def test_mean_auroc_averages_the_findings_that_have_both_classes():
    labels = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    scores = np.array(
        [
            [0.9, 0.2, 0.5, 0.1, 0],
            [0.1, 0.8, 0.5, 0.2, 0],
            [0.8, 0.3, 0.5, 0.9, 0],
            [0.2, 0.4, 0.5, 0.3, 0],
        ]
    )
    metrics = chest.mean_auroc(scores, labels)
    assert metrics["auroc_opacity"] == 1.0 and metrics["auroc_nodule"] == 1.0
    assert metrics["auroc_effusion"] == pytest.approx(0.75)  # 3 of its 4 pairs in order
    assert "auroc_cardiomegaly" not in metrics and "auroc_device" not in metrics
    assert metrics["auroc"] == pytest.approx(2.75 / 3)
