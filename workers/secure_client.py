"""The client side of secure aggregation (:mod:`fedkube.wire.secagg`), through the worker's link.

Under ``spec.privacy.secureAggregation`` a trained client keeps its update
and runs the protocol instead of sending it: (1) fresh keys with its weight,
(2) its secrets' shares for its neighbours, (3) its update masked, the only
form in which it leaves, and (4) the shares that let the combiner remove
the masks of the round's survivors and dropouts. Step 1 follows training;
steps 2 to 4 are tasks the combiner hands out in its poll answers. A client
that loses its session (a restart) or fails a step leaves the round's
secure aggregation, and the combiner counts it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fedkube.errors import FedkubeError, SecureAggregationFailed
from fedkube.service import faults
from fedkube.spec import FederatedJob
from fedkube.training import privacy
from fedkube.training.strategy_client import CLIENT_STRATEGIES
from fedkube.wire import codec, masking, secagg, signing
from fedkube.wire.protocol import Envelope
from fedkube.workers.link import CombinerLink
from fedkube.workers.pipeline import Outgoing, sign
from fedkube.workers.seat import Identity, Seat

log = logging.getLogger("fedkube.worker")

# The tasks of secure aggregation's steps 2 to 4 (see fedkube.wire.secagg).
SECURE_STEPS = ("share", "mask", "unmask")

# Sends an update through the worker (kept state saved once it is accepted);
# False when it must be sent again.
Deliver = Callable[[Seat, Outgoing, int], Awaitable[bool]]


class SecureClient:
    """Secure aggregation's steps for the clients a worker hosts."""

    def __init__(
        self,
        job: FederatedJob,
        identity: Identity,
        seats: Mapping[str, Seat],
        link: CombinerLink,
        signing_key: signing.SigningKey,
        deliver: Deliver,
        in_flight: int,
    ):
        secure = job.spec.privacy.secure_aggregation
        if secure is None:
            raise FedkubeError("the job does not use secure aggregation")
        self.secure = secure
        self.job = job
        self.identity = identity
        self.seats = seats
        self.link = link
        self.signing_key = signing_key
        self.deliver = deliver
        self.in_flight = in_flight
        self.strategy = CLIENT_STRATEGIES[job.spec.strategy.name]

    async def advertise(self, seat: Seat, outgoing: Outgoing) -> bool:
        """Step 1: join the round with fresh keys and the update's weight (it stays here).

        False when the combiner could not record it (503): the next poll
        hands the round out again.
        """
        session = secagg.ClientSession(self.job.name, outgoing.round, seat.client.id)
        document = {
            "client": seat.client.id,
            "round": outgoing.round,
            "weight": outgoing.weight,
            "steps": outgoing.update.steps,
            **session.advertisement(),
        }
        answer = await self.link.post_secagg("keys", seat.client.id, outgoing.round, document)
        if answer is None:
            return False
        if answer:
            seat.secure = session
        return True

    async def steps(self, tasks: list[dict[str, Any]]) -> None:
        """Steps 2 to 4 for each client that has one: shares, masked update, unmasking.

        A few clients at once (as updates are sent in the clear): one client's
        update is masked while another's is on the wire. A transport error
        is raised once every client's step has ended; the combiner hands the
        steps that did not arrive out again.
        """
        in_flight = asyncio.Semaphore(self.in_flight)

        async def one(task: dict[str, Any]) -> None:
            async with in_flight:
                await self._step(task)

        results = await asyncio.gather(*(one(t) for t in tasks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _step(self, task: dict[str, Any]) -> None:
        seat = self.seats.get(str(task.get("client", "")))
        number = int(task.get("round", 0))
        session = seat.secure if seat is not None else None
        if seat is None or session is None or session.round != number:
            return  # keys lost with a restart: the combiner counts this client dropped
        client = seat.client.id
        try:
            if task["status"] == "share":
                loop = asyncio.get_running_loop()
                sealed = await loop.run_in_executor(None, session.share, task)
                document = {"client": client, "round": number, "shares": sealed}
                await self.link.post_secagg("shares", client, number, document)
                faults.reached(f"worker.{client}.shared", number)
            elif task["status"] == "mask":
                await self._send_masked(seat, session, task)
            else:
                shares = session.unmask(task)
                document = {"client": client, "round": number, "shares": shares}
                await self.link.post_secagg("unmask", client, number, document)
        except SecureAggregationFailed as exc:
            log.error(
                "leaving the round's secure aggregation: %s",
                exc,
                extra=self.identity.log(number, client),
            )
            seat.secure = None

    async def _send_masked(
        self, seat: Seat, session: secagg.ClientSession, task: dict[str, Any]
    ) -> None:
        """Step 3: the kept update, pre-scaled as the combiner folds it, masked and sent."""
        outgoing = seat.outgoing
        if outgoing is None or outgoing.round != session.round:
            raise SecureAggregationFailed("the round's update is gone")
        delta = outgoing.update.delta
        counted = privacy.counted_weight(self.job.spec.privacy.dp, outgoing.weight)
        ratio = self.strategy.fold_scale(counted, outgoing.update.steps)
        clip_range = self.secure.clip_range
        loop = asyncio.get_running_loop()

        def masked() -> codec.Encoded:
            flat = masking.flatten(delta)
            values = session.mask(task, flat, ratio / session.weight_total, clip_range)
            tensors = masking.unflatten(values, {name: d.shape for name, d in delta.items()})
            envelope = Envelope(
                self.job.name, session.round, seat.client.id, seat.client.tenant, outgoing.weight
            )
            return codec.encode_parts(tensors, {**envelope.metadata("masked")})

        body = await loop.run_in_executor(None, masked)
        signature = await sign(self.signing_key, self.job.name, body, session.round, seat.client.id)
        wire = Outgoing(
            session.round, body, outgoing.update, outgoing.weight, outgoing.train_s, signature
        )
        if await self.deliver(seat, wire, session.round) and wire.accepted:
            outgoing.accepted = True
