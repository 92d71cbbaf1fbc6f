"""The built-in task: a classifier trained with cross-entropy, judged by accuracy.

What a job runs without ``spec.task``: the model from ``spec.model``, the
data from ``spec.data`` (:class:`~fedkube.datasets.ArrayData`, or any
``torch.utils.data.Dataset`` of ``(features, label)`` pairs), ``spec.training``'s
optimizer, epochs and batch size. It is written as any user's task is
(:mod:`fedkube.task`): the strategy's client side reaches it through the
optimizer's step hooks, not through code of its own.

Batches are moved to the device one at a time: a data set larger than the
device's memory trains as well as a small one. ``y`` holds one class per row,
or one per position (a language model's next tokens, with logits shaped
``(rows, classes, positions)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedkube.datasets import ArrayData
from fedkube.task import Result, TaskContext

# Targets per forward pass in evaluate(): a language model's rows hold one
# target per position, so its held-out set is evaluated in slices.
EVAL_TARGETS = 16384
# Rows per forward pass when evaluating a torch Dataset.
EVAL_ROWS = 256


class Classifier:
    """Cross-entropy on integer labels; metrics ``loss`` and ``accuracy``."""

    def train(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        training = ctx.training
        generator = torch.Generator().manual_seed(ctx.seed)
        optimizer = ctx.optimizer(model)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        total, batches = 0.0, 0
        for _ in range(training.epochs):
            for x, y in shuffled_batches(data, training.batch_size, generator, ctx.device):
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
        return Result(examples=len(data), metrics={"loss": total / max(batches, 1)})

    def evaluate(self, model: nn.Module, data: Any, ctx: TaskContext) -> Result:
        """Mean cross-entropy and accuracy over every target."""
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in ordered_batches(data, ctx.device):
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum().item())
            count += y.numel()
        metrics = {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}
        return Result(examples=len(data), metrics=metrics)


def shuffled_batches(
    data: Any, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` batches in a random order drawn from ``generator``, on ``device``.

    The order is a ``DataLoader``'s with ``shuffle=True`` and the same
    generator, so a user's loop written that way sees the very batches the
    built-in loop does. Arrays are indexed a batch at a time, not a row.
    """
    if isinstance(data, ArrayData):
        loader: DataLoader[Any] = DataLoader(
            _Rows(data), batch_size, shuffle=True, generator=generator, collate_fn=_as_is
        )
    else:
        loader = DataLoader(_dataset(data), batch_size, shuffle=True, generator=generator)
    for x, y in loader:
        yield x.to(device, torch.float32), y.to(device, torch.long)


class _Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``ArrayData`` as a map-style dataset that a ``DataLoader`` reads a batch at a time."""

    def __init__(self, data: ArrayData):
        self.x, self.y = _tensors(data)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices)
        return self.x[rows], self.y[rows]


def _as_is(batch: Any) -> Any:
    """The batch ``_Rows.__getitems__`` made: already tensors, nothing to collate."""
    return batch


def ordered_batches(data: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` slices of about :data:`EVAL_TARGETS` targets, in order, on ``device``."""
    if isinstance(data, ArrayData):
        x, y = _tensors(data)
        per_row = max(1, int(np.prod(y.shape[1:])))
        rows = max(1, EVAL_TARGETS // per_row)
        for first in range(0, len(y), rows):
            yield x[first : first + rows].to(device), y[first : first + rows].to(device)
        return
    for x, y in DataLoader(_dataset(data), batch_size=EVAL_ROWS):
        yield x.to(device, torch.float32), y.to(device, torch.long)


def _tensors(data: ArrayData) -> tuple[torch.Tensor, torch.Tensor]:
    """The arrays as CPU tensors (no copy when they already are float32 / int64)."""
    return (
        torch.as_tensor(data.x, dtype=torch.float32),
        torch.as_tensor(data.y, dtype=torch.long),
    )


def _dataset(data: Any) -> Dataset[Any]:
    if not isinstance(data, Dataset):
        raise TypeError(
            f"the built-in classifier trains on ArrayData or a torch Dataset, "
            f"not {type(data).__name__}: give spec.task a task of your own for other data"
        )
    return data
