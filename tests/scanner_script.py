"""A Client API script with a bug: it raises at tenant ``b`` in round 2 (for tests)."""

from __future__ import annotations

import torch
from torch import nn

import fedkube.client as fl
from fedkube.examples import digits
from fedkube.training.learning import data_context

site = fl.init()
assert site is not None and site.client is not None, "run by a fedkube worker"
data = digits.make_data(data_context(site.job, "train", site.client))
x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
model = digits.make_model(hidden=16)
optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
while fl.running():
    info = fl.receive(model)
    assert info is not None
    if info.ctx.tenant == "b" and info.number == 2:
        raise RuntimeError("scanner of b is offline")
    for _step in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    fl.send(model, examples=len(y), metrics={"loss": loss.item()})
