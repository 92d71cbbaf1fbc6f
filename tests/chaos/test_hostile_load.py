"""A compromised tenant against a live combiner: what it costs, and what it cannot change.

A global aggregator and the combiners run in the test's event loop against a
real redis-server, and the test plays the workers over loopback. Tenant a's
credentials are in hostile hands: its uploads announce large bodies and
trickle them, overstate their size, carry malformed or deeply nested
payloads under a valid signature, replay old rounds; strangers flood the port
with garbage. Every one is refused by name; the combiner's memory grows by
what was actually sent, not by what was claimed; and every round is FedAvg of
the honest updates, tenant a's own honest one included once it gets through.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import apply_delta
from fedkube.spec import parse_job
from fedkube.state import checkpoint
from fedkube.wire.protocol import H_SIGNATURE
from tests.integration.test_services import (
    Tier,
    client_headers,
    deltas_for,
    region_of,
    rejected,
    running_tier,
)
from tests.support import small_job_dict

pytestmark = pytest.mark.integration

MB = 1024 * 1024
CLIENTS = ["a-0", "b-0", "c-0", "d-0"]
# Updates up to 64 MB; a combiner receives at most 256 MB at once, and tenant a
# (which shares region eu with b) half of that: two bodies of the largest size.
# A body must arrive within 2 s plus its size at 64 MB/s.
TRANSPORT = {
    "maxUpdateBytes": 64 * MB,
    "maxInflightBytes": 256 * MB,
    "bodyTimeoutSeconds": 2,
    "minUploadBytesPerSecond": 64 * MB,
}


def resident_bytes() -> int:
    """This process's resident memory (the combiners run in it), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    document: dict


class RawUpload:
    """An upload written by hand on a socket: headers, then as much body as the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, tier: Tier, client: str, number: int, announced: int, signature: str
    ) -> RawUpload:
        port = tier.combiners[region_of(client)].port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        headers = {
            **client_headers(client),
            "Host": f"127.0.0.1:{port}",
            "Content-Length": str(announced),
            "X-Fedkube-Job": tier.job.name,
            "X-Fedkube-Round": str(number),
            "X-Fedkube-Weight": "10.0",
            "X-Fedkube-Codec": "safetensors",
            H_SIGNATURE: signature,
        }
        head = "POST /v1/update HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n" + b"\0" * 1024)  # and a trickle of body
        await writer.drain()
        return cls(reader, writer)

    async def answer(self, timeout: float = 60) -> Answer:
        status_line = await asyncio.wait_for(self.reader.readline(), timeout)
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.writer.close()
        return Answer(int(status_line.split()[1]), headers, json.loads(body or b"{}"))


async def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for ``condition`` (checked every 20 ms); fail naming ``what`` after ``timeout``."""

    async def check() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def send_until_taken(tier: Tier, client: str, number: int, body: bytes) -> int:
    """Send as a worker does: again after Retry-After while the combiner says busy."""
    signature = tier.sign(client, number, body)
    for _ in range(200):
        status, answer = await tier.post(client, number, body, signature)
        if answer.get("error") != "busy":
            return status
        await asyncio.sleep(0.05)  # Retry-After is 1 s; the test need not wait that long
    raise AssertionError(f"{client} was told busy 200 times")


def nested_header_payload(depth: int) -> bytes:
    """A safetensors payload whose JSON header is ``depth`` nested lists."""
    header = b"[" * depth + b"]" * depth
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


async def test_a_tenant_announcing_large_bodies_and_trickling_them_holds_only_its_share(
    redis_server, tmp_path
):
    # prepare: one round that waits for all four clients
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 60}
    job = parse_job(small_job_dict(rounds=1, participation=participation, transport=TRANSPORT))
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        good = {c: deltas_for(tier.aggregator, i) for i, c in enumerate(CLIENTS)}
        honest = {c: tier.encode(c, 1, good[c]) for c in CLIENTS}
        before = resident_bytes()
        # execute: a-0 opens twelve uploads that each claim 64 MB and send 1 KB
        slow = [
            await RawUpload.open(tier, "a-0", 1, 64 * MB, tier.sign("a-0", 1, b"x"))
            for _ in range(12)
        ]
        pending = [asyncio.create_task(upload.answer()) for upload in slow]
        await until(lambda: sum(t.done() for t in pending) >= 10, "ten answers")
        held = resident_bytes() - before
        budget = tier.combiners["eu"].inflight
        holding = budget.of("a")
        # ... while the other tenants send, and a-0 its honest update, as a worker would
        statuses = {
            c: await send_until_taken(tier, c, 1, honest[c]) for c in ["b-0", "c-0", "d-0", "a-0"]
        }
        answers = [await task for task in pending]
        await tier.wait_closed(1)
        eu = await tier.metrics("eu")
    # assert: ten told 429 busy at once, with Retry-After; two admitted, then cut off as
    # too slow; memory grew by what came, not by the 768 MB claimed
    busy = [a for a in answers if a.status == 429]
    slow_body = [a for a in answers if a.status == 408]
    assert len(busy) == 10 and len(slow_body) == 2, [(a.status, a.document) for a in answers]
    assert all(a.document["error"] == "busy" and a.headers["retry-after"] == "1" for a in busy)
    assert "maxInflightBytesPerTenant" in busy[0].document["detail"]
    assert all(a.document["error"] == "slow_body" for a in slow_body)
    assert holding == 2 * 64 * MB
    assert held < 64 * MB, f"the combiner grew by {held / MB:.0f} MB for 12 KB received"
    assert rejected(eu, "busy") >= 10 and rejected(eu, "slow_body") == 2
    # ... and the round is FedAvg of the four honest updates
    assert statuses == {c: 200 for c in ["b-0", "c-0", "d-0", "a-0"]}
    expected = apply_delta(start, flat_fedavg(list(good.values()), [10.0] * 4), 1.0)
    saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
    assert saved is not None and saved.round == 1
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-7)


async def flood(port: int, connections: int, rng: np.random.Generator) -> None:
    """Strangers writing random bytes at the port and hanging up."""
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(rng.bytes(int(rng.integers(1, 4096))))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 60)  # aiohttp answers 400, or just closes
        writer.close()


async def hammer(
    tier: Tier, number: int, rng: np.random.Generator, captured: tuple[bytes, str] | None
) -> dict[str, tuple[int, str]]:
    """One round of tenant a's abuse, and strangers' garbage; each outcome as (status, reason).

    ``captured`` is a-0's update and signature of the round before, replayed.
    """
    oversized = await RawUpload.open(
        tier, "a-0", number, 64 * MB + 1, tier.sign("a-0", number, b"x")
    )
    junk = rng.bytes(4096)
    nested = nested_header_payload(100_000)
    seen: dict[str, Answer | tuple[int, dict]] = {
        "oversized": await oversized.answer(),
        "junk": await tier.post("a-0", number, junk, tier.sign("a-0", number, junk)),
        "nested": await tier.post("a-0", number, nested, tier.sign("a-0", number, nested)),
    }
    if captured is not None:
        seen["replayed"] = await tier.post("a-0", number, *captured)
    async with tier.http.post(
        tier.url("eu") + "/v1/tasks",
        data=b"[" * 100_000 + b"]" * 100_000,
        headers=client_headers("a-0"),
    ) as response:
        seen["nested poll"] = response.status, await response.json()
    # then bodies that claim 64 MB and trickle (two fit a's share; these come last, as
    # while they are held a's other uploads are told busy)
    slow = [
        await RawUpload.open(tier, "a-0", number, 64 * MB, tier.sign("a-0", number, b"x"))
        for _ in range(4)
    ]
    await flood(tier.combiners["eu"].port, 50, rng)
    for index, upload in enumerate(slow):
        seen[f"slow {index}"] = await upload.answer()
    return {
        case: (
            (got.status, got.document["error"])
            if isinstance(got, Answer)
            else (got[0], got[1]["error"])
        )
        for case, got in seen.items()
    }


async def test_honest_rounds_close_exactly_while_a_compromised_tenant_hammers_the_combiner(
    redis_server, tmp_path
):
    # prepare: three rounds that wait for all four clients
    rounds = 3
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 60}
    job = parse_job(small_job_dict(rounds=rounds, participation=participation, transport=TRANSPORT))
    rng = np.random.default_rng(7)
    refusals: dict[str, list[tuple[str, tuple[int, str]]]] = {}
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        before = resident_bytes()
        peak = 0
        captured: tuple[bytes, str] | None = None
        for number in range(1, rounds + 1):
            await tier.wait_round(number)
            start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
            good = {c: deltas_for(tier.aggregator, 10 * number + i) for i, c in enumerate(CLIENTS)}
            honest = {c: tier.encode(c, number, good[c]) for c in CLIENTS}

            attack = asyncio.create_task(hammer(tier, number, rng, captured))
            statuses = {c: await send_until_taken(tier, c, number, honest[c]) for c in CLIENTS[1:]}
            refusals[f"round {number}"] = sorted((await attack).items())
            # a's own honest update, once its abuse is answered (a duplicate would end it)
            statuses["a-0"] = await send_until_taken(tier, "a-0", number, honest["a-0"])
            peak = max(peak, resident_bytes() - before)
            await tier.wait_closed(number)
            captured = honest["a-0"], tier.sign("a-0", number, honest["a-0"])
            # assert, each round: every honest update taken, and the model their FedAvg
            assert statuses == dict.fromkeys(CLIENTS, 200), (number, statuses)
            expected = apply_delta(start, flat_fedavg(list(good.values()), [10.0] * 4), 1.0)
            saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
            assert saved is not None and saved.round == number
            for name in expected:
                np.testing.assert_allclose(
                    saved.weights[name], expected[name], rtol=1e-5, atol=1e-7
                )
        record = (await tier.aggregator.store.history())[-1]
    # assert: every hostile request refused by name, never a 500
    for case, (status, reason) in (pair for found in refusals.values() for pair in found):
        assert status < 500 or reason == "busy", (case, status, reason)
    round_two = dict(refusals["round 2"])
    assert round_two["oversized"] == (413, "oversized")
    assert round_two["junk"] == (400, "malformed")
    assert round_two["nested"] == (400, "malformed")
    assert round_two["nested poll"] == (400, "malformed")
    assert round_two["replayed"] == (403, "bad_signature")
    slow_outcomes = {round_two[f"slow {i}"] for i in range(4)}
    assert slow_outcomes <= {(429, "busy"), (408, "slow_body"), (403, "bad_signature")}
    assert record["round"] == rounds and record["reported"] == 4
    # ... and memory stayed within the combiners' budget (256 MB each)
    assert peak < 256 * MB, f"grew by {peak / MB:.0f} MB"
