"""The digits example as a user writes it: a task of plain PyTorch (:mod:`fedkube.task`).

``spec.task: {entrypoint: fedkube.examples.digits_task:DigitsTask, kwargs: {hidden: 128}}``
runs the same job as ``examples/digits.yaml`` with a loop of the user's own:
a ``DataLoader`` over a ``TensorDataset``, a ``torch.optim.SGD``, cross-entropy.
Nothing in it knows about FedProx, SCAFFOLD, privacy or compression: the
platform applies them around this loop. With the same seed its models are
the built-in classifier's, to float rounding (tests/unit/test_task_strategies.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkube.examples import digits
from fedkube.task import Result, TaskContext
from fedkube.training.learning import data_context


class DigitsTask:
    """An 8x8 digit classifier; metrics ``loss`` and ``accuracy``."""

    def __init__(self, hidden: int = 64):
        self.hidden = hidden

    def model(self, ctx: TaskContext) -> nn.Module:
        return digits.make_model(self.hidden)

    def data(self, ctx: TaskContext) -> TensorDataset:
        arrays = digits.make_data(data_context(ctx.job, ctx.role, ctx.client))
        return TensorDataset(torch.as_tensor(arrays.x), torch.as_tensor(arrays.y))

    def train(self, model: nn.Module, data: TensorDataset, ctx: TaskContext) -> Result:
        settings = ctx.training
        loader = DataLoader(
            data,
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(ctx.seed),
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
        )
        model.train()
        total, seen = 0.0, 0
        for _epoch in range(settings.epochs):
            for x, y in loader:
                x, y = x.to(ctx.device), y.to(ctx.device)
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                seen += len(y)
        return Result(examples=len(data), metrics={"loss": total / seen})

    def evaluate(self, model: nn.Module, data: TensorDataset, ctx: TaskContext) -> Result:
        model.eval()
        x, y = (t.to(ctx.device) for t in data.tensors)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
        return Result(examples=len(y), metrics={"loss": loss, "accuracy": accuracy})
