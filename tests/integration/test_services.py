"""The aggregator tier in-process: real redis-server, real HTTP on loopback.

A global aggregator and two regional combiners run in the test's event loop;
the tests play the workers, sending hand-made updates, so that the exact
aggregate can be checked and every kind of bad update can be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from fedkube.aggregator.combiner import Combiner, CombinerConfig
from fedkube.aggregator.global_aggregator import GlobalAggregator, GlobalConfig
from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import apply_delta
from fedkube.errors import FedkubeError
from fedkube.service.web import digest
from fedkube.spec import FederatedJob, parse_job
from fedkube.state import checkpoint
from fedkube.wire import codec, signing
from fedkube.wire.protocol import H_SIGNATURE, Envelope
from fedkube.workers.runtime import Worker, WorkerConfig
from tests.support import (
    region_checks,
    region_credential,
    small_job_dict,
    tenant_signing_key,
    tenant_verify_keys,
)

pytestmark = pytest.mark.integration

TOKENS = {"a": "tok-a", "b": "tok-b", "c": "tok-c", "d": "tok-d"}


def region_of(client: str) -> str:
    return "us" if client[0] in "cd" else "eu"


def client_headers(client: str, tenant: str | None = None, token: str | None = None) -> dict:
    """What a worker of ``client`` sends with every request: its identity and token."""
    tenant = tenant or client.split("-")[0]
    return {
        "Authorization": f"Bearer {token or TOKENS.get(tenant, 'x')}",
        "X-Fedkube-Tenant": tenant,
        "X-Fedkube-Client": client,
    }


@dataclass
class Tier:
    job: FederatedJob
    aggregator: GlobalAggregator
    combiners: dict[str, Combiner]
    run: asyncio.Task
    http: aiohttp.ClientSession
    checkpoints: Path

    def url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.combiners[region].port}"

    async def wait_round(self, number: int, timeout: float = 20.0) -> None:
        async def opened() -> None:
            while any(
                c.current is None or c.current.info.round != number for c in self.combiners.values()
            ):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(opened(), timeout)

    async def wait_closed(self, number: int, timeout: float = 20.0) -> None:
        async def closed() -> None:
            while self.aggregator.round_no < number:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(closed(), timeout)

    async def register(self, client: str) -> None:
        async with self.http.post(
            self.url(region_of(client)) + "/v1/tasks",
            json={"clients": [client], "wait": 0},
            headers=client_headers(client),
        ) as response:
            assert response.status == 200

    async def metrics(self, region: str) -> str:
        async with self.http.get(self.url(region) + "/metrics") as response:
            return await response.text()

    async def aggregator_metrics(self) -> str:
        url = f"http://127.0.0.1:{self.aggregator.port}/metrics"
        async with self.http.get(url) as response:
            return await response.text()

    def encode(
        self,
        client: str,
        number: int,
        tensors: dict[str, np.ndarray],
        weight: float = 10.0,
        tenant: str | None = None,
        meta_round: int | None = None,
    ) -> bytes:
        """An update's body as a worker encodes it."""
        tenant = tenant or client.split("-")[0]
        envelope = Envelope(self.job.name, meta_round or number, client, tenant, weight)
        return codec.encode(tensors, envelope.metadata("update"))

    def sign(self, client: str, number: int, body: bytes, signer: str | None = None) -> str:
        """The signature a worker of tenant ``signer`` (default: the client's) sends."""
        key = signing.load_signing_key(tenant_signing_key(signer or client.split("-")[0]), "test")
        digest = signing.payload_digest([body])
        return signing.sign(key, self.job.name, number, client, digest)

    async def post(
        self,
        client: str,
        number: int,
        body: bytes,
        signature: str | None,
        weight: float = 10.0,
        token: str | None = None,
        tenant: str | None = None,
    ) -> tuple[int, dict]:
        """POST exactly these bytes and this signature (none: no signature header)."""
        tenant = tenant or client.split("-")[0]
        headers = {
            **client_headers(client, tenant, token),
            "X-Fedkube-Job": self.job.name,
            "X-Fedkube-Round": str(number),
            "X-Fedkube-Weight": repr(weight),
            "X-Fedkube-Codec": "safetensors",
            **({H_SIGNATURE: signature} if signature is not None else {}),
        }
        async with self.http.post(
            self.url(region_of(client)) + "/v1/update", data=body, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)

    async def send(
        self,
        client: str,
        number: int,
        tensors: dict[str, np.ndarray] | bytes,
        weight: float = 10.0,
        token: str | None = None,
        tenant: str | None = None,
        meta_round: int | None = None,
    ) -> tuple[int, dict]:
        """An update signed with its tenant's key, as an honest worker sends it."""
        if isinstance(tensors, bytes):
            body = tensors
        else:
            body = self.encode(client, number, tensors, weight, tenant, meta_round)
        signature = self.sign(client, number, body, tenant)
        return await self.post(client, number, body, signature, weight, token, tenant)


def global_aggregator(
    job: FederatedJob, redis_url: str, checkpoints: Path, *, resume: bool = False, port: int = 0
) -> GlobalAggregator:
    return GlobalAggregator(
        GlobalConfig(
            job=job,
            redis_url=redis_url,
            checkpoint_dir=checkpoints,
            **region_checks(job.region_names()),
            resume=resume,
            port=port,
        )
    )


async def start_global(job: FederatedJob, redis_url: str, checkpoints: Path) -> GlobalAggregator:
    aggregator = global_aggregator(job, redis_url, checkpoints)
    await aggregator.start()
    return aggregator


async def start_combiner(
    job: FederatedJob, region: str, redis_url: str, aggregator: GlobalAggregator
) -> Combiner:
    combiner = Combiner(
        CombinerConfig(
            job=job,
            region=region,
            redis_url=redis_url,
            global_url=f"http://127.0.0.1:{aggregator.port}",
            tenant_digests={t: digest(v) for t, v in TOKENS.items()},
            tenant_keys=tenant_verify_keys(TOKENS),
            **region_credential(region),
        )
    )
    await combiner.start()
    return combiner


@contextlib.asynccontextmanager
async def running_tier(job: FederatedJob, redis_url: str, checkpoints: Path) -> AsyncIterator[Tier]:
    """A global aggregator driving rounds and a combiner per region, all registered."""
    aggregator = await start_global(job, redis_url, checkpoints)
    combiners = {r: await start_combiner(job, r, redis_url, aggregator) for r in ("eu", "us")}
    run = asyncio.create_task(aggregator.run())
    async with aiohttp.ClientSession() as http:
        tier = Tier(job, aggregator, combiners, run, http, checkpoints)
        for client in ["a-0", "b-0", "c-0", "d-0"]:
            await tier.register(client)  # as a worker's first poll does
        try:
            yield tier
        finally:
            tier.aggregator.stopping.set()
            tier.run.cancel()
            await asyncio.wait({tier.run}, timeout=10)
            for combiner in combiners.values():
                await combiner.stop()
            await tier.aggregator.stop()


@pytest.fixture
async def tier(redis_server, tmp_path):
    job = parse_job(
        small_job_dict(
            rounds=2,
            participation={"minFraction": 0.5, "roundTimeoutSeconds": 20},
            transport={"maxUpdateBytes": 64 * 1024},
        )
    )
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        yield tier


def deltas_for(aggregator: GlobalAggregator, seed: int) -> dict[str, np.ndarray]:
    """A random update shaped like what travels down (SCAFFOLD's control tensors too)."""
    rng = np.random.default_rng(seed)
    return {
        name: (0.01 * rng.standard_normal(shape)).astype(np.float32)
        for name, (shape, _dtype) in aggregator.template.items()
    }


def rejected(metrics: str, reason: str) -> float:
    pattern = rf'fedkube_updates_rejected_total\{{[^}}]*reason="{reason}"[^}}]*\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


async def test_bad_updates_are_refused_by_reason_and_the_round_aggregates_exactly(tier):
    # prepare
    await tier.wait_round(1)
    start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
    good = {c: deltas_for(tier.aggregator, i) for i, c in enumerate(["a-0", "b-0", "c-0", "d-0"])}
    weights = {"a-0": 10.0, "b-0": 30.0, "c-0": 5.0, "d-0": 55.0}
    wrong_shape = {
        k: np.zeros(v.shape[::-1] if v.ndim == 2 else v.shape[0] + 1, np.float32)
        for k, v in good["a-0"].items()
    }
    nan = {k: v.copy() for k, v in good["a-0"].items()}
    next(iter(nan.values())).flat[0] = np.nan
    inf = {k: v.copy() for k, v in good["a-0"].items()}
    next(iter(inf.values())).flat[0] = np.inf
    huge = {"pad": np.zeros(40_000, np.float32)}

    # execute: every kind of bad update first, then the good ones, then a duplicate
    bad = [
        (await tier.send("a-0", 1, wrong_shape), "wrong_shape"),
        (await tier.send("a-0", 1, nan), "non_finite"),
        (await tier.send("a-0", 1, inf), "non_finite"),
        (await tier.send("a-0", 7, good["a-0"]), "wrong_round"),
        (await tier.send("a-0", 1, good["a-0"], meta_round=2), "metadata_mismatch"),
        (await tier.send("zz-0", 1, good["a-0"], tenant="zz"), "unknown_tenant"),
        (await tier.send("a-0", 1, good["a-0"], token="stolen"), "unauthenticated"),
        (await tier.send("a-0", 1, huge), "oversized"),
        (await tier.send("a-0", 1, pickle.dumps(good["a-0"])), "malformed"),
    ]
    for client in ["a-0", "b-0", "c-0", "d-0"]:
        status, _ = await tier.send(client, 1, good[client], weight=weights[client])
        assert status == 200, client
    duplicate = await tier.send("a-0", 1, good["a-0"], weight=weights["a-0"])
    await tier.wait_closed(1)

    # assert: each refusal carried its reason, and the metrics count it
    for (status, body), reason in bad:
        assert status >= 400 and body["error"] == reason, (reason, body)
    assert duplicate[0] == 409 and duplicate[1]["error"] == "duplicate"
    eu = await tier.metrics("eu")
    for reason in [
        "duplicate",
        "wrong_shape",
        "wrong_round",
        "metadata_mismatch",
        "unknown_tenant",
        "unauthenticated",
        "oversized",
        "malformed",
    ]:
        assert rejected(eu, reason) == 1, reason
    assert rejected(eu, "non_finite") == 2
    # the aggregate is exactly FedAvg over the four good updates (two regions = flat)
    expected = apply_delta(start, flat_fedavg(list(good.values()), list(weights.values())), 1.0)
    saved = checkpoint.load_latest(tier.checkpoints, tier.job.name)
    assert saved is not None and saved.round == 1
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-7)
    record = (await tier.aggregator.store.history())[0]
    assert record["reported"] == 4 and record["dropped"] == 0
    assert record["regions"] == {
        "eu": {"selected": 2, "reported": 2},
        "us": {"selected": 2, "reported": 2},
    }


async def test_a_late_update_is_refused_and_counted(tier):
    await tier.wait_round(1)
    for i, client in enumerate(["a-0", "b-0", "c-0", "d-0"]):
        assert (await tier.send(client, 1, deltas_for(tier.aggregator, i)))[0] == 200
    await tier.wait_round(2)
    status, body = await tier.send("a-0", 1, deltas_for(tier.aggregator, 0))
    assert status == 410 and body["error"] == "late"
    assert rejected(await tier.metrics("eu"), "late") == 1


async def test_the_combiner_serves_one_model_copy_per_region(tier):
    await tier.wait_round(1)
    headers = client_headers("a-0")
    for _ in range(3):
        async with tier.http.get(tier.url("eu") + "/v1/model/1", headers=headers) as response:
            assert response.status == 200
            tensors, meta = codec.decode(await response.read())
    assert meta["fedkube.version"] == "1" and set(tensors) == set(tier.aggregator.weights)
    async with tier.http.get(f"http://127.0.0.1:{tier.aggregator.port}/metrics") as response:
        text = await response.text()
    sent = re.findall(r'fedkube_bytes_down_total\{[^}]*region="eu"[^}]*\} ([0-9.e+]+)', text)
    model_size = len(tier.aggregator.model_bytes[1])
    assert sum(float(v) for v in sent) == model_size  # one copy, three workers served


async def test_a_task_long_poll_hands_out_the_open_round(tier):
    await tier.wait_round(1)
    headers = client_headers("c-0")
    poll = {"clients": ["c-0"], "after": 0}
    async with tier.http.post(tier.url("us") + "/v1/tasks", json=poll, headers=headers) as response:
        answer = await response.json()
    deadline = answer["tasks"][0]["deadline"]
    task = {"status": "train", "client": "c-0", "round": 1, "version": 1, "deadline": deadline}
    assert answer == {"status": "tasks", "round": 1, "tasks": [task]}
    poll = {"clients": ["c-0"], "after": 1, "wait": 0.2}
    async with tier.http.post(tier.url("us") + "/v1/tasks", json=poll, headers=headers) as response:
        assert (await response.json()) == {"status": "wait", "round": 1}


async def test_a_poll_for_another_tenants_client_or_a_malformed_poll_is_refused_by_name(tier):
    # prepare: tenant c's token, asking for c-0 and for d-0 (tenant d's)
    await tier.wait_round(1)
    headers = client_headers("c-0")
    poll = {"clients": ["c-0", "d-0"], "after": 0}
    # execute
    async with tier.http.post(tier.url("us") + "/v1/tasks", json=poll, headers=headers) as response:
        refused = response.status, await response.json()
    async with tier.http.post(
        tier.url("us") + "/v1/tasks", json={"clients": "c-0"}, headers=headers
    ) as response:
        malformed = response.status, await response.json()
    # assert
    assert refused[0] == 403
    assert refused[1]["error"] == "unknown_tenant"
    assert "'d-0' is not a client of tenant 'c'" in refused[1]["detail"]
    assert malformed[0] == 400 and "non-empty list" in malformed[1]["detail"]


async def test_a_round_without_quorum_fails_the_job_with_a_clear_status(redis_server, tmp_path):
    # prepare: quorum 3 of 4, no deadline extension, and only one client reports
    job = parse_job(
        small_job_dict(
            rounds=2,
            participation={"minClients": 3, "roundTimeoutSeconds": 1, "onQuorumMissed": "fail"},
        )
    )
    aggregator = await start_global(job, redis_server.url, tmp_path / "ckpt")
    combiner = await start_combiner(job, "eu", redis_server.url, aggregator)
    try:
        async with aiohttp.ClientSession() as http:
            tier = Tier(job, aggregator, {"eu": combiner}, None, http, tmp_path / "ckpt")
            for client in ["a-0", "b-0"]:
                await tier.register(client)
            await aggregator.store.register_clients(["c-0"])  # registered, then silent
            # execute
            run = asyncio.create_task(aggregator.run())
            await tier.wait_round(1)
            assert (await tier.send("a-0", 1, deltas_for(aggregator, 0)))[0] == 200
            status = await asyncio.wait_for(run, timeout=30)
        # assert
        info = await aggregator.store.job_info()
        assert status == "failed" and info["status"] == "failed"
        assert "round 1: 1 of 4 selected clients reported, quorum is 3" in info["message"]
        assert await aggregator.store.redis.ttl(aggregator.store.key("job")) > 0
    finally:
        await combiner.stop()
        await aggregator.stop()


async def test_a_worker_with_a_wrong_token_stops_with_a_clear_error(tier):
    client = next(c for c in tier.job.clients() if c.id == "a-0")
    worker = Worker(
        WorkerConfig(
            job=tier.job,
            clients=[client],
            combiner_url=tier.url("eu"),
            token="not-the-token",
            signing_key=signing.load_signing_key(tenant_signing_key("a"), "test"),
        )
    )
    with pytest.raises(FedkubeError, match="combiner refused client a-0"):
        await asyncio.wait_for(worker.run(asyncio.Event()), timeout=30)


async def test_a_round_checkpointed_but_not_closed_in_redis_is_closed_on_resume(
    redis_server, tmp_path
):
    # prepare: a crash between the checkpoint write and the Redis close of round 1
    job = parse_job(small_job_dict(rounds=3))
    first = await start_global(job, redis_server.url, tmp_path / "ckpt")
    info = await first.store.open_round(1, ["a-0", "b-0"], quorum=1, timeout_s=30, version=1)
    record = {"round": 1, "reported": 2, "dropped": 0, "accuracy": 0.5, "loss": 1.0}
    checkpoint.save(tmp_path / "ckpt", job.name, 1, first.weights, record)
    await first.stop()  # releases its lease, as a crashed one's would expire
    # execute
    resumed = global_aggregator(job, redis_server.url, tmp_path / "ckpt", resume=True)
    await resumed.start()
    try:
        # assert: round 1 is closed with its record, and round 2 is next
        assert (await resumed.store.round_info(1)).state.value == "closed"
        assert [r["round"] for r in await resumed.store.history()] == [1]
        assert (await resumed.store.history())[0]["accuracy"] == 0.5
        assert resumed.round_no == 1 and resumed.version == 2 and info.round == 1
    finally:
        await resumed.stop()


async def test_a_resumed_round_is_reported_as_the_current_round_at_once(redis_server, tmp_path):
    # prepare: round 1 checkpointed and closed, round 2 collecting when the aggregator died
    job = parse_job(small_job_dict(rounds=3))
    first = await start_global(job, redis_server.url, tmp_path / "ckpt")
    await first.store.open_round(1, ["a-0", "b-0"], quorum=1, timeout_s=30, version=1)
    record = {"round": 1, "reported": 2, "dropped": 0, "accuracy": 0.5, "loss": 1.0}
    checkpoint.save(tmp_path / "ckpt", job.name, 1, first.weights, record)
    await first.store.close_round(1, record, job.spec.state.key_ttl_seconds)
    await first.store.open_round(2, ["a-0", "b-0"], quorum=1, timeout_s=30, version=2)
    await first.stop()
    # execute
    resumed = global_aggregator(job, redis_server.url, tmp_path / "ckpt", resume=True)
    await resumed.start()
    try:
        # assert: /metrics says round 2 before any round opens
        text = resumed.metrics.exposition().decode()
        assert f'fedkube_round_current{{job="{job.name}",region="",tier="global"}} 2.0' in text
    finally:
        await resumed.stop()


async def test_a_resume_without_the_checkpoints_says_which_rounds_are_lost(
    redis_server, tmp_path, caplog
):
    # prepare: two rounds closed in Redis, but the checkpoint folder is empty (a new emptyDir)
    job = parse_job(small_job_dict(rounds=5))
    first = await start_global(job, redis_server.url, tmp_path / "old-ckpt")
    for number in (1, 2):
        await first.store.open_round(number, ["a-0"], quorum=1, timeout_s=30, version=number)
        record = {"round": number, "reported": 1, "dropped": 0, "accuracy": 0.5, "loss": 1.0}
        await first.store.close_round(number, record, job.spec.state.key_ttl_seconds)
    await first.stop()
    # execute
    resumed = global_aggregator(job, redis_server.url, tmp_path / "new-ckpt", resume=True)
    with caplog.at_level(logging.ERROR, logger="fedkube.global"):
        await resumed.start()
    try:
        # assert: it says what is lost and why; history matches the model it has
        assert "rounds 1 to 2 are lost" in caplog.text
        assert "spec.state.checkpointClaim" in caplog.text
        assert await resumed.store.history() == []
        assert resumed.round_no == 0
    finally:
        await resumed.stop()


async def test_a_model_fetch_that_failed_with_nobody_waiting_is_tried_again(redis_server, tmp_path):
    # prepare: the global tier goes down; a prefetch of model 1 is cancelled (its
    # waiter gone) and its fetch then fails with nobody to see it.
    job = parse_job(small_job_dict(rounds=3))
    first = await start_global(job, redis_server.url, tmp_path / "ckpt")
    combiner = await start_combiner(job, "eu", redis_server.url, first)
    port = first.port
    await first.stop()
    waiter = asyncio.create_task(combiner.models.get(1))
    await asyncio.sleep(0)  # let it start the fetch
    waiter.cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while not combiner.models.fetches[1].done():  # the fetch nobody awaits
        assert asyncio.get_running_loop().time() < deadline, "the fetch did not fail"
        await asyncio.sleep(0.01)
    second = global_aggregator(job, redis_server.url, tmp_path / "ckpt", port=port)
    await second.start()
    try:
        # execute: a worker asks for model 1 once the global tier is back
        data = await combiner.models.get(1)
        # assert: fetched again, not the old connection error
        tensors, _ = codec.decode(data)
        assert set(tensors) == set(second.weights)
    finally:
        await combiner.stop()
        await second.stop()


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "scaffold"])
async def test_a_restarted_aggregator_continues_with_the_strategys_server_state(
    redis_server, tmp_path, strategy
):
    # prepare: two rounds of hand-made updates build up momentum / moments / c
    job = parse_job(
        small_job_dict(
            rounds=3,
            strategy={"name": strategy},
            participation={"minFraction": 1.0, "roundTimeoutSeconds": 20},
        )
    )
    clients = ["a-0", "b-0", "c-0", "d-0"]
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        for number in (1, 2):
            await tier.wait_round(number)
            for i, client in enumerate(clients):
                assert (await tier.send(client, number, deltas_for(tier.aggregator, i)))[0] == 200
            await tier.wait_closed(number)
        before = {k: v.copy() for k, v in tier.aggregator.server_state.items()}
        weights = {k: v.copy() for k, v in tier.aggregator.weights.items()}
    # execute: a new aggregator process resumes from the checkpoint
    resumed = global_aggregator(job, redis_server.url, tmp_path / "ckpt", resume=True)
    await resumed.start()
    try:
        # assert: the same model and the same, non-zero, server state
        assert resumed.round_no == 2
        assert before and before.keys() == resumed.server_state.keys()
        assert any(np.abs(v).sum() > 0 for v in before.values())
        for name, value in before.items():
            np.testing.assert_array_equal(resumed.server_state[name], value)
        for name, value in weights.items():
            np.testing.assert_array_equal(resumed.weights[name], value)
        text = resumed.metrics.exposition().decode()
        assert 'fedkube_strategy_state{job="small",quantity=' in text
        # and what it serves next carries it (SCAFFOLD's c travels with the model)
        served, _ = codec.decode(resumed.model_bytes[3])
        assert served.keys() == resumed.template.keys()
    finally:
        await resumed.stop()


async def test_a_robust_rules_full_buffer_refuses_by_name_and_the_round_still_closes(
    redis_server, tmp_path
):
    # prepare: a buffer with room for one update of the digits model per region
    job = parse_job(
        small_job_dict(
            rounds=1,
            strategy={"robust": {"rule": "median", "maxBufferBytes": 8_000}},
            participation={"minFraction": 0.5, "roundTimeoutSeconds": 2},
        )
    )
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        sent = {client: deltas_for(tier.aggregator, i) for i, client in enumerate("abcd")}
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        # execute: a-0 and c-0 fill their regions' buffers; b-0 and d-0 find them full
        answers = {c: await tier.send(f"{c}-0", 1, sent[c]) for c in "abcd"}
        await tier.wait_closed(1)
        # assert: named refusals, counted; the round closed at its deadline on quorum
        assert answers["a"][0] == answers["c"][0] == 200
        for refused in (answers["b"], answers["d"]):
            assert refused[0] == 503 and refused[1]["error"] == "buffer_full"
            assert "maxBufferBytes=8000" in refused[1]["detail"]
        assert rejected(await tier.metrics("eu"), "buffer_full") == 1
        record = (await tier.aggregator.store.history())[0]
        assert record["reported"] == 2 and record["robust"] == "median"
        saved = checkpoint.load_latest(tier.checkpoints, job.name)
        assert saved is not None
        for name in start:  # each region's median of one update is that update
            expected = start[name] + (sent["a"][name] + sent["c"][name]) / 2
            np.testing.assert_allclose(saved.weights[name], expected, rtol=1e-5, atol=1e-6)
