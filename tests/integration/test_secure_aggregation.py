"""Secure aggregation through the real tiers: redis-server, HTTP, combiners, global aggregator.

The tests play the workers with the worker's own client session
(fedkube.wire.secagg.ClientSession) over HTTP, so that they know each client's
update, choose who drops out and when, keep what the combiner was sent, and
send the malformed messages no honest worker would. ``fedkube run`` then runs
a secure job with real worker processes beside the same job in the clear.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import apply_delta
from fedkube.local.runner import RunOptions, run_job
from fedkube.service.faults import FAULTS_DIR_ENV, FAULTS_ENV
from fedkube.spec import parse_job
from fedkube.wire import codec, masking, secagg
from fedkube.wire.protocol import Envelope
from tests.integration.test_services import (
    client_headers,
    deltas_for,
    region_of,
    rejected,
    running_tier,
)
from tests.support import small_job_dict
from tests.unit.test_secagg import looks_uniform

pytestmark = pytest.mark.integration

# eu: six clients (five neighbours each, threshold 4); us: three.
TENANTS = [
    {"name": "a", "region": "eu", "replicas": 3},
    {"name": "b", "region": "eu", "replicas": 3},
    {"name": "c", "region": "us", "replicas": 2},
    {"name": "d", "region": "us", "replicas": 1},
]
EU = ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
US = ["c-0", "c-1", "d-0"]


def secure_job(dp: dict[str, Any] | None = None) -> Any:
    privacy: dict[str, Any] = {"secureAggregation": {"phaseTimeoutSeconds": 1.5}}
    if dp is not None:
        privacy["dp"] = dp
    return parse_job(
        small_job_dict(
            rounds=1,
            tenants=TENANTS,
            participation={"minFraction": 0.5, "roundTimeoutSeconds": 30},
            privacy=privacy,
        )
    )


@dataclass
class Player:
    """One client of the test, speaking the protocol over HTTP."""

    tier: Any
    client: str
    delta: dict[str, np.ndarray]
    weight: float
    counted: float | None = None  # what the update counts for, if not its weight (DP: 1)
    session: secagg.ClientSession = field(init=False)
    masked: bytes = b""

    def __post_init__(self) -> None:
        self.session = secagg.ClientSession(self.tier.job.name, 1, self.client)

    @property
    def url(self) -> str:
        return self.tier.url(region_of(self.client))

    async def post(self, step: str, document: dict[str, Any]) -> tuple[int, dict]:
        body = {"client": self.client, "round": 1, **document}
        async with self.tier.http.post(
            f"{self.url}/v1/secagg/{step}", json=body, headers=client_headers(self.client)
        ) as response:
            return response.status, await response.json()

    async def task(self, status: str) -> dict[str, Any]:
        """Poll until the combiner hands this client the step ``status``."""
        for _ in range(40):
            async with self.tier.http.post(
                f"{self.url}/v1/tasks",
                json={"clients": [self.client], "after": 1, "wait": 2},
                headers=client_headers(self.client),
            ) as response:
                answer = await response.json()
            for task in answer.get("tasks", []):
                if task["status"] == status:
                    return task
        raise AssertionError(f"{self.client} never got a {status} task")

    async def advertise(self) -> None:
        status, answer = await self.post(
            "keys", {"weight": self.weight, **self.session.advertisement()}
        )
        assert status == 200, answer

    async def share(self) -> dict[str, str]:
        return self.session.share(await self.task("share"))

    async def send_masked(self) -> tuple[int, dict]:
        task = await self.task("mask")
        total = self.session.weight_total
        counted = self.weight if self.counted is None else self.counted
        values = self.session.mask(task, masking.flatten(self.delta), counted / total, 8.0)
        tensors = masking.unflatten(values, {n: d.shape for n, d in self.delta.items()})
        envelope = Envelope(self.tier.job.name, 1, self.client, self.client[0], self.weight)
        self.masked = codec.encode(tensors, envelope.metadata("masked"))
        return await self.tier.send(self.client, 1, self.masked, weight=self.weight)

    async def unmask(self) -> tuple[int, dict]:
        shares = self.session.unmask(await self.task("unmask"))
        return await self.post("unmask", {"shares": shares})


async def play(player: Player, drop_after_sharing: bool = False) -> None:
    """An honest client's round; a dropout leaves once its keys are shared."""
    await player.advertise()
    status, answer = await player.post("shares", {"shares": await player.share()})
    assert status == 200, answer
    if drop_after_sharing:
        return
    status, answer = await player.send_masked()
    assert status == 200, answer
    status, answer = await player.unmask()
    assert status == 200, answer


async def register_all(tier: Any) -> None:
    """Every client polls once, as its worker would; then the round opens."""
    for client in EU + US:
        await tier.register(client)
    await tier.wait_round(1)


def players(tier: Any, clients: list[str]) -> dict[str, Player]:
    return {
        c: Player(tier, c, deltas_for(tier.aggregator, i), float(10 + 7 * i))
        for i, c in enumerate(clients)
    }


def fedavg_of(tier: Any, start: dict, chosen: list[Player]) -> dict[str, np.ndarray]:
    counts = [p.weight if p.counted is None else p.counted for p in chosen]
    mean = flat_fedavg([p.delta for p in chosen], counts)
    return apply_delta(start, mean, 1.0)


@pytest.mark.parametrize("dp", [None, {"clipNorm": 5.0, "noiseMultiplier": 0.0}], ids=["", "dp"])
async def test_the_secure_round_equals_fedavg_and_no_masked_update_reveals_its_client(
    redis_server, tmp_path, dp
):
    # prepare: with central DP (its noise set to zero here) every client counts once
    job = secure_job(dp)
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await register_all(tier)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        everyone = players(tier, EU + US)
        if dp is not None:
            for player in everyone.values():
                player.counted = 1.0
        # execute
        await asyncio.gather(*(play(p) for p in everyone.values()))
        await tier.wait_closed(1)
        # assert: FedAvg of all nine (the plain mean under DP), to the fixed-point precision
        expected = fedavg_of(tier, start, list(everyone.values()))
        for name, value in tier.aggregator.weights.items():
            np.testing.assert_allclose(value, expected[name], atol=1e-6)
        record = (await tier.aggregator.store.history())[-1]
        assert record["reported"] == 9
        # assert: what a combiner received of one client looks uniform, its update does not
        tensors, _ = codec.decode(everyone["a-0"].masked)
        received = masking.flatten(tensors)
        plain = masking.encode(masking.flatten(everyone["a-0"].delta), 0.1, 8.0)
        assert looks_uniform(received) and not looks_uniform(plain)
        # ... and is the float32 update's size: four bytes a parameter, after the header
        header = 8 + int.from_bytes(everyone["a-0"].masked[:8], "little")
        assert len(everyone["a-0"].masked) - header == 4 * received.size


@pytest.mark.parametrize("dropped", [["a-1"], ["a-1", "b-2"]], ids=["one", "two"])
async def test_clients_that_drop_after_sharing_keys_leave_exactly_the_survivors_sum(
    redis_server, tmp_path, dropped
):
    # prepare
    async with running_tier(secure_job(), redis_server.url, tmp_path / "ckpt") as tier:
        await register_all(tier)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        everyone = players(tier, EU + US)
        # execute: the dropped clients share their keys, then vanish
        await asyncio.gather(*(play(p, p.client in dropped) for p in everyone.values()))
        await tier.wait_closed(1)
        # assert
        survivors = [p for c, p in everyone.items() if c not in dropped]
        expected = fedavg_of(tier, start, survivors)
        for name, value in tier.aggregator.weights.items():
            np.testing.assert_allclose(value, expected[name], atol=1e-6)
        record = (await tier.aggregator.store.history())[-1]
        assert record["reported"] == 9 - len(dropped)
        assert counted(await tier.metrics("eu"), "fedkube_secagg_dropouts_total") == len(dropped)


async def test_a_malformed_share_is_refused_by_name_and_the_round_still_closes(
    redis_server, tmp_path
):
    # prepare
    async with running_tier(secure_job(), redis_server.url, tmp_path / "ckpt") as tier:
        await register_all(tier)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        everyone = players(tier, EU + US)
        cheat = everyone["b-0"]
        honest = [p for c, p in everyone.items() if c != "b-0"]
        # execute: b-0 first sends a sealed share six bytes short, then reveals a share
        # made for another round; both are refused, and its honest messages go through
        refusals = []

        async def cheat_then_comply() -> None:
            await cheat.advertise()
            sealed = await cheat.share()
            first = next(iter(sealed))
            short = dict(sealed, **{first: base64.b64encode(b"\0" * 154).decode()})
            refusals.append(await cheat.post("shares", {"shares": short}))
            assert (await cheat.post("shares", {"shares": sealed}))[0] == 200
            assert (await cheat.send_masked())[0] == 200
            shares = cheat.session.unmask(await cheat.task("unmask"))
            about = next(iter(shares))
            stale = dict(shares, **{about: {**shares[about], "round": "0"}})
            refusals.append(await cheat.post("unmask", {"shares": stale}))
            assert (await cheat.post("unmask", {"shares": shares}))[0] == 200

        await asyncio.gather(cheat_then_comply(), *(play(p) for p in honest))
        await tier.wait_closed(1)
        # assert
        (short_status, short_answer), (stale_status, stale_answer) = refusals
        assert short_status == 400 and short_answer["error"] == "bad_share"
        assert (
            f"b-0's share for {first_key(short_answer)} is 154 bytes, expected 160"
            in (short_answer["detail"])
        )
        assert stale_status == 409 and stale_answer["error"] == "wrong_round"
        assert "is for round 0, this is round 1" in stale_answer["detail"]
        assert rejected(await tier.metrics("eu"), "bad_share") == 1
        expected = fedavg_of(tier, start, list(everyone.values()))
        for name, value in tier.aggregator.weights.items():
            np.testing.assert_allclose(value, expected[name], atol=1e-6)


def counted(metrics: str, series: str) -> float:
    """The value of ``series`` (one label set) in a /metrics page."""
    values = re.findall(rf"^{series}\{{[^}}]*\}} ([0-9.e+]+)$", metrics, re.MULTILINE)
    assert len(values) == 1, (series, values)
    return float(values[0])


def first_key(answer: dict) -> str:
    """The neighbour named in a refusal's detail ("X's share for Y is ...")."""
    return answer["detail"].split("share for ")[1].split(" ")[0]


async def test_too_few_unmasking_shares_fail_the_round_saying_how_many(redis_server, tmp_path):
    # prepare: quorum needs all nine clients' updates
    document = small_job_dict(
        rounds=1,
        tenants=TENANTS,
        participation={"minClients": 9, "roundTimeoutSeconds": 30},
        privacy={"secureAggregation": {"phaseTimeoutSeconds": 1.5}},
    )
    job = parse_job(document)
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await register_all(tier)
        everyone = players(tier, EU + US)

        async def reveal_nothing(player: Player) -> None:
            await player.advertise()
            assert (await player.post("shares", {"shares": await player.share()}))[0] == 200
            assert (await player.send_masked())[0] == 200

        # execute: in eu, three of six never reveal their shares (threshold 4 of 5)
        silent = {"a-0", "a-1", "a-2"}
        await asyncio.gather(
            *(reveal_nothing(p) if c in silent else play(p) for c, p in everyone.items())
        )
        # assert: the job fails, and its status says why
        assert await asyncio.wait_for(asyncio.shield(tier.run), 20) == "failed"
        message = (await tier.aggregator.store.job_info())["message"]
        assert "secure aggregation failed in region eu" in message
        assert "rebuilding a-0's self-mask seed needs 4 shares, 3 arrived" in message
        assert counted(await tier.metrics("eu"), "fedkube_secagg_failures_total") == 1


def test_a_secure_run_trains_the_clear_runs_model_and_survives_workers_killed_mid_protocol(
    tmp_path,
):
    # prepare: the same job in the clear and secure, real worker processes; in the
    # secure run's round 2, two of eu's six workers die once their keys are shared
    document = small_job_dict(
        rounds=2,
        tenants=[
            {"name": "a", "region": "eu", "replicas": 6},
            {"name": "c", "region": "us", "replicas": 3},
        ],
        participation={"minFraction": 0.5, "roundTimeoutSeconds": 60},
    )
    secure = copy.deepcopy(document)
    secure["spec"]["privacy"] = {"secureAggregation": {"phaseTimeoutSeconds": 3}}
    kills = {
        FAULTS_ENV: "worker.a-1.shared@2,worker.a-4.shared@2",
        FAULTS_DIR_ENV: str(tmp_path / "fired"),
    }
    (tmp_path / "fired").mkdir()
    runs = {}
    for name, manifest, env in (("clear", document, {}), ("secure", secure, kills)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        # execute
        options = RunOptions(job_path=path, out_dir=tmp_path / name, quiet=True, extra_env=env)
        runs[name] = run_job(options)
    # assert: both succeed; round 1's models agree to the fixed-point precision
    assert runs["clear"].status == runs["secure"].status == "succeeded", runs
    models = {
        name: load_file(tmp_path / name / "checkpoints" / "round-000001.safetensors")
        for name in runs
    }
    for key, clear in models["clear"].items():
        np.testing.assert_allclose(models["secure"][key], clear, atol=1e-6)
    # ... and round 2 closed with the seven survivors' sum
    assert sorted(p.name for p in (tmp_path / "fired").iterdir()) == [
        "worker.a-1.shared@2",
        "worker.a-4.shared@2",
    ]
    rounds = [r["reported"] for r in runs["secure"].history]
    assert rounds == [9, 7], runs["secure"].history
