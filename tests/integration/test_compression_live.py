"""Compressed updates through the real tiers: HTTP, Redis, combiner folds, a run.

The in-process tier takes hand-made int8 and top-k updates, so the exact
aggregate can be checked against what each sender says it sent; ``fedkube
run`` then trains with top-k up and int8 down, error feedback in each
client's durable state.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedkube.aggregator.strategies.fedavg import flat_fedavg
from fedkube.aggregator.strategies.sums import apply_delta
from fedkube.local.runner import RunOptions, run_job
from fedkube.spec import WireCompression, parse_job
from fedkube.state import checkpoint
from fedkube.wire import codec, compression
from fedkube.wire.protocol import Envelope
from fedkube.workers.client_state import ClientState
from fedkube.workers.pipeline import RESIDUAL_STATE
from tests.integration.test_services import deltas_for, rejected, running_tier
from tests.support import small_job_dict

pytestmark = pytest.mark.integration

CLIENTS = ["a-0", "b-0", "c-0", "d-0"]


@pytest.mark.parametrize(
    "up",
    [
        WireCompression(scheme="int8", block_size=64),
        WireCompression(scheme="topk", fraction=0.05),
    ],
    ids=["int8", "topk"],
)
async def test_compressed_updates_fold_exactly_and_a_malformed_one_is_refused_by_name(
    redis_server, tmp_path, up
):
    # prepare: the job compresses updates (and sends the model as fp16)
    compressed = {"up": up.model_dump(by_alias=True), "down": {"scheme": "fp16"}}
    job = parse_job(
        small_job_dict(
            rounds=1,
            participation={"minFraction": 1.0, "roundTimeoutSeconds": 20},
            compression=compressed,
        )
    )
    weights = {"a-0": 10.0, "b-0": 30.0, "c-0": 5.0, "d-0": 55.0}
    async with running_tier(job, redis_server.url, tmp_path / "ckpt") as tier:
        await tier.wait_round(1)
        start = {k: v.copy() for k, v in tier.aggregator.weights.items()}
        sent: dict[str, dict[str, np.ndarray]] = {}
        bodies: dict[str, bytes] = {}
        for i, client in enumerate(CLIENTS):
            wire, meta, sent[client] = compression.encode(
                deltas_for(tier.aggregator, i), up, np.random.default_rng(i)
            )
            envelope = Envelope(job.name, 1, client, client[0], weights[client])
            bodies[client] = codec.encode(wire, {**envelope.metadata("update"), **meta})
        # a client that sends dense when the job says compressed
        envelope = Envelope(job.name, 1, "a-0", "a", weights["a-0"])
        dense = codec.encode(deltas_for(tier.aggregator, 0), envelope.metadata("update"))
        # execute
        refused = await tier.send("a-0", 1, dense, weight=weights["a-0"])
        for client in CLIENTS:
            status, _ = await tier.send(client, 1, bodies[client], weight=weights[client])
            assert status == 200, client
        await tier.wait_closed(1)
        eu = await tier.metrics("eu")
    # assert
    assert refused[0] == 400 and refused[1]["error"] == "metadata_mismatch"
    assert "compression 'none'" in refused[1]["detail"]
    assert rejected(eu, "metadata_mismatch") == 1
    expected = apply_delta(start, flat_fedavg(list(sent.values()), list(weights.values())), 1.0)
    saved = checkpoint.load_latest(tmp_path / "ckpt", job.name)
    assert saved is not None
    for name in expected:
        np.testing.assert_allclose(saved.weights[name], expected[name], rtol=1e-5, atol=1e-6)
    # the round's bytes are the compressed bodies as they travelled
    record = (await tier.aggregator.store.history())[0]
    assert record["bytes_up"] == sum(len(body) for body in bodies.values())


def test_a_run_with_topk_up_and_int8_down_learns_and_keeps_each_clients_residual(tmp_path):
    # prepare
    document = small_job_dict(
        rounds=4,
        training={"epochs": 3, "batchSize": 16, "learningRate": 0.1},
        compression={"up": {"scheme": "topk", "fraction": 0.1}, "down": {"scheme": "int8"}},
    )
    manifest = tmp_path / "small.yaml"
    manifest.write_text(yaml.safe_dump(document))
    # execute
    result = run_job(RunOptions(job_path=manifest, out_dir=tmp_path / "run", quiet=True))
    # assert: it trains, every update is a fraction of the dense one, residuals are kept
    assert result.status == "succeeded", result.message
    first, last = result.history[0], result.history[-1]
    # (measured: 12 % -> 63 %; uncompressed, this job goes 14 % -> 81 %)
    assert last["accuracy"] > first["accuracy"] + 0.25
    saved = checkpoint.load_latest(tmp_path / "run" / "checkpoints", "small")
    assert saved is not None
    dense = len(codec.encode(saved.weights, {}))
    assert last["bytes_up"] / last["reported"] < 0.25 * dense  # 10 % kept, 6 B each
    # int8 and its header (shapes included) for a 1,600-parameter model: 30 %
    assert last["bytes_down"] / last["reported"] < 0.35 * dense
    for client in CLIENTS:
        state = ClientState(tmp_path / "run" / "clients" / client, "small", client)
        residual = state.load(RESIDUAL_STATE, before_round=5)
        assert residual is not None and residual.keys() == saved.weights.keys()
        assert any(np.abs(r).sum() > 0 for r in residual.values())
