"""When a round opens, waits, closes or fails: the global tier's decisions, as pure functions.

The round loop (:mod:`.rounds`) reads Redis and sleeps; what it should do
with what it read is decided here, from plain values, so that every rule of
the deadline and the quorum is tested without Redis or a clock:

* before a round opens (:func:`before_opening`): a quorum of the selected
  clients must have registered within ``startTimeoutSeconds``, and clients
  whose site refused the job cannot count towards it;
* while it is open (:func:`decide`, on a :class:`RoundView` read per poll):
  every region in closes it (or fails it if that is short of the quorum,
  since nobody else can report); regions whose secure aggregation failed
  are closed without; a suspended job holds; at the deadline a quorum asks
  the combiners to flush, and a flush that expires closes without the
  silent regions;
* a missed quorum (:func:`on_quorum_missed`): ``onQuorumMissed`` extends the
  deadline or fails the job, with a message that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from fedkube.spec import DifferentialPrivacy, Participation
from fedkube.wire.failures import describe as describe_failures
from fedkube.wire.protocol import RoundState


@dataclass(frozen=True)
class Wait:
    """Nothing to do yet: poll again (or wake up when a partial arrives)."""


@dataclass(frozen=True)
class Open:
    """A quorum of the selected clients registered: open the round."""


@dataclass(frozen=True)
class Hold:
    """The job is suspended: the round keeps what it has and gets a whole deadline again."""


@dataclass(frozen=True)
class Flush:
    """The deadline passed with ``reported`` clients in, a quorum: ask the combiners to flush."""

    reported: int


class Closing(Enum):
    """Why a round closes."""

    all_in = "all_in"  # every region with selected clients sent its partial
    secure_failed = "secure_failed"  # the others' secure aggregation failed
    flush_expired = "flush_expired"  # the flush's deadline passed; the silent regions are left out


@dataclass(frozen=True)
class Close:
    """Close the round with the partials in."""

    because: Closing
    missing: tuple[str, ...] = ()  # flush_expired: the regions that sent nothing
    causes: str = ""  # secure_failed: region by region, why


@dataclass(frozen=True)
class Missed:
    """A deadline passed short of the quorum: extend it or fail (:func:`on_quorum_missed`).

    ``flushed``: the flush's deadline (the round goes back to collecting
    first) and ``regions`` those that sent nothing; otherwise the round's own
    deadline and ``regions`` every region with selected clients, whose
    combiners' leases say whether they are running (:func:`missed_causes`).
    """

    reported: int
    flushed: bool
    regions: tuple[str, ...]


@dataclass(frozen=True)
class Extend:
    """Extend the round's deadline; ``causes`` (each after "; ") go into the warning."""

    causes: str


@dataclass(frozen=True)
class Fail:
    """Fail the job with ``reason``; with ``name_task_failures``, the loop appends the
    round's task failures (:func:`failures_text`), which it reads only then."""

    reason: str
    name_task_failures: bool = False


@dataclass(frozen=True)
class RoundView:
    """What the round loop read in one poll of an open round."""

    round: int
    state: RoundState
    quorum: int
    deadline: float
    now: float
    selected: int  # clients selected (and not waited on: they count in the quorum)
    expected: frozenset[str]  # regions with selected clients
    partials: Mapping[str, int]  # region -> clients counted in the partial it sent
    paused: bool = False  # the job is suspended (read while collecting)
    reported: int = 0  # clients reported, as Redis counts them (read while collecting)
    # Secure aggregation: region -> why it sends no partial (empty without it).
    region_failures: Mapping[str, str] = field(default_factory=dict)
    # Set by the loop once the round is aggregating: when the flush gives up.
    flush_deadline: float | None = None


def eligible(
    selected: Collection[str], tenant_of: Mapping[str, str], refused: Mapping[str, str]
) -> set[str]:
    """The selected clients whose site did not refuse the job."""
    return {c for c in selected if tenant_of[c] not in refused}


def before_opening(
    *,
    number: int,
    selected: Sequence[str],
    needed: int,
    tenant_of: Mapping[str, str],
    refused: Mapping[str, str],
    ready: int,
    waited: float,
    limit: float,
) -> Open | Wait | Fail:
    """Whether round ``number`` opens, waits for registrations or fails the job.

    ``ready`` of the eligible clients have registered after ``waited`` of the
    ``limit`` seconds (``startTimeoutSeconds``).
    """
    can = eligible(selected, tenant_of, refused)
    if len(can) < needed:
        names = sorted({tenant_of[c] for c in selected} & refused.keys())
        return Fail(
            f"round {number}: quorum is {needed} of the {len(selected)} selected "
            f"clients, but only {len(can)} can take part: refused at their site: "
            + "; ".join(f"tenant {t}: {refused[t]}" for t in names)
        )
    if ready >= needed:
        return Open()
    if waited >= limit:
        return Fail(
            f"round {number}: only {ready} of the {len(selected)} selected clients "
            f"registered within {limit:.0f}s (quorum is {needed})"
        )
    return Wait()


def participants(
    selected: Sequence[str],
    tenant_of: Mapping[str, str],
    refused: Mapping[str, str],
    gone: Collection[str],
) -> list[str]:
    """The clients a round waits on: selected, not refused at their site, not gone.

    The others stay counted in the quorum (they are absent, they count as dropped).
    """
    return [c for c in selected if tenant_of[c] not in refused and c not in gone]


def gone(clients: Sequence[str], seen: Mapping[str, float], now: float, ttl_s: float) -> set[str]:
    """Clients that registered once (``seen``: when) but not within ``ttl_s`` of ``now``."""
    limit = now - ttl_s
    return {c for c in clients if c in seen and seen[c] <= limit}


def decide(view: RoundView) -> Wait | Hold | Flush | Close | Missed | Fail:
    """What to do with an open round, given one poll's :class:`RoundView`."""
    got = sum(view.partials.values())
    made_quorum = got >= view.quorum and got > 0
    if view.expected <= view.partials.keys():
        # A region sends its partial early once each of its clients reported or
        # said that its task failed: short of the quorum now, waiting cannot help.
        if made_quorum:
            return Close(Closing.all_in)
        return Fail(
            f"round {view.round}: {got} of {view.selected} selected clients reported, "
            f"quorum is {view.quorum}",
            name_task_failures=True,
        )
    failures = view.region_failures
    if failures and view.expected <= view.partials.keys() | failures.keys():
        causes = "; ".join(f"region {r}: {failures[r]}" for r in sorted(failures))
        if made_quorum:
            return Close(Closing.secure_failed, causes=causes)
        return Fail(
            f"round {view.round}: {got} of {view.selected} selected clients in the regions' "
            f"sums, quorum is {view.quorum}; secure aggregation failed in {causes}"
        )
    if view.state == RoundState.collecting:
        if view.paused:
            return Hold()
        if view.now >= view.deadline:
            if view.reported >= view.quorum:
                return Flush(view.reported)
            return Missed(view.reported, flushed=False, regions=tuple(sorted(view.expected)))
    elif (
        view.state == RoundState.aggregating
        and view.flush_deadline is not None
        and view.now >= view.flush_deadline
    ):
        silent = tuple(sorted(view.expected - view.partials.keys()))
        if made_quorum:
            return Close(Closing.flush_expired, missing=silent)
        return Missed(got, flushed=True, regions=silent)
    return Wait()


def missed_causes(missed: Missed, running: Collection[str]) -> list[str]:
    """Why regions cannot report, for the message; ``running``: regions whose combiner
    holds its lease (read only for the round's own deadline)."""
    if missed.flushed:
        return [
            f"no partial from region {region} (is its combiner running?)"
            for region in missed.regions
        ]
    return [
        f"region {region} has no running combiner (its lease lapsed)"
        for region in missed.regions
        if region not in running
    ]


def failures_text(failures: Mapping[str, str], tenant_of: Mapping[str, str]) -> str:
    """``; the task failed at tenant a (client a-0): ...``, or nothing without failures."""
    if not failures:
        return ""
    return "; the task failed at " + describe_failures(failures, tenant_of)


def on_quorum_missed(
    policy: Participation,
    *,
    round: int,
    quorum: int,
    extensions: int,
    reported: int,
    selected: int,
    causes: Sequence[str],
    failures: str,
) -> Extend | Fail:
    """``onQuorumMissed``: extend the deadline (up to ``maxExtensions``) or fail the job.

    ``causes`` name regions that cannot report; ``failures`` is :func:`failures_text`.
    """
    regions = "".join(f"; {cause}" for cause in causes) + failures
    if policy.on_quorum_missed == "extend" and extensions < policy.max_extensions:
        return Extend(regions)
    return Fail(
        f"round {round}: {reported} of {selected} selected clients reported, "
        f"quorum is {quorum} (after {extensions} deadline extensions){regions}"
    )


def over_budget(
    dp: DifferentialPrivacy, ran: int, after: float, spent: Callable[[], float]
) -> str | None:
    """Why round ``ran + 1`` may not run: its ε (``after``) would pass ``dp.budget``; or None.

    ``spent`` gives the ε of the ``ran`` rounds so far (asked only for the message).
    """
    if dp.budget is None or after <= dp.budget:
        return None
    return (
        f"privacy budget reached: round {ran + 1} would bring ε to {after:.3f} "
        f"(δ={dp.delta:g}), over spec.privacy.dp.budget {dp.budget:g}; "
        f"{ran} rounds ran, ε {spent():.3f}"
    )
