"""Round state in Redis: small, frequent operations only.

Model and update bytes never go through Redis (they travel over HTTP between
the tiers); Redis holds what any component needs to restart and continue.

Key layout (``{job}`` is literal braces around the job name: a Redis Cluster
hash tag, so every key of one job lives in one slot and MULTI works)::

    fedkube:{job}:job                 hash  status, round, rounds, message, started_at, finished_at
    fedkube:{job}:round:<r>           hash  state, token, opened_at, deadline, version, selected,
                                            quorum, extensions, reported, dropped, closed_at
    fedkube:{job}:round:<r>:selected  set   client ids selected for round r
    fedkube:{job}:round:<r>:reported  hash  client id -> weight (HSETNX: a duplicate is a no-op)
    fedkube:{job}:round:<r>:counters  hash  bytes_up, bytes_down, duplicates, late
    fedkube:{job}:round:<r>:partials  hash  region -> updates in the partial the global tier holds
    fedkube:{job}:round:<r>:task_failures  hash  client id -> its task's failure (first line)
    fedkube:{job}:clients             hash  client id -> time it last polled (registration)
    fedkube:{job}:history             list  one JSON document per closed round
    fedkube:{job}:evaluation          hash  the open (or last) evaluation at the sites: round,
                                            version, deadline, final, state (open or closed)
    fedkube:{job}:evaluation:<r>:expected  set   clients asked to evaluate the model after round r
    fedkube:{job}:evaluation:<r>:done      set   clients that reported (a duplicate is a no-op)
    fedkube:{job}:evaluation:<r>:sums      hash  <tenant>|examples, <tenant>|clients,
                                                 <tenant>|w|<metric> (Σ n·m), <tenant>|n|<metric>
    fedkube:{job}:evaluation:<r>:failed    hash  client id -> why its task could not evaluate
    fedkube:{job}:lease:<role>        str   leader lease token (SET NX PX), e.g. lease:global
    fedkube:{job}:events              pub/sub: round_opened, round_flush, round_closed,
                                      evaluation_opened, evaluation_closed, job_finished

A closed round's keys expire after ``spec.state.keyTtlSeconds``; when the job
ends every key of the job gets that TTL, so a finished job leaves nothing.

Over 400 lines on purpose: every round-state key above is written by
:class:`RoundStore` and nowhere else (the Lua scripts included), so that the
layout and the code that keeps it can be checked against each other in one
file.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis

from fedkube.errors import LeaseLost
from fedkube.wire.protocol import RoundState, can_transition

REDIS_PASSWORD_ENV = "FEDKUBE_REDIS_PASSWORD"
SOCKET_TIMEOUT_S = 5.0


def redis_url_with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` set, so a Secret never has to be written into a URL.

    On a cluster the password comes from a Secret as an environment variable
    (``FEDKUBE_REDIS_PASSWORD``) while the URL itself sits in the pod's args.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis URL {url!r}: the scheme must be redis://, rediss:// or unix://")
    if not password:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def job_prefix(job: str) -> str:
    return f"fedkube:{{{job}}}:"


@dataclass(frozen=True)
class RoundInfo:
    round: int
    state: RoundState
    token: str
    opened_at: float
    deadline: float
    version: int
    selected: int
    quorum: int
    extensions: int

    @classmethod
    def from_hash(cls, number: int, data: dict[str, str]) -> RoundInfo:
        return cls(
            round=number,
            state=RoundState(data["state"]),
            token=data["token"],
            opened_at=float(data["opened_at"]),
            deadline=float(data["deadline"]),
            version=int(data["version"]),
            selected=int(data["selected"]),
            quorum=int(data["quorum"]),
            extensions=int(data.get("extensions", 0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "state": self.state.value,
            "token": self.token,
            "deadline": self.deadline,
            "version": self.version,
            "selected": self.selected,
            "quorum": self.quorum,
        }


def select_clients(client_ids: Sequence[str], fraction: float, seed: int, number: int) -> list[str]:
    """The clients of round ``number``: a seeded sample, the same after a restart."""
    k = max(1, round(fraction * len(client_ids)))
    rng = random.Random(f"{seed}:{number}")
    return sorted(rng.sample(list(client_ids), k))


# Renew our lease, or take it back if it lapsed while Redis was away (a
# restart longer than the TTL drops the key); 0 only if another holder has it.
_RENEW_OR_RETAKE = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_TRANSITION = """
local current = redis.call('hget', KEYS[1], 'state')
if current == ARGV[1] then
  redis.call('hset', KEYS[1], 'state', ARGV[2])
  return 1
end
return 0
"""

# One client's evaluation report, folded into its tenant's sums once: the
# set of reporters and the sums change together or not at all.
_RECORD_EVALUATION = """
if redis.call('sadd', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('hset', KEYS[3], ARGV[1], ARGV[4])
  return 1
end
local tenant = ARGV[2]
redis.call('hincrby', KEYS[2], tenant .. '|examples', ARGV[3])
redis.call('hincrby', KEYS[2], tenant .. '|clients', 1)
for i = 5, #ARGV, 2 do
  redis.call('hincrbyfloat', KEYS[2], tenant .. '|w|' .. ARGV[i], ARGV[i + 1])
  redis.call('hincrby', KEYS[2], tenant .. '|n|' .. ARGV[i], ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class EvaluationInfo:
    """An evaluation at the sites: of model ``version``, the one after round ``round``."""

    round: int
    version: int
    deadline: float
    final: bool
    open: bool

    @classmethod
    def from_hash(cls, data: Mapping[str, str]) -> EvaluationInfo:
        return cls(
            round=int(data["round"]),
            version=int(data["version"]),
            deadline=float(data["deadline"]),
            final=data.get("final") == "1",
            open=data.get("state") == "open",
        )


class RoundStore:
    """Typed access to one job's round state.

    Every method is one or a few Redis round trips; none moves tensors.
    """

    def __init__(self, client: aioredis.Redis, job: str):
        # Connected with decode_responses=True: every reply is str. redis-py's
        # stubs cannot express that, hence Any rather than casts on every call.
        self.redis: Any = client
        self.job = job
        self.prefix = job_prefix(job)
        self.channel = self.prefix + "events"

    @classmethod
    def connect(cls, url: str, job: str) -> RoundStore:
        # Timeouts: a Redis that stops answering (frozen, partitioned) raises
        # like one that is down, so callers ride out both the same way.
        return cls(
            aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
            ),
            job,
        )

    async def close(self) -> None:
        await self.redis.aclose()

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    # -- job ---------------------------------------------------------------
    async def job_info(self) -> dict[str, str]:
        return await self.redis.hgetall(self.key("job"))

    async def start_job(self, rounds: int) -> None:
        await self.redis.hset(
            self.key("job"),
            mapping={"status": "running", "rounds": rounds, "started_at": time.time()},
        )

    async def current_round(self) -> int:
        value = await self.redis.hget(self.key("job"), "round")
        return int(value) if value else 0

    async def finish_job(self, status: str, message: str, ttl_seconds: int) -> None:
        await self.redis.hset(
            self.key("job"),
            mapping={"status": status, "message": message, "finished_at": time.time()},
        )
        await self.publish({"type": "job_finished", "status": status, "message": message})
        await self.expire_all(ttl_seconds)

    async def expire_all(self, ttl_seconds: int) -> int:
        count = 0
        async for key in self.redis.scan_iter(match=self.prefix + "*", count=500):
            await self.redis.expire(key, ttl_seconds)
            count += 1
        return count

    async def delete_all(self, keep_live: bool = False) -> int:
        """Remove every key of the job (the operator's finalizer uses this).

        ``keep_live`` spares what services already running keep up to date,
        for a fresh start of the global aggregator: the combiners' leases,
        the clients' registrations and the sites' refusals. Combiners and
        workers start beside the global tier, and a combiner rewrites a
        client's registration only once a quarter of its TTL has passed:
        deleting them made every fresh ``fedkube run`` wait up to 75 s for
        its first round. Registrations carry their own time, so a stale one
        is still seen as stale.
        """
        spared = (self.prefix + "lease:", self.key("refused"), self.key("clients"))
        keys = [
            k
            async for k in self.redis.scan_iter(match=self.prefix + "*", count=500)
            if not (keep_live and k.startswith(spared))
        ]
        if keys:
            await self.redis.delete(*keys)
        return len(keys)

    # -- rounds ------------------------------------------------------------
    async def open_round(
        self,
        number: int,
        selected: Sequence[str],
        quorum: int,
        timeout_s: float,
        version: int,
    ) -> RoundInfo:
        """Write round ``number`` as collecting and make it the job's current round."""
        now = time.time()
        info = RoundInfo(
            round=number,
            state=RoundState.collecting,
            token=secrets.token_hex(8),
            opened_at=now,
            deadline=now + timeout_s,
            version=version,
            selected=len(selected),
            quorum=quorum,
            extensions=0,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                self.key("round", number),
                self.key("round", number, "selected"),
                self.key("round", number, "reported"),
                self.key("round", number, "counters"),
                self.key("round", number, "partials"),
                self.key("round", number, "task_failures"),
            )
            pipe.hset(
                self.key("round", number),
                mapping={
                    "state": RoundState.open.value,
                    "token": info.token,
                    "opened_at": info.opened_at,
                    "deadline": info.deadline,
                    "version": version,
                    "selected": len(selected),
                    "quorum": quorum,
                    "extensions": 0,
                },
            )
            pipe.sadd(self.key("round", number, "selected"), *selected)
            pipe.hset(self.key("round", number), "state", RoundState.collecting.value)
            pipe.hset(self.key("job"), "round", number)
            await pipe.execute()
        await self.publish({"type": "round_opened", **info.as_dict()})
        return info

    async def round_info(self, number: int) -> RoundInfo | None:
        data = await self.redis.hgetall(self.key("round", number))
        return RoundInfo.from_hash(number, data) if data else None

    async def selected(self, number: int) -> set[str]:
        return set(await self.redis.smembers(self.key("round", number, "selected")))

    async def is_selected(self, number: int, client: str) -> bool:
        return bool(await self.redis.sismember(self.key("round", number, "selected"), client))

    async def transition(self, number: int, current: RoundState, target: RoundState) -> bool:
        """Compare-and-set the round's state; False if it was not ``current``."""
        if not can_transition(current, target):
            raise ValueError(f"illegal round transition {current.value} -> {target.value}")
        done = await self.redis.eval(
            _TRANSITION, 1, self.key("round", number), current.value, target.value
        )
        return bool(done)

    async def set_paused(self, paused: bool) -> None:
        """Suspend (or resume) the job: the operator's ``spec.suspend``, seen by the aggregator."""
        await self.redis.hset(self.key("job"), "paused", int(paused))

    async def is_paused(self) -> bool:
        return await self.redis.hget(self.key("job"), "paused") == "1"

    async def postpone(self, number: int, timeout_s: float) -> None:
        """Move a round's deadline without counting an extension (the job is paused)."""
        await self.redis.hset(self.key("round", number), "deadline", time.time() + timeout_s)

    async def set_deadline(self, number: int, deadline: float) -> None:
        """Give a round back time it could not use (Redis was unreachable)."""
        await self.redis.hset(self.key("round", number), "deadline", deadline)

    async def extend(self, number: int, timeout_s: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("round", number), "deadline", time.time() + timeout_s)
            pipe.hincrby(self.key("round", number), "extensions", 1)
            await pipe.execute()

    async def record_report(self, number: int, client: str, weight: float) -> bool:
        """Record that ``client`` reported; False if it already had (a duplicate)."""
        return bool(await self.redis.hsetnx(self.key("round", number, "reported"), client, weight))

    async def forget_reports(self, number: int, clients: Sequence[str]) -> None:
        if clients:
            await self.redis.hdel(self.key("round", number, "reported"), *clients)

    async def reported(self, number: int) -> dict[str, float]:
        data = await self.redis.hgetall(self.key("round", number, "reported"))
        return {client: float(weight) for client, weight in data.items()}

    async def record_partial(self, number: int, region: str, count: int) -> None:
        """The global tier holds ``region``'s partial of round ``number`` (durably)."""
        await self.redis.hset(self.key("round", number, "partials"), region, count)

    async def partials(self, number: int) -> dict[str, int]:
        """Regions whose partial of round ``number`` the global tier holds."""
        data = await self.redis.hgetall(self.key("round", number, "partials"))
        return {region: int(count) for region, count in data.items()}

    async def record_task_failure(self, number: int, client: str, message: str) -> bool:
        """``client``'s task failed round ``number``; False if that was known already."""
        return bool(
            await self.redis.hsetnx(self.key("round", number, "task_failures"), client, message)
        )

    async def task_failures(self, number: int) -> dict[str, str]:
        """Client -> why its task failed round ``number``."""
        return dict(await self.redis.hgetall(self.key("round", number, "task_failures")))

    async def record_region_failure(self, number: int, region: str, message: str) -> None:
        """``region`` cannot send a partial for round ``number`` (its secure aggregation failed)."""
        await self.redis.hset(self.key("round", number, "failed"), region, message)

    async def region_failures(self, number: int) -> dict[str, str]:
        """Region -> why it sends no partial for round ``number``."""
        return dict(await self.redis.hgetall(self.key("round", number, "failed")))

    async def reported_count(self, number: int) -> int:
        return int(await self.redis.hlen(self.key("round", number, "reported")))

    async def add_counters(self, number: int, **deltas: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, delta in deltas.items():
                pipe.hincrby(self.key("round", number, "counters"), name, delta)
            await pipe.execute()

    async def counters(self, number: int) -> dict[str, int]:
        data = await self.redis.hgetall(self.key("round", number, "counters"))
        return {name: int(value) for name, value in data.items()}

    async def close_round(self, number: int, record: dict[str, Any], ttl_seconds: int) -> None:
        """Mark the round closed, append its history record, expire its keys."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.key("round", number),
                mapping={
                    "state": RoundState.closed.value,
                    "closed_at": time.time(),
                    "reported": record.get("reported", 0),
                    "dropped": record.get("dropped", 0),
                },
            )
            pipe.rpush(self.key("history"), json.dumps(record, sort_keys=True))
            for suffix in (
                "",
                ":selected",
                ":reported",
                ":counters",
                ":partials",
                ":failed",
                ":task_failures",
            ):
                pipe.expire(self.key("round", number) + suffix, ttl_seconds)
            await pipe.execute()
        await self.publish({"type": "round_closed", "round": number})

    async def history(self, start: int = 0) -> list[dict[str, Any]]:
        """Closed rounds' records, from the ``start``-th on."""
        return [
            json.loads(item) for item in await self.redis.lrange(self.key("history"), start, -1)
        ]

    async def last_record(self) -> tuple[int, dict[str, Any] | None]:
        """How many rounds closed, and the last one's record (the operator's status)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.key("history"))
            pipe.lindex(self.key("history"), -1)
            length, last = await pipe.execute()
        return int(length), json.loads(last) if last else None

    async def trim_history(self, last_round: int) -> None:
        """Drop history records past ``last_round`` (a resume from an older checkpoint)."""
        kept = [r for r in await self.history() if r["round"] <= last_round]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key("history"))
            if kept:
                pipe.rpush(self.key("history"), *[json.dumps(r, sort_keys=True) for r in kept])
            await pipe.execute()

    # -- evaluation at the sites (fedkube.training.evaluation) ----------------------
    async def open_evaluation(
        self, number: int, version: int, clients: Sequence[str], timeout_s: float, final: bool
    ) -> EvaluationInfo:
        """Ask ``clients`` to evaluate model ``version`` (the one after round ``number``)."""
        info = EvaluationInfo(number, version, time.time() + timeout_s, final, True)
        keys = [self.key("evaluation", number, part) for part in ("expected", "done", "sums")]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys, self.key("evaluation", number, "failed"))
            if clients:
                pipe.sadd(keys[0], *clients)
            pipe.hset(
                self.key("evaluation"),
                mapping={
                    "round": number,
                    "version": version,
                    "deadline": info.deadline,
                    "final": int(final),
                    "state": "open",
                },
            )
            await pipe.execute()
        await self.publish({"type": "evaluation_opened", "round": number, "version": version})
        return info

    async def evaluation(self) -> EvaluationInfo | None:
        """The open evaluation, or the last one (closed); None before the first."""
        data = await self.redis.hgetall(self.key("evaluation"))
        return EvaluationInfo.from_hash(data) if data else None

    async def evaluation_expected(self, number: int) -> set[str]:
        return set(await self.redis.smembers(self.key("evaluation", number, "expected")))

    async def evaluation_done(self, number: int) -> set[str]:
        return set(await self.redis.smembers(self.key("evaluation", number, "done")))

    async def evaluation_done_count(self, number: int) -> int:
        return int(await self.redis.scard(self.key("evaluation", number, "done")))

    async def record_evaluation(
        self,
        number: int,
        client: str,
        tenant: str,
        examples: int,
        metrics: Mapping[str, float],
        error: str | None = None,
    ) -> bool:
        """Fold one client's report into its tenant's sums; False if it had reported."""
        pairs = [str(v) for name, value in metrics.items() for v in (name, examples * value)]
        keys = [self.key("evaluation", number, p) for p in ("done", "sums", "failed")]
        args = [client, tenant, examples, error or "", *pairs]
        return bool(await self.redis.eval(_RECORD_EVALUATION, 3, *keys, *args))

    async def evaluation_results(self, number: int) -> tuple[dict[str, str], dict[str, str]]:
        """The raw per-tenant sums and the failures of evaluation ``number``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key("evaluation", number, "sums"))
            pipe.hgetall(self.key("evaluation", number, "failed"))
            sums, failed = await pipe.execute()
        return dict(sums), dict(failed)

    async def close_evaluation(self, number: int, ttl_seconds: int) -> None:
        """No more reports for evaluation ``number``; its keys expire."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("evaluation"), "state", "closed")
            for part in ("expected", "done", "sums", "failed"):
                pipe.expire(self.key("evaluation", number, part), ttl_seconds)
            await pipe.execute()
        await self.publish({"type": "evaluation_closed", "round": number})

    # -- client registration -----------------------------------------------
    async def register_clients(self, clients: Sequence[str]) -> None:
        """``clients`` polled just now (one write for all of a worker's clients)."""
        now = time.time()
        await self.redis.hset(self.key("clients"), mapping=dict.fromkeys(clients, now))

    async def registrations(self, clients: Sequence[str]) -> dict[str, float]:
        """Client id -> when it last polled its combiner, for ``clients`` that ever did.

        Asked for the round's selected clients only (``HMGET``), so it stays
        O(selected) when a job has thousands of (virtual) clients.
        """
        if not clients:
            return {}
        values = await self.redis.hmget(self.key("clients"), list(clients))
        return {c: float(v) for c, v in zip(clients, values, strict=True) if v is not None}

    async def registered_clients(self, ttl_s: float, clients: Sequence[str]) -> set[str]:
        """Those of ``clients`` whose registration is live: seen within the last ``ttl_s`` s."""
        seen = await self.registrations(clients)
        now = time.time()
        return {client for client, at in seen.items() if now - at < ttl_s}

    # -- sites' refusals ---------------------------------------------------
    async def record_refusal(self, tenant: str, message: str) -> None:
        """A site's policy refuses this tenant: rounds treat its clients as absent."""
        await self.redis.hset(self.key("refused"), tenant, message)

    async def refused_tenants(self) -> dict[str, str]:
        """Tenant -> why its site refuses the job (``fedkube:{job}:refused``)."""
        return dict(await self.redis.hgetall(self.key("refused")))

    # -- events and leases -------------------------------------------------
    async def publish(self, event: dict[str, Any]) -> None:
        await self.redis.publish(self.channel, json.dumps(event))

    async def lease_held(self, role: str) -> bool:
        """Whether some process holds ``role``'s lease (a running combiner renews it)."""
        return bool(await self.redis.exists(self.key("lease", role)))

    async def acquire_lease(self, role: str, token: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(self.key("lease", role), token, nx=True, px=ttl_ms))

    async def renew_lease(self, role: str, token: str, ttl_ms: int) -> None:
        """Keep the lease; take it back if it lapsed (Redis was away longer than the TTL).

        Raises LeaseLost only when another process holds it now.
        """
        if not await self.redis.eval(_RENEW_OR_RETAKE, 1, self.key("lease", role), token, ttl_ms):
            raise LeaseLost(f"lease {role!r} of job {self.job!r} is held by another process")

    async def release_lease(self, role: str, token: str) -> None:
        key = self.key("lease", role)
        if await self.redis.get(key) == token:
            await self.redis.delete(key)
