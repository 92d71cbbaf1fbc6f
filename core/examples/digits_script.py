"""A plain PyTorch training script over image files, made a fedkube client by six lines.

Its own ``Dataset`` reads the PNG files of one site
(:mod:`fedkube.examples.digit_files` writes them), its own ``DataLoader``
and SGD loop train the model of ``fedkube.examples.digits:make_model``.
The lines marked ``# fedkube`` are the whole change (README, "Bring your
own training code"); without a worker around it, ``python -m
fedkube.examples.digits_script --data DIR`` trains once, as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib import image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fedkube.client as fl  # fedkube
from fedkube.examples import digit_files
from fedkube.examples.digits import make_model


class DigitImages(Dataset[tuple[torch.Tensor, int]]):
    """``root/<label>/<n>.png``: 8x8 grey images, the label in the folder's name."""

    def __init__(self, root: Path):
        self.files = sorted(Path(root).glob("*/*.png"))
        if not self.files:
            raise FileNotFoundError(f"no images under {root}/<label>/*.png")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        pixels = image.imread(path)[..., 0]  # a grey PNG reads as RGBA
        return torch.as_tensor(pixels.reshape(-1), dtype=torch.float32), int(path.parent.name)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total, seen = 0.0, 0
    for _epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    return total / seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the digits classifier on PNG files")
    parser.add_argument("--data", type=Path, default=Path("digits/site-a"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="under fedkube: first write this site's partition as PNG files, if none are there",
    )
    args = parser.parse_args(argv)

    site = fl.init()  # fedkube
    root = Path(site.data_kwargs.get("root", site.scratch)) if site else args.data  # fedkube
    if args.prepare and site is not None and not any(root.glob("*/*.png")):
        assert site.client is not None
        digit_files.write_site(site.job, site.client, root)  # the example's data preparation
    dataset = DigitImages(root)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = make_model(hidden=args.hidden)
    while fl.running():  # fedkube
        fl.receive(model)  # fedkube
        loss = train(model, loader, args.epochs, args.lr)
        fl.send(model, examples=len(dataset), metrics={"loss": loss})  # fedkube


if __name__ == "__main__":
    main()
