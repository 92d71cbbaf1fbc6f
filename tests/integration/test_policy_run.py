"""Site policy on real processes: ``fedkube run --policy``, and a site's refusal
reaching the round logic through the combiner (real Redis, real HTTP)."""

from __future__ import annotations

import asyncio
import re
import stat
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from fedkube.aggregator.global_aggregator import rounds
from fedkube.spec import parse_job
from tests.integration.test_services import client_headers, start_combiner, start_global
from tests.support import fedkube_cli, small_job_dict

pytestmark = pytest.mark.integration


def test_a_refused_tenant_is_not_started_and_a_bound_tenant_reads_the_sites_file(
    job_file, tmp_path: Path
):
    tenants = [
        {"name": "a", "region": "eu"},
        {"name": "b", "region": "eu"},
        {"name": "c", "region": "us"},
        {"name": "d", "region": "us", "resources": {"gpu": 1}},
    ]
    manifest = job_file(rounds=2, tenants=tenants)
    data = tmp_path / "a.npz"
    digits = load_digits()
    np.savez(data, x=(digits.data[:300] / 16.0).astype(np.float32), y=digits.target[:300])
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "maxGpus": 0,
                "dataBindings": {
                    "a": {"entrypoint": "fedkube.datasets:load_npz", "kwargs": {"path": str(data)}}
                },
            }
        )
    )
    out = tmp_path / "run"
    done = fedkube_cli("run", str(manifest), "--out", str(out), "--policy", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tenant d refused by the policy: spec.tenants[3].resources.gpu asks 1 GPUs" in (
        done.stderr
    )
    # d is absent from every round; a, b and c trained (a on the site's own file).
    assert re.search(r"round\s+2/2\s+clients 3/3", done.stdout), done.stdout
    assert not (out / "logs" / "worker-d-0.log").exists()
    binding = out / "secrets" / "bindings" / "a.json"
    assert str(data) in binding.read_text()
    assert stat.S_IMODE(binding.stat().st_mode) == 0o600
    assert str(data) not in manifest.read_text()


async def test_a_sites_refusal_reaches_the_round_logic_through_the_combiner(
    redis_server, tmp_path: Path
):
    # prepare: 4 clients, quorum 3; tenants c and d (region us) are refused at their site
    job = parse_job(
        small_job_dict(rounds=1, participation={"minClients": 3, "startTimeoutSeconds": 30})
    )
    aggregator = await start_global(job, redis_server.url, tmp_path / "ckpt")
    combiner = await start_combiner(job, "us", redis_server.url, aggregator)
    url = f"http://127.0.0.1:{combiner.port}/v1/refusal"
    try:
        async with aiohttp.ClientSession() as http:
            # execute: a refusal must carry the tenant's token
            forged = client_headers("d-0", token="not-the-token")
            async with http.post(url, json={"message": "no"}, headers=forged) as reply:
                assert reply.status == 401
            assert await aggregator.store.refused_tenants() == {}
            for tenant in ("c", "d"):
                headers = client_headers(f"{tenant}-0")
                message = f"spec.data.entrypoint 'os:system' is not allowed at site s-{tenant}"
                async with http.post(url, json={"message": message}, headers=headers) as reply:
                    assert reply.status == 200
            status = await asyncio.wait_for(aggregator.run(), timeout=20)
        # assert: it fails at once (no start timeout), naming both tenants and why
        info = await aggregator.store.job_info()
        assert status == "failed"
        assert "quorum is 3 of the 4 selected clients, but only 2 can take part" in info["message"]
        assert (
            "tenant c: spec.data.entrypoint 'os:system' is not allowed at site s-c"
            in (info["message"])
        )
        assert "tenant d:" in info["message"]
    finally:
        await combiner.stop()
        await aggregator.stop()


async def test_a_refused_tenant_is_left_out_of_the_round_but_counts_in_its_quorum(
    redis_server, tmp_path: Path
):
    job = parse_job(small_job_dict(rounds=1, participation={"minClients": 3}))
    aggregator = await start_global(job, redis_server.url, tmp_path / "ckpt")
    try:
        await aggregator.store.record_refusal("d", "not here")
        for client in ("a-0", "b-0", "c-0"):
            await aggregator.store.register_clients([client])
        info = await asyncio.wait_for(rounds.open_round(aggregator, 1), timeout=10)
        assert await aggregator.store.selected(1) == {"a-0", "b-0", "c-0"}
        assert info.quorum == 3
        # A fresh start of the aggregator keeps the sites' refusals and the clients'
        # registrations (the combiners that wrote them will not rewrite them for a while).
        await aggregator.store.delete_all(keep_live=True)
        assert await aggregator.store.refused_tenants() == {"d": "not here"}
        registered = await aggregator.store.registered_clients(60, ["a-0", "b-0", "c-0"])
        assert registered == {"a-0", "b-0", "c-0"}
    finally:
        await aggregator.stop()
