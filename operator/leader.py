"""Leader election on a ``coordination.k8s.io/v1`` Lease, as controller-runtime does it.

Several operator replicas (a rolling update, or ``replicas: 2`` for a fast
fail-over) must never reconcile the same job at once: two writers would fight
over worker pods and double-count failures. Every replica runs this loop; the
one holding the Lease runs kopf, the others wait. The holder renews every
``retry_period_s``; if it cannot renew for ``renew_deadline_s`` it stops and
exits, so that its successor (which takes the Lease once ``lease_duration_s``
has passed without a renewal) is never running beside it. Kopf's own peering
would do the same but needs two more cluster-scoped CRDs that outlive the chart.

``decide`` is the pure part: what a replica does with the Lease it read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fedkube.errors import FedkubeError

log = logging.getLogger("fedkube.operator.leader")


class LeadershipLost(FedkubeError):
    """The Lease could not be renewed in time, or another replica took it."""


class Action(Enum):
    create = "create"  # no Lease yet
    acquire = "acquire"  # the holder let it expire (or released it)
    renew = "renew"  # ours
    wait = "wait"  # someone else's, still valid


@dataclass(frozen=True)
class Election:
    """Which Lease, who we are, and the timings (seconds)."""

    namespace: str
    name: str
    identity: str
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "leader election: need retry period < renew deadline < lease duration, got "
                f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s}"
            )


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def decide(lease: Mapping[str, Any] | None, identity: str, now: datetime) -> Action:
    """What to do with the Lease as read (``None``: it does not exist)."""
    if lease is None:
        return Action.create
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return Action.renew
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = float(spec.get("leaseDurationSeconds") or 0)
    if not holder or renewed is None or now >= renewed + timedelta(seconds=duration):
        return Action.acquire
    return Action.wait


def build_lease_spec(
    election: Election, now: datetime, previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Lease spec this replica writes when it creates, takes or renews the Lease."""
    spec = dict((previous or {}).get("spec") or {})
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    taking = spec.get("holderIdentity") != election.identity
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "holderIdentity": election.identity,
        "leaseDurationSeconds": max(1, round(election.lease_duration_s)),
        "acquireTime": stamp if taking else spec.get("acquireTime", stamp),
        "renewTime": stamp,
        "leaseTransitions": transitions + 1 if taking and previous is not None else transitions,
    }


class LeaderElector:
    """Acquire, then hold, one Lease through the Kubernetes API."""

    def __init__(self, api: k8s.ApiClient, election: Election):
        self.api = k8s.CoordinationV1Api(api)
        self.election = election
        self.seen_holder = ""  # who held the Lease when it was last read

    def _read(self) -> dict[str, Any] | None:
        try:
            lease = self.api.read_namespaced_lease(self.election.name, self.election.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self.api.api_client.sanitize_for_serialization(lease)
        return result

    def try_once(self) -> bool:
        """One round of the protocol: True when this replica holds the Lease afterwards.

        Writes carry the resourceVersion that was read, so two replicas racing
        for an expired Lease cannot both win: the loser gets 409 Conflict.
        """
        e = self.election
        now = datetime.now(timezone.utc)
        lease = self._read()
        self.seen_holder = str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")
        action = decide(lease, e.identity, now)
        if action is Action.wait:
            return False
        # A plain dict: the client serialises it as it is (its stubs want V1Lease).
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": e.name, "namespace": e.namespace},
            "spec": build_lease_spec(e, now, lease),
        }
        try:
            if lease is None:
                self.api.create_namespaced_lease(e.namespace, body)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                self.api.replace_namespaced_lease(e.name, e.namespace, body)
        except ApiException as exc:
            if exc.status in (409, 422):  # someone else wrote first
                return False
            raise
        if action is not Action.renew:
            log.info("became the leader (Lease %s/%s)", e.namespace, e.name)
        return True

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        waiting_logged = False
        while not await asyncio.to_thread(self._attempt):
            if not waiting_logged:
                log.info(
                    "waiting for the Lease %s/%s held by another replica",
                    self.election.namespace,
                    self.election.name,
                )
                waiting_logged = True
            await asyncio.sleep(self.election.retry_period_s)

    def _attempt(self) -> bool:
        try:
            return self.try_once()
        except (ApiException, OSError) as exc:
            log.warning("leader election: %s", exc)
            return False

    async def hold(self) -> None:
        """Renew until another replica holds the Lease, or renewal fails for
        ``renew_deadline_s``; then raise LeadershipLost."""
        loop = asyncio.get_running_loop()
        last_renewed = loop.time()
        while True:
            await asyncio.sleep(self.election.retry_period_s)
            if await asyncio.to_thread(self._attempt):
                last_renewed = loop.time()
            elif self.seen_holder not in ("", self.election.identity):
                raise LeadershipLost(
                    f"the Lease {self.election.namespace}/{self.election.name} "
                    f"is held by {self.seen_holder} now"
                )
            elif loop.time() - last_renewed >= self.election.renew_deadline_s:
                raise LeadershipLost(
                    f"could not renew the Lease {self.election.namespace}/"
                    f"{self.election.name} for {self.election.renew_deadline_s:g}s"
                )

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a successor need not wait for it to expire."""
        try:
            lease = self._read()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != (
                self.election.identity
            ):
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            body: Any = lease  # a plain dict, serialised as it is
            self.api.replace_namespaced_lease(self.election.name, self.election.namespace, body)
        except (ApiException, OSError) as exc:
            log.warning("could not release the Lease: %s", exc)
