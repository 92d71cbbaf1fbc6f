"""What every part of a worker shares: the clients it hosts, and who it is in logs and metrics.

A :class:`Seat` is one hosted client with its durable state and what it
holds between polls (its update until the round closes, its secure
aggregation session). :class:`Identity` names the worker the same way in
every log line, metric label and refusal message, whichever part (the
poll loop, the link, the secure aggregation client) writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedkube.service.logs import fields
from fedkube.spec import Client
from fedkube.wire import secagg
from fedkube.workers.client_state import ClientState
from fedkube.workers.pipeline import Outgoing

TIER = "worker"


@dataclass
class Seat:
    """One client that this process hosts: its identity, state and last update."""

    client: Client
    state: ClientState
    outgoing: Outgoing | None = None
    # Loaded to train; kept between rounds only by a worker with one client.
    data: Any = None  # whatever the task's data() (or spec.data) gave
    validation: Any = None  # its role validation, loaded when first asked to evaluate
    # Under secure aggregation: this round's keys, seed and received shares.
    secure: secagg.ClientSession | None = None
    failed_round: int | None = None  # the round whose task failed (not run again)


@dataclass(frozen=True)
class Identity:
    """The worker's job, tenant, region and name; ``single`` when it hosts one client."""

    job: str
    tenant: str
    region: str
    name: str
    clients: int

    @property
    def single(self) -> bool:
        return self.clients == 1

    def describe(self) -> str:
        if self.single:
            return f"client {self.name}"
        return f"worker {self.name} ({self.clients} clients)"

    def log(self, number: int | None = None, client: str | None = None) -> dict[str, object]:
        """The structured fields of a log line (``extra=``) about round ``number``."""
        return fields(
            job=self.job,
            round=number,
            tenant=self.tenant,
            client=client or (self.name if self.single else None),
            worker=None if self.single else self.name,
        )

    def labels(self) -> tuple[str, str, str]:
        """Labels of the worker's own metrics (rounds, training time, task failures)."""
        return self.job, self.region, self.tenant

    def byte_labels(self) -> tuple[str, str, str, str]:
        """Labels of the bytes it moves (``bytes_up``, ``bytes_down``)."""
        return self.job, TIER, self.region, self.tenant
