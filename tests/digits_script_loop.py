"""``fedkube.examples.digits_task``'s loop as a Client API script (for tests).

The same data, DataLoader order (the round's ``ctx.seed``), optimizer and
loss as the task, so that the two must train the same update.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import fedkube.client as fl
from fedkube.examples.digits_task import DigitsTask

site = fl.init()
assert site is not None, "run by a fedkube worker"
data = DigitsTask().data(site)
model = DigitsTask(hidden=16).model(site)
while fl.running():
    info = fl.receive(model)
    assert info is not None
    settings = info.ctx.training
    loader = DataLoader(
        data,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(info.ctx.seed),
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
    )
    for _epoch in range(settings.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    fl.send(model, examples=len(data))
