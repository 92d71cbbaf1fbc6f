"""Tasks of a user's own that tests name in ``spec.task`` (importable as ``tests.tasks``)."""

from __future__ import annotations

from torch import nn
from torch.utils.data import TensorDataset

from fedkube.examples.digits_task import DigitsTask
from fedkube.task import Result, TaskContext

FAILING_TENANT = "b"
FAILING_ROUND = 2


class ScannerOffline(DigitsTask):
    """The digits task, whose loop raises at one tenant in one round (a user's bug)."""

    def train(self, model: nn.Module, data: TensorDataset, ctx: TaskContext) -> Result:
        if ctx.tenant == FAILING_TENANT and ctx.round == FAILING_ROUND:
            raise RuntimeError(f"scanner of {ctx.tenant} is offline")
        return super().train(model, data, ctx)


class ScannersOffline(DigitsTask):
    """The digits task, whose loop raises at every tenant but ``a`` in one round."""

    def train(self, model: nn.Module, data: TensorDataset, ctx: TaskContext) -> Result:
        if ctx.tenant != "a" and ctx.round == FAILING_ROUND:
            raise RuntimeError(f"scanner of {ctx.tenant} is offline")
        return super().train(model, data, ctx)


BLIND_TENANT = "c"


class BlindSite(DigitsTask):
    """The digits task, whose evaluate() raises at one tenant: its validation scans are gone."""

    def evaluate(self, model: nn.Module, data: TensorDataset, ctx: TaskContext) -> Result:
        if ctx.tenant == BLIND_TENANT:
            raise FileNotFoundError(f"/data/{ctx.tenant}/validation: no such directory")
        return super().evaluate(model, data, ctx)
