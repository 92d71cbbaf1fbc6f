"""Chest X-ray-like findings at six hospitals: multi-label images on disk, judged by mean AUROC.

In the spirit of the CheXpert table: every image may show several findings
at once (:data:`FINDINGS`, from common to rare), and a model is judged by the
area under the ROC curve of each finding, averaged. Nothing is downloaded:
:func:`prepare` draws grey-scale 32x32 "radiographs" (a gradient, two darker
lung fields, a heart shadow) and paints each finding in: a diffuse opacity in
a lung, fluid at a lung's base, an enlarged heart, a small nodule, a line of
a device. Each hospital differs the way real sites do:

- **acquisition**: its scanner's contrast, brightness, noise and resolution
  (a site at half resolution loses the small nodules' detail);
- **case mix**: each finding's prevalence is the base rate times a factor of
  the site's own (label skew), so a site alone sees few of some findings;
- **size**: from 600 training images down to 150.

:func:`prepare` writes, per hospital, ``<root>/<site>/{train,validation,test}/``
with one PNG per image and a ``labels.csv`` (``file`` then one 0/1 column per
finding): the layout a hospital's own export would have. :class:`ChestTask`
is the job's task (:mod:`fedkube.task`): a small CNN trained with
binary cross-entropy on a ``Dataset`` that reads the PNGs lazily (nothing
holds a site's images in memory), evaluated by per-finding AUROC. Role
``train`` and ``validation`` read the client's own site; role ``test`` (the
global tier's held-out set) and ``pooled`` (the centralised baseline) read
every site's.

``python -m fedkube.examples.chest --prepare DIR`` writes the files; the task
prepares them itself under its ``root`` when they are missing (under a file
lock, once, whichever process comes first).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedkube.task import Result, TaskContext

FINDINGS = ("opacity", "effusion", "cardiomegaly", "nodule", "device")
PREVALENCE = (0.30, 0.22, 0.15, 0.10, 0.08)
SIZE = 32
SPLITS = ("train", "validation", "test")
MEAN, STD = 0.45, 0.2  # of the pixels over every site, to centre the inputs
DEFAULT_ROOT = Path(os.environ.get("FEDKUBE_DATA", Path.home() / ".cache" / "fedkube")) / "chest"
COMPLETE = ".complete"


@dataclass(frozen=True)
class Site:
    """One hospital: its scanner and its case mix."""

    name: str
    contrast: float
    brightness: float
    noise: float
    downsample: int  # 1: full resolution; 2: half
    prevalence: tuple[float, ...]
    sizes: tuple[int, int, int]  # train, validation, test images


def sites(count: int = 6, seed: int = 0, scale: float = 1.0) -> list[Site]:
    """``count`` hospitals ``h1``.., each with its own acquisition and case mix (seeded).

    ``scale`` multiplies every split's size (a quick run, a test).
    """
    rng = np.random.default_rng([seed, 1])
    train_sizes = np.linspace(600 * scale, 150 * scale, count).round().astype(int)
    held_out = max(10, round(100 * scale))
    hospitals = []
    for index in range(count):
        skew = np.exp(rng.normal(0.0, 0.7, len(FINDINGS)))
        prevalence = tuple(
            float(np.clip(p * s, 0.02, 0.6)) for p, s in zip(PREVALENCE, skew, strict=True)
        )
        hospitals.append(
            Site(
                name=f"h{index + 1}",
                contrast=float(rng.uniform(0.6, 1.4)),
                brightness=float(rng.uniform(-0.08, 0.08)),
                noise=float(rng.uniform(0.02, 0.09)),
                downsample=2 if index % 3 == 2 else 1,
                prevalence=prevalence,
                sizes=(int(train_sizes[index]), held_out, held_out),
            )
        )
    return hospitals


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _blob(y: np.ndarray, x: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def render(labels: Sequence[int], site: Site, rng: np.random.Generator) -> np.ndarray:
    """One image (uint8, SIZE x SIZE) showing the findings ``labels`` marks, as ``site`` sees it."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = 0.45 + 0.15 * y
    lungs = []
    for side in (0.3, 0.7):
        cy, cx = 0.45 + rng.uniform(-0.03, 0.03), side + rng.uniform(-0.03, 0.03)
        ry, rx = 0.3 * rng.uniform(0.9, 1.1), 0.16 * rng.uniform(0.9, 1.1)
        lungs.append((cy, cx, ry, rx))
        image = image - 0.2 * _ellipse(y, x, cy, cx, ry, rx)
    opacity, effusion, cardiomegaly, nodule, device = (bool(v) for v in labels)
    heart = rng.uniform(0.17, 0.21) if cardiomegaly else rng.uniform(0.09, 0.13)
    image = image + 0.2 * _ellipse(y, x, 0.62, 0.5, 0.12, heart)
    if opacity:
        cy, cx, ry, rx = lungs[rng.integers(2)]
        centre = (cy + rng.uniform(-0.4, 0.4) * ry, cx + rng.uniform(-0.4, 0.4) * rx)
        image = image + rng.uniform(0.15, 0.25) * _blob(y, x, *centre, rng.uniform(0.07, 0.11))
    if effusion:
        cy, cx, ry, rx = lungs[rng.integers(2)]
        base = _ellipse(y, x, cy, cx, ry, rx) & (y > cy + rng.uniform(0.35, 0.55) * ry)
        image = image + rng.uniform(0.15, 0.25) * base
    if nodule:
        cy, cx, ry, rx = lungs[rng.integers(2)]
        angle, radius = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.7)
        centre = (cy + radius * ry * math.sin(angle), cx + radius * rx * math.cos(angle))
        image = image + rng.uniform(0.25, 0.35) * _blob(y, x, *centre, rng.uniform(0.02, 0.03))
    if device:
        top, bottom = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
        for row in range(int(0.05 * SIZE), int(rng.uniform(0.55, 0.75) * SIZE)):
            column = int(round((top + (bottom - top) * row / SIZE) * SIZE))
            image[row, column] += rng.uniform(0.25, 0.35)
    image = (image - 0.4) * site.contrast + 0.4 + site.brightness
    if site.downsample > 1:
        k = site.downsample
        coarse = image.reshape(SIZE // k, k, SIZE // k, k).mean(axis=(1, 3))
        image = np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)
    image = image + rng.normal(0.0, site.noise, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_site(site: Site, folder: Path, seed: int) -> None:
    """``site``'s three splits as PNG files and ``labels.csv`` files under ``folder``."""
    for split_index, (split, count) in enumerate(zip(SPLITS, site.sizes, strict=True)):
        rng = np.random.default_rng([seed, int(site.name[1:]), split_index])
        target = folder / split
        target.mkdir(parents=True, exist_ok=True)
        with (target / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", *FINDINGS])
            for row in range(count):
                labels = [int(rng.random() < p) for p in site.prevalence]
                name = f"{row:05d}.png"
                Image.fromarray(render(labels, site, rng)).save(target / name)
                writer.writerow([name, *labels])


def prepare(root: Path, count: int = 6, seed: int = 0, scale: float = 1.0) -> Path:
    """Every hospital's files under ``root`` (once: a marker says they are complete)."""
    root.mkdir(parents=True, exist_ok=True)
    marker, made = root / COMPLETE, f"{count} {seed} {scale}"
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent workers: one writes, the others wait
        if marker.exists() and marker.read_text() == made:
            return root
        marker.unlink(missing_ok=True)
        for site in sites(count, seed, scale):
            shutil.rmtree(root / site.name, ignore_errors=True)
            write_site(site, root / site.name, seed)
        marker.write_text(made)
    return root


class ImageFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The PNGs listed in a folder's ``labels.csv``, read one at a time (never all in memory)."""

    def __init__(self, folder: Path, part: int = 0, parts: int = 1):
        self.folder = folder
        with (folder / "labels.csv").open(newline="") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        if tuple(header[1:]) != FINDINGS:
            raise ValueError(f"{folder / 'labels.csv'}: columns {header[1:]}, not {FINDINGS}")
        body = body[part::parts]  # a replica's share of its tenant's files
        self.files = [row[0] for row in body]
        self.labels = torch.tensor([[float(v) for v in row[1:]] for row in body])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.folder / self.files[index]) as picture:
            pixels = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
        # Centred and scaled as radiographs usually are (a fixed transform, not the site's).
        pixels = (pixels - MEAN) / STD
        return torch.from_numpy(pixels).unsqueeze(0), self.labels[index]


# A site's images, or several sites' (the global tier's test split, the pooled baseline).
Images = ImageFiles | ConcatDataset[tuple[torch.Tensor, torch.Tensor]]


def make_model(width: int = 16) -> nn.Module:
    """A small CNN: three conv blocks, global pooling, one logit per finding."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, len(FINDINGS)),
    )


def mean_auroc(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC per finding (where the split has both classes) and their mean, ``auroc``."""
    metrics: dict[str, float] = {}
    for index, finding in enumerate(FINDINGS):
        column = labels[:, index]
        if 0 < column.sum() < len(column):
            metrics[f"auroc_{finding}"] = float(roc_auc_score(column, scores[:, index]))
    if metrics:
        metrics["auroc"] = float(np.mean(list(metrics.values())))
    return metrics


class ChestTask:
    """The hospitals' task: build the CNN, read a site's files, train, evaluate by AUROC.

    ``root`` holds every site's folder (the bundled example); a real site
    points its own ``spec.tenants[].data.kwargs.path`` (or its site policy's
    binding) at its export, which then replaces ``<root>/<tenant>``.
    """

    def __init__(
        self,
        root: str | None = None,
        width: int = 16,
        sites: int = 6,
        dataSeed: int = 0,  # noqa: N803
        scale: float = 1.0,
    ):
        self.root = Path(root).expanduser() if root else DEFAULT_ROOT
        self.width = width
        self.sites = sites
        self.data_seed = dataSeed
        self.scale = scale

    def model(self, ctx: TaskContext) -> nn.Module:
        return make_model(self.width)

    def data(self, ctx: TaskContext) -> Images:
        path = ctx.data_kwargs.get("path")
        if path is None:
            prepare(self.root, self.sites, self.data_seed, self.scale)
        if ctx.role in ("test", "pooled"):
            split = "test" if ctx.role == "test" else "train"
            names = [site.name for site in sites(self.sites, self.data_seed, self.scale)]
            return ConcatDataset([ImageFiles(self.root / name / split) for name in names])
        client = ctx.client
        if client is None:
            raise ValueError(f"role {ctx.role!r} needs a client")
        folder = Path(path) if path is not None else self.root / client.tenant
        return ImageFiles(folder / ctx.role, client.replica, client.replicas)

    def train(self, model: nn.Module, data: Images, ctx: TaskContext) -> Result:
        settings = ctx.training
        loader = DataLoader(
            data,
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(ctx.seed),
        )
        optimizer = ctx.optimizer(model)
        model.train()
        total, seen = 0.0, 0
        for _epoch in range(settings.epochs):
            for images, labels in loader:
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(images), labels)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(labels)
                seen += len(labels)
        return Result(examples=len(data), metrics={"loss": total / seen})

    def evaluate(self, model: nn.Module, data: Images, ctx: TaskContext) -> Result:
        model.eval()
        scores, labels, total = [], [], 0.0
        for images, truth in DataLoader(data, batch_size=256):
            logits = model(images.to(ctx.device))
            truth = truth.to(ctx.device)
            total += nn.functional.binary_cross_entropy_with_logits(
                logits, truth, reduction="sum"
            ).item()
            scores.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(truth.cpu().numpy())
        stacked = np.concatenate(labels)
        metrics = mean_auroc(np.concatenate(scores), stacked)
        metrics["loss"] = total / stacked.size
        return Result(examples=len(stacked), metrics=metrics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, required=True, help="folder to write into")
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="of every split's size")
    args = parser.parse_args(argv)
    root = prepare(args.prepare, args.sites, args.seed, args.scale)
    for site in sites(args.sites, args.seed, args.scale):
        shown = ", ".join(f"{f} {p:.0%}" for f, p in zip(FINDINGS, site.prevalence, strict=True))
        print(
            f"{root / site.name}: {site.sizes[0]} train, {site.sizes[1]} validation, "
            f"{site.sizes[2]} test; {shown}"
        )


if __name__ == "__main__":
    main()
