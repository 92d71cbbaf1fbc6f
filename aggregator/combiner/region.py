"""The region's view of the job's round: whom it waits for, what it owes, when it flushes.

One :class:`RegionRound` per round the combiner collects for: the region's
selected clients, those folded in, those whose task failed, and those owed
after a restart (reported to an incarnation that died; their workers are
asked to resend). class:`RegionState` holds the current one behind the single
lock that orders every change to it, opens rounds (recovering what an earlier
incarnation left in Redis) and schedules the flush of the partial.

The round's own rules (which task a client gets, whether an update may still
come in) are pure functions here; what differs between the clear and the
secure modes is an :class:`Intake`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from fedkube.aggregator.combiner.accumulators import Accumulator, RegionSum
from fedkube.aggregator.combiner.admission import Sender
from fedkube.aggregator.combiner.secure_region import SecureRegion
from fedkube.errors import UpdateRejected
from fedkube.service.logs import fields
from fedkube.service.longpoll import Changes
from fedkube.service.metrics import Metrics
from fedkube.state.roundstate import RoundInfo, RoundStore
from fedkube.wire.protocol import Reason, RoundState

log = logging.getLogger("fedkube.combiner")

# After a restart, how long a flushed-for round waits for its workers to
# resend what the previous incarnation had folded (at most half the round
# timeout). Workers retry with a backoff capped well below this.
REATTACH_S = 10.0


@dataclass
class RegionRound:
    """What the combiner holds for the round it is collecting."""

    info: RoundInfo
    selected: set[str]  # this region's selected clients
    folded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # their task failed the round (they said so)
    # Reported to an earlier incarnation of this combiner (Redis says so) but
    # not in this one's sum: their workers are asked to send them again.
    owed: set[str] = field(default_factory=set)
    reattach_by: float = 0.0  # time.monotonic() after which a flush stops waiting for them
    accumulator: Accumulator | None = None  # clear mode, from the first update
    secure: SecureRegion | None = None  # secure mode, from the first keys
    flushed: bool = False

    @property
    def number(self) -> int:
        return self.info.round

    def heard_from_all(self) -> bool:
        """Every selected client folded or said its task failed."""
        return self.folded | self.failed >= self.selected

    def waits_for_resends(self, now: float) -> bool:
        return bool(self.owed) and now < self.reattach_by


def task_fields(current: RegionRound) -> dict[str, Any]:
    """What every task of the round says: its number, model version and deadline."""
    return {
        "round": current.info.round,
        "version": current.info.version,
        "deadline": current.info.deadline,
    }


def check_open(current: RegionRound | None, number: int, client: str) -> None:
    """Refuse an update for round ``number`` from ``client`` unless the round takes it now."""
    if current is None or number > current.info.round:
        raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
    if number == current.info.round and client in current.folded:
        # A retry of an accepted update (its answer was lost): harmless, and
        # said so even after the region flushed.
        raise UpdateRejected(Reason.duplicate.value, f"{client} already reported", 409)
    # A resend of what a dead incarnation had accepted still counts after
    # the global tier asked for the flush: it was in before the deadline.
    collecting = current.info.state == RoundState.collecting or client in current.owed
    if number < current.info.round or current.flushed or not collecting:
        raise UpdateRejected(Reason.late.value, f"round {number} no longer collects", 410)
    if client not in current.selected:
        raise UpdateRejected(
            Reason.not_selected.value, f"{client} was not selected for round {number}", 403
        )


class Intake(Protocol):
    """How a mode (clear or secure) takes its clients' contributions and makes the partial."""

    # Whether the region may flush as soon as every selected client folded or
    # failed (clear), or only when its protocol says so (secure).
    closes_on_failures: bool

    def tasks_for(
        self, current: RegionRound, clients: set[str], after: int
    ) -> list[dict[str, Any]]:
        """The tasks ``clients`` have in this round (none: an empty list)."""

    def check_open(self, current: RegionRound | None, sender: Sender) -> None:
        """Refuse an update whose round does not take it, before its body is read."""

    async def accept(
        self, sender: Sender, current: RegionRound, body: memoryview
    ) -> dict[str, object]:
        """Decode, check and take an update whose request and signature passed."""

    async def on_sync(self, current: RegionRound) -> None:
        """The round's state in Redis was read again: flush if it is time."""

    async def reduce(self, current: RegionRound) -> RegionSum | None:
        """The region's sum for its partial (under the lock), or None if the region failed."""


class RegionState:
    """The current round of one region, behind the lock every change takes."""

    def __init__(
        self,
        name: str,
        region: str,
        clients: set[str],
        store: RoundStore,
        metrics: Metrics,
        round_timeout_s: float,
    ):
        self.name = name
        self.region = region
        self.clients = clients
        self.store = store
        self.metrics = metrics
        self.round_timeout_s = round_timeout_s
        self.current: RegionRound | None = None
        self.lock = asyncio.Lock()
        self.changes = Changes()
        self._flush: Callable[[RegionRound], Coroutine[Any, Any, None]] | None = None
        self._background: Callable[[Coroutine[Any, Any, None]], None] | None = None
        # Round -> counter deltas not yet in Redis, and the task writing them.
        self._pending: dict[int, Counter[str]] = {}
        self._writer: asyncio.Task[None] | None = None

    def wire(
        self,
        flush: Callable[[RegionRound], Coroutine[Any, Any, None]],
        background: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        """What a flush runs (the uplink) and how it runs in the background."""
        self._flush, self._background = flush, background

    def schedule_flush(self, current: RegionRound) -> None:
        """Send the round's partial once, in the background (an update's answer does not wait)."""
        if current.flushed:
            return
        current.flushed = True
        assert self._flush is not None and self._background is not None
        self._background(self._flush(current))

    async def begin(self, info: RoundInfo, secure: bool) -> RegionRound:
        """Open round ``info`` here: its selected clients, and what a dead incarnation left."""
        async with self.lock:
            previous = self.current
            selected = {c for c in await self.store.selected(info.round) if c in self.clients}
            current = RegionRound(info=info, selected=selected)
            if previous is None or previous.info.round != info.round:
                await self._recover(current, secure)
            self.current = current
        return current

    async def _recover(self, current: RegionRound, secure: bool) -> None:
        """Pick up a round that an earlier incarnation of this combiner collected for.

        Its sum died with it; its reports in Redis say whose updates were in
        that sum. Those workers still hold their updates and are asked for
        them again. If the global tier already has this region's partial,
        there is nothing left to collect.
        """
        number = current.info.round
        if self.region in await self.store.partials(number):
            current.flushed = True
            return
        current.owed = {c for c in await self.store.reported(number) if c in self.clients}
        if current.owed and secure:
            # Their keys died with the incarnation they were sent to. Running the
            # protocol again over the same updates would give a curious combiner
            # two sums over different sets of clients: they count as dropped.
            lost, current.owed = sorted(current.owed), set()
            current.selected -= set(lost)
            await self.store.forget_reports(number, lost)
            log.error(
                "restarted mid-round under secure aggregation: %d clients that sent their "
                "keys before count as dropped (%s)",
                len(lost),
                ", ".join(lost),
                extra=fields(job=self.name, round=number, region=self.region),
            )
            return
        if current.owed:
            window = min(REATTACH_S, self.round_timeout_s / 2)
            current.reattach_by = time.monotonic() + window
            log.warning(
                "restarted mid-round: asking %d clients to resend the updates folded before",
                len(current.owed),
                extra=fields(job=self.name, round=number, region=self.region),
            )

    async def forget_owed(self, current: RegionRound) -> None:
        """Clients that never resent after a restart: not in the sum, so not reported."""
        lost, current.owed = sorted(current.owed), set()
        if not lost:
            return
        log.error(
            "%d updates folded before a restart were not sent again (%s): they count as dropped",
            len(lost),
            ", ".join(lost),
            extra=fields(job=self.name, round=current.info.round, region=self.region),
        )
        try:
            await self.store.forget_reports(current.info.round, lost)
        except RedisError as exc:
            log.warning("reports not forgotten: %s", exc, extra=fields(job=self.name))

    async def count(self, number: int, **deltas: int) -> None:
        """Add to the round's counters, written to Redis in batches.

        Every update and model download counts its bytes; one Redis round trip
        each was a tenth of a 100-client round's event-loop time. Deltas pile
        up here while one write is in flight and go in the next (a group
        commit: no timer, a quiet combiner writes each at once), and
        :meth:`counted` waits for them before the partial goes up, so the
        round's record is exact. They are statistics: a write that fails is
        logged, and a combiner that dies loses at most the deltas of one write.
        """
        self._pending.setdefault(number, Counter()).update(deltas)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_counts())

    async def _write_counts(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            for number, deltas in batch.items():
                try:
                    await self.store.add_counters(number, **deltas)
                except RedisError as exc:
                    log.warning(
                        "round counters not updated: %s",
                        exc,
                        extra=fields(job=self.name, round=number),
                    )

    @property
    def writer(self) -> asyncio.Task[None] | None:
        """The counter write in flight, if any (the combiner waits for it when it stops)."""
        return None if self._writer is None or self._writer.done() else self._writer

    async def counted(self) -> None:
        """Return once every count made so far is in Redis (or its write failed)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
