"""The worker's update pipeline: trained result → Δ → DP → compression → encode → sign."""

import asyncio
import math

import numpy as np
import pytest

from fedkube.spec import Client, WireCompression, parse_job
from fedkube.task import TaskFailed
from fedkube.training.learning import LocalResult
from fedkube.training.strategy_client import CLIENT_STRATEGIES, CONTROL
from fedkube.wire import codec, compression, signing
from fedkube.wire.protocol import M_STEPS
from fedkube.workers.client_state import ClientState
from fedkube.workers.pipeline import (
    RESIDUAL_STATE,
    SCAFFOLD_STATE,
    Compressed,
    LocalUpdate,
    Privatiser,
    compress,
    compress_update,
    decode_model,
    encode_update,
    form_update,
    keep_accepted,
    round_seed,
    scaffold_start,
    sign,
)
from tests.support import small_job_dict, tenant_signing_key

TOPK = WireCompression(scheme="topk", fraction=0.25, error_feedback=True)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(4, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }


def result(steps: int = 3, examples: int = 12) -> LocalResult:
    return LocalResult(examples, {"loss": 0.5}, steps, 0.1)


def test_a_rounds_seed_is_stable_and_differs_by_client_and_round():
    assert round_seed(7, "a-0", 3) == round_seed(7, "a-0", 3)
    assert len({round_seed(7, c, n) for c in ("a-0", "b-0") for n in (1, 2)}) == 4


def test_the_update_is_the_trained_change_with_the_tasks_examples_as_weight():
    start = tensors(0)
    end = {n: w + 1.0 for n, w in start.items()}
    update = form_update(result(), start, end, CLIENT_STRATEGIES["fedavg"], "task")
    assert update.weight == 12.0 and update.steps == 3 and update.loss == 0.5
    for name in start:
        np.testing.assert_allclose(update.delta[name], 1.0, rtol=1e-6)
    assert update.keep == {}


def test_a_strategy_that_needs_steps_refuses_a_loop_that_took_none():
    start = tensors(0)
    with pytest.raises(TaskFailed, match="no torch.optim step over the model: fedprox"):
        form_update(result(steps=0), start, start, CLIENT_STRATEGIES["fedprox"], "task")
    # FedAvg does not count steps: the same result is an update.
    form_update(result(steps=0), start, start, CLIENT_STRATEGIES["fedavg"], "task")


def test_non_finite_trained_weights_are_a_task_failure_naming_the_tensor():
    start = tensors(0)
    end = dict(start, b=np.full(4, np.nan, np.float32))
    with pytest.raises(TaskFailed, match="the trained b is not finite"):
        form_update(result(), start, end, CLIENT_STRATEGIES["fedavg"], "task")


def test_scaffold_starts_from_zeros_or_a_matching_saved_variate_and_sends_delta_c():
    control = {n: np.full_like(w, 0.5) for n, w in tensors(0).items()}
    c_i, correction = scaffold_start(control, None)
    assert all((c_i[n] == 0).all() and (correction[n] == 0.5).all() for n in control)
    saved = {n: np.full_like(w, 0.25) for n, w in control.items()}
    c_i, correction = scaffold_start(control, saved)
    assert all((correction[n] == 0.25).all() for n in control)
    c_i, _ = scaffold_start(control, {"other": np.zeros(2, np.float32)})
    assert all((c_i[n] == 0).all() for n in control)

    start = tensors(0)
    end = {n: w - 0.1 for n, w in start.items()}
    update = form_update(
        result(), start, end, CLIENT_STRATEGIES["scaffold"], "task", (c_i, control)
    )
    assert set(update.delta) == set(start) | {CONTROL + n for n in start}
    new_c_i = update.keep[SCAFFOLD_STATE]
    for name in start:
        np.testing.assert_allclose(update.delta[CONTROL + name], new_c_i[name] - c_i[name])


def test_central_dp_clips_and_adds_no_noise():
    job = parse_job(
        small_job_dict(privacy={"dp": {"mode": "central", "clipNorm": 1.0, "noiseMultiplier": 1.0}})
    )
    delta = {n: 10.0 * w for n, w in tensors(1).items()}
    clipped = Privatiser(job).apply(delta)
    norm = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in clipped.values()))
    assert norm == pytest.approx(1.0, rel=1e-5)
    ratio = clipped["w"] / delta["w"]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)


def test_without_dp_the_update_passes_unchanged():
    job = parse_job(small_job_dict())
    delta = tensors(2)
    assert Privatiser(job).apply(delta) is delta


def test_topk_keeps_what_it_left_out_and_adds_it_to_the_next_update():
    delta = tensors(3)
    first = compress(delta, TOPK, None, seed=1)
    assert first.residual is not None
    shapes = {n: a.shape for n, a in delta.items()}
    meta = {k: v for k, v in first.scheme.items()}
    sent = compression.dense(compression.parse(first.wire, meta, shapes, TOPK), shapes)
    for name in delta:
        np.testing.assert_allclose(sent[name] + first.residual[name], delta[name], atol=1e-6)
    # the residual is added before choosing again; a residual of other tensors is not
    second = compress(delta, TOPK, first.residual, seed=2)
    unrelated = compress(delta, TOPK, {"x": np.ones(1, np.float32)}, seed=2)
    fresh = compress(delta, TOPK, None, seed=2)
    assert second.residual is not None and unrelated.residual is not None
    for name in delta:
        np.testing.assert_array_equal(unrelated.residual[name], fresh.residual[name])
    assert any(not np.array_equal(second.wire[k], fresh.wire[k]) for k in fresh.wire)


def test_no_compression_sends_the_delta_itself_and_keeps_nothing():
    delta = tensors(4)
    assert compress(delta, WireCompression(), None, seed=1) == Compressed(delta, {})
    no_feedback = WireCompression(scheme="topk", fraction=0.5, error_feedback=False)
    assert compress(delta, no_feedback, None, seed=1).residual is None


def test_the_residual_is_read_from_and_kept_for_the_clients_state(tmp_path):
    state = ClientState(tmp_path, "job", "a-0")
    delta = tensors(5)
    state.save(RESIDUAL_STATE, {n: np.ones_like(a) for n, a in delta.items()}, 1)
    update = LocalUpdate(delta=delta, loss=0.0, steps=1)
    compressed = compress_update(update, TOPK, state, number=2, seed=9)
    expected = compress(delta, TOPK, {n: np.ones_like(a) for n, a in delta.items()}, seed=9)
    assert update.keep[RESIDUAL_STATE].keys() == delta.keys()
    for name in delta:
        np.testing.assert_array_equal(compressed.residual[name], expected.residual[name])
    # kept only once accepted
    keep_accepted(state, update, 2)
    saved = state.load(RESIDUAL_STATE, before_round=3)
    assert saved is not None
    np.testing.assert_array_equal(saved["w"], update.keep[RESIDUAL_STATE]["w"])


def test_a_compressed_model_decodes_to_float32_and_a_plain_one_as_it_is():
    model = tensors(6)
    assert decode_model(codec.encode(model, {}), WireCompression())["w"].dtype == np.float32
    fp16 = WireCompression(scheme="fp16")
    wire, meta, _ = compression.encode(model, fp16, np.random.default_rng(0), with_shapes=True)
    decoded = decode_model(codec.encode(wire, meta), fp16)
    assert decoded["w"].dtype == np.float32
    np.testing.assert_allclose(decoded["w"], model["w"], atol=1e-2)


def test_the_encoded_update_says_who_sent_it_and_its_signature_verifies():
    client = Client("a-0", "a", "eu", 0, 1, 0, 1)
    update = LocalUpdate(delta=tensors(7), loss=0.1, steps=6, weight=30.0)
    body = encode_update("job", 4, client, update, Compressed(update.delta, {}))
    decoded, meta = codec.decode(body.tobytes())
    assert meta[M_STEPS] == "6" and meta["fedkube.client"] == "a-0"
    np.testing.assert_array_equal(decoded["w"], update.delta["w"])
    private = tenant_signing_key("a")
    key = signing.load_signing_key(private, "test")
    signature = asyncio.run(sign(key, "job", body, 4, "a-0"))
    verify = signing.load_verify_key(signing.public_key_of(private, "test"), "test")
    digest = signing.payload_digest(body.chunks())
    signing.verify(verify, signature, "job", 4, "a-0", digest, tenant="a")
