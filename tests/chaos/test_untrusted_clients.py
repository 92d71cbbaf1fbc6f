"""What a client claims, and what a silent one costs: the aggregator tier in-process.

A global aggregator and the combiners run in the test's event loop against a
real redis-server; the test plays the workers. A client's sample count is a
claim that weighs its update, so the spec caps it; an update counts only if
its tenant's key signed it for that round; a client whose worker stopped
polling is no longer waited for; and a region without a running combiner is
named when the job fails for it.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import apply_delta
from fedkube.spec import parse_job
from fedkube.state import checkpoint
from fedkube.wire import signing
from fedkube.wire.protocol import H_SIGNATURE
from tests.integration.test_services import (
    Tier,
    deltas_for,
    rejected,
    running_tier,
    start_combiner,
    start_global,
)
from tests.support import region_signing_key, region_token, small_job_dict, tenant_signing_key

pytestmark = pytest.mark.integration


async def test_a_weight_above_the_spec_cap_is_refused_by_name_and_the_round_is_exact(
    redis_server, tmp_path
):
    # prepare: every client may claim at most 100 samples, tenant d at most 20
    document = small_job_dict(
        rounds=1, participation={"maxWeight": 100, "minFraction": 1.0, "roundTimeoutSeconds": 20}
    )
    document["spec"]["tenants"][3]["maxWeight"] = 20
    job = parse_job(document)
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        good = {
            c: deltas_for(tier.aggregator, i) for i, c in enumerate(["a-0", "b-0", "c-0", "d-0"])
        }
        weights = {"a-0": 100.0, "b-0": 30.0, "c-0": 5.0, "d-0": 20.0}
        # execute: a client claiming more than the cap, then honest claims
        over_global = await tier.send("a-0", 1, good["a-0"], weight=1e9)
        over_tenant = await tier.send("d-0", 1, good["d-0"], weight=21.0)
        for client, weight in weights.items():
            assert (await tier.send(client, 1, good[client], weight=weight))[0] == 200, client
        await tier.wait_closed(1)
        eu, us = await tier.metrics("eu"), await tier.metrics("us")
    # assert: refused by name, counted, and the round is FedAvg of the honest four
    assert over_global[0] == 400 and over_global[1]["error"] == "weight_above_cap"
    assert "cap of 100 samples for tenant 'a'" in over_global[1]["detail"]
    assert over_tenant[0] == 400 and over_tenant[1]["error"] == "weight_above_cap"
    assert "cap of 20 samples for tenant 'd'" in over_tenant[1]["detail"]
    assert rejected(eu, "weight_above_cap") == 1 and rejected(us, "weight_above_cap") == 1
    expected = apply_delta(start, flat_fedavg(list(good.values()), list(weights.values())), 1.0)
    saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
    assert saved is not None
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-7)


async def test_unsigned_replayed_or_foreign_signed_updates_are_refused_and_the_round_is_exact(
    redis_server, tmp_path
):
    # prepare: every client reports in both rounds; a-0's round-1 update (bytes and
    # signature) is kept, as someone who saw it on the wire would
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 20}
    job = parse_job(small_job_dict(rounds=2, participation=participation))
    clients = ["a-0", "b-0", "c-0", "d-0"]
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        first = {
            c: tier.encode(c, 1, deltas_for(tier.aggregator, i)) for i, c in enumerate(clients)
        }
        for client, body in first.items():
            assert (await tier.post(client, 1, body, tier.sign(client, 1, body)))[0] == 200
        captured = first["a-0"], tier.sign("a-0", 1, first["a-0"])
        await tier.wait_round(2)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        good = {c: deltas_for(tier.aggregator, 10 + i) for i, c in enumerate(clients)}
        honest = {c: tier.encode(c, 2, good[c]) for c in clients}
        # execute: a-0's token with no signature, with a malformed one, with tenant b's key;
        # b's token (stolen) with a's key; a's round-1 update replayed in round 2; a's
        # signature on another body. Then the honest updates.
        refused = {
            "unsigned": await tier.post("a-0", 2, honest["a-0"], None),
            "malformed": await tier.post("a-0", 2, honest["a-0"], "not-a-signature"),
            "b's key": await tier.post(
                "a-0", 2, honest["a-0"], tier.sign("a-0", 2, honest["a-0"], signer="b")
            ),
            "posing as b": await tier.post(
                "b-0", 2, honest["b-0"], tier.sign("b-0", 2, honest["b-0"], signer="a")
            ),
            "replayed": await tier.post("a-0", 2, *captured),
            "other body": await tier.post(
                "a-0", 2, first["a-0"], tier.sign("a-0", 2, honest["a-0"])
            ),
        }
        for client, body in honest.items():
            assert (await tier.post(client, 2, body, tier.sign(client, 2, body)))[0] == 200
        await tier.wait_closed(2)
        eu, us = await tier.metrics("eu"), await tier.metrics("us")
        record = (await tier.aggregator.store.history())[1]
    # assert: each refused by name, saying which key and what it was checked for
    for case, (status, answer) in refused.items():
        assert (status, answer["error"]) == (403, "bad_signature"), (case, answer)
    assert "no X-Fedkube-Signature header" in refused["unsigned"][1]["detail"]
    assert "not an Ed25519 signature" in refused["malformed"][1]["detail"]
    for case, tenant, client in [
        ("b's key", "a", "a-0"),
        ("posing as b", "b", "b-0"),
        ("replayed", "a", "a-0"),
        ("other body", "a", "a-0"),
    ]:
        expected = f"with the key of tenant '{tenant}' for job small, round 2, client {client}"
        assert expected in refused[case][1]["detail"], case
    assert rejected(eu, "bad_signature") == 6 and rejected(us, "bad_signature") == 0
    # ... and none of them touched the round: it is FedAvg of the four honest updates
    assert record["round"] == 2 and record["reported"] == 4
    expected = apply_delta(start, flat_fedavg(list(good.values()), [10.0] * 4), 1.0)
    saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
    assert saved is not None and saved.round == 2
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-7)


async def test_a_client_whose_worker_stopped_polling_is_not_waited_for(redis_server, tmp_path):
    # prepare: d-0 polled once, 31 s ago, and fell silent (its registration expired)
    participation = {"minFraction": 0.5, "roundTimeoutSeconds": 60, "registrationTtlSeconds": 30}
    job = parse_job(small_job_dict(rounds=1, participation=participation))
    aggregator = await start_global(job, redis_server.url, tmp_path / "ckpt")
    combiners = {
        r: await start_combiner(job, r, redis_server.url, aggregator) for r in ("eu", "us")
    }
    try:
        async with aiohttp.ClientSession() as http:
            tier = Tier(job, aggregator, combiners, None, http, tmp_path / "ckpt")
            for client in ["a-0", "b-0", "c-0"]:
                await tier.register(client)
            store = aggregator.store
            await store.redis.hset(store.key("clients"), "d-0", time.time() - 31)
            # execute: the three live clients report
            run = asyncio.create_task(aggregator.run())
            await tier.wait_round(1)
            for i, client in enumerate(["a-0", "b-0", "c-0"]):
                assert (await tier.send(client, 1, deltas_for(aggregator, i)))[0] == 200
            # assert: the round closes on them, long before its 60 s deadline
            status = await asyncio.wait_for(run, timeout=30)
            assert status == "succeeded"
            assert await store.selected(1) == {"a-0", "b-0", "c-0"}
            assert (await store.history())[0]["reported"] == 3
    finally:
        for combiner in combiners.values():
            await combiner.stop()
        await aggregator.stop()


async def test_a_round_that_cannot_reach_quorum_names_the_region_without_a_combiner(
    redis_server, tmp_path
):
    # prepare: every client is needed; region us has no combiner running
    # (its clients registered before it died)
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 1, "onQuorumMissed": "fail"}
    job = parse_job(small_job_dict(rounds=1, participation=participation))
    aggregator = await start_global(job, redis_server.url, tmp_path / "ckpt")
    eu = await start_combiner(job, "eu", redis_server.url, aggregator)
    try:
        async with aiohttp.ClientSession() as http:
            tier = Tier(job, aggregator, {"eu": eu}, None, http, tmp_path / "ckpt")
            for client in ["a-0", "b-0"]:
                await tier.register(client)
            for client in ["c-0", "d-0"]:
                await aggregator.store.register_clients([client])
            # execute
            run = asyncio.create_task(aggregator.run())
            await tier.wait_round(1)
            for i, client in enumerate(["a-0", "b-0"]):
                assert (await tier.send(client, 1, deltas_for(aggregator, i)))[0] == 200
            status = await asyncio.wait_for(run, timeout=30)
        # assert: the job failed with a message that names the region
        info = await aggregator.store.job_info()
        assert status == "failed"
        assert info["message"] == (
            "round 1: 2 of 4 selected clients reported, quorum is 4 (after 0 deadline "
            "extensions); region us has no running combiner (its lease lapsed)"
        )
    finally:
        await eu.stop()
        await aggregator.stop()


async def post_partial(
    tier: Tier, region: str, token: str, body: bytes, signature: str | None
) -> tuple[int, dict]:
    """POST a partial for ``region`` to the global tier, as a combiner holding ``token`` would."""
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Fedkube-Job": tier.job.name,
        "X-Fedkube-Round": "1",
        "X-Fedkube-Region": region,
        "X-Fedkube-Codec": "safetensors",
        **({H_SIGNATURE: signature} if signature is not None else {}),
    }
    url = f"http://127.0.0.1:{tier.aggregator.port}/v1/partial"
    async with tier.http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def sign_partial(region: str, body: bytes, signer: str | None = None) -> str:
    """A partial's signature made with region ``signer``'s key (default: its own)."""
    key = signing.load_signing_key(region_signing_key(signer or region), "test")
    digest = signing.payload_digest([body])
    return signing.sign_partial(key, "small", 1, region, digest)


async def test_a_combiners_credential_posts_only_its_own_regions_partial_signed_by_its_key(
    redis_server, tmp_path
):
    # prepare: round 1 open, both combiners running; a partial body as us would send it
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 20}
    job = parse_job(small_job_dict(rounds=1, participation=participation))
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        body = b"a partial's bytes"
        # execute: eu's token posting us's partial; us's token with eu's signature, with
        # none, with an update's signature (another domain); a token of no region
        key_a = signing.load_signing_key(tenant_signing_key("a"), "test")
        update_signature = signing.sign(key_a, "small", 1, "us", signing.payload_digest([body]))
        refused = {
            "eu's credential": await post_partial(
                tier, "us", region_token("eu"), body, sign_partial("us", body)
            ),
            "eu's key": await post_partial(
                tier, "us", region_token("us"), body, sign_partial("us", body, signer="eu")
            ),
            "unsigned": await post_partial(tier, "us", region_token("us"), body, None),
            "an update's signature": await post_partial(
                tier, "us", region_token("us"), body, update_signature
            ),
            "no region's token": await post_partial(
                tier, "us", "tok-c", body, sign_partial("us", body)
            ),
        }
        # ... then the honest round
        clients = ["a-0", "b-0", "c-0", "d-0"]
        good = {c: deltas_for(tier.aggregator, i) for i, c in enumerate(clients)}
        for client, delta in good.items():
            assert (await tier.send(client, 1, delta))[0] == 200
        await tier.wait_closed(1)
        metrics = await tier.aggregator_metrics()
    # assert: each refused by name, before a byte of it was decoded
    assert refused["eu's credential"][0] == 403
    assert refused["eu's credential"][1]["error"] == "wrong_region"
    assert (
        "credential of region 'eu' cannot send region 'us'"
        in refused["eu's credential"][1]["detail"]
    )
    for case in ("eu's key", "unsigned", "an update's signature"):
        assert refused[case][0] == 403 and refused[case][1]["error"] == "bad_signature", case
    assert "with the key of region 'us'" in refused["eu's key"][1]["detail"]
    assert refused["no region's token"][0] == 401
    assert 'reason="wrong_region"' in metrics and 'reason="bad_signature"' in metrics
    # ... and the round is FedAvg of the four clients, from the two honest partials
    expected = apply_delta(start, flat_fedavg(list(good.values()), [10.0] * 4), 1.0)
    saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
    assert saved is not None and saved.round == 1
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-7)
