"""The wire codecs: what each scheme sends, what the receiver checks, how it folds."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.strategies.sums import WeightedSum
from fedkube.errors import UpdateRejected
from fedkube.spec import WireCompression
from fedkube.wire import codec, compression

SHAPES = {"w": (64, 33), "b": (33,), "tiny": (3,)}


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def roundtrip(
    tensors: dict[str, np.ndarray], scheme: WireCompression, seed: int = 0
) -> tuple[dict[str, compression.Part], dict[str, np.ndarray], bytes]:
    """Encode, serialise, parse back: the receiver's parts and the sender's reconstruction."""
    wire, meta, decoded = compression.encode(tensors, scheme, np.random.default_rng(seed))
    body = codec.encode(wire, meta)
    received, received_meta = codec.decode(body)
    parts = compression.parse(received, received_meta, SHAPES, scheme)
    return parts, decoded, body


@pytest.mark.parametrize(
    "scheme",
    [
        WireCompression(),
        WireCompression(scheme="fp16"),
        WireCompression(scheme="int8"),
        WireCompression(scheme="int8", block_size=256),
        WireCompression(scheme="int8", block_size=16),
        WireCompression(scheme="int8", block_size=64, stochastic_rounding=True),
        WireCompression(scheme="topk", fraction=0.05),
    ],
    ids=["none", "fp16", "int8", "int8-block", "int8-small-block", "int8-stochastic", "topk"],
)
def test_the_receiver_folds_exactly_what_the_sender_says_it_sent(scheme):
    # prepare
    tensors = update()
    parts, decoded, _ = roundtrip(tensors, scheme)
    total = WeightedSum.zeros_like(tensors)
    # execute: fold twice with different weights, as two clients would
    total.fold(parts, 2.0)
    total.fold(parts, 3.0)
    # assert: 5 × the sender's reconstruction, without a dense copy per update
    for name in SHAPES:
        np.testing.assert_allclose(total.sums[name], 5 * decoded[name], rtol=1e-6, atol=1e-6)
        assert parts[name].dense().reshape(SHAPES[name]) == pytest.approx(decoded[name])


def test_each_scheme_costs_what_its_table_says():
    rng = np.random.default_rng(1)
    tensors = {
        "w": rng.standard_normal((100, 256)).astype(np.float32),
        "b": rng.standard_normal(256).astype(np.float32),
        "v": rng.standard_normal((256, 10)).astype(np.float32),
        "c": rng.standard_normal(10).astype(np.float32),
    }
    dense = len(codec.encode(tensors, {}))

    def size(scheme: WireCompression) -> float:
        wire, meta, _ = compression.encode(tensors, scheme, np.random.default_rng(0))
        return len(codec.encode(wire, meta)) / dense

    # a 28,426-parameter model, four tensors: the header is a few hundred bytes
    assert size(WireCompression(scheme="fp16")) == pytest.approx(0.5, abs=0.01)
    assert 1 / size(WireCompression(scheme="int8")) > 3.9
    assert size(WireCompression(scheme="int8", block_size=1024)) < 0.26
    assert size(WireCompression(scheme="topk", fraction=0.01)) < 0.0185


def test_int8_error_is_within_half_a_step_and_stochastic_rounding_is_unbiased():
    # prepare: one value between two int8 steps, many times
    x = {"w": np.full(20_000, 0.3, np.float32), "b": np.zeros(1, np.float32)}
    x["w"][0] = 127.0  # the scale: one step is exactly 1.0
    nearest = WireCompression(scheme="int8", block_size=None)
    stochastic = WireCompression(scheme="int8", stochastic_rounding=True)
    # execute
    _, _, rounded = compression.encode(x, nearest, np.random.default_rng(0))
    _, _, random = compression.encode(x, stochastic, np.random.default_rng(0))
    # assert: nearest rounds 0.3 to 0; stochastic is 1 three times in ten on average
    assert np.abs(rounded["w"] - x["w"]).max() <= 0.5
    assert set(np.unique(random["w"][1:])) == {0.0, 1.0}
    assert random["w"][1:].mean() == pytest.approx(0.3, abs=0.02)


def test_topk_keeps_the_largest_entries_in_increasing_index_order():
    # "a" comes first in the flat vector (sorted names), then "b"
    a, b = np.zeros(1000, np.float32), np.zeros(10, np.float32)
    a[[5, 900, 17]] = [-4.0, 3.0, 2.0]
    a[400] = 0.5
    b[2] = -5.0
    wire, _, decoded = compression.encode(
        {"b": b, "a": a}, WireCompression(scheme="topk", fraction=0.0035), np.random.default_rng(0)
    )
    assert wire["topk/index"].tolist() == [5, 17, 900, 1002]
    assert wire["topk/value"].tolist() == [-4.0, 2.0, 3.0, -5.0]
    assert decoded["a"][400] == 0.0 and decoded["a"][5] == -4.0 and decoded["b"][2] == -5.0


def topk_update(fraction: float = 0.1) -> tuple[dict, dict, WireCompression]:
    scheme = WireCompression(scheme="topk", fraction=fraction)
    wire, meta, _ = compression.encode(update(), scheme, np.random.default_rng(0))
    return wire, meta, scheme


@pytest.mark.parametrize(
    ("tamper", "reason", "words"),
    [
        (
            lambda w: w.update({"topk/index": w["topk/index"][::-1].copy()}),
            "malformed",
            "increasing",
        ),
        (lambda w: w.update({"topk/index": w["topk/index"] + 3000}), "malformed", "[0, 2148)"),
        (lambda w: w["topk/index"].__setitem__(1, w["topk/index"][0]), "malformed", "increasing"),
        (lambda w: w.update({"topk/value": w["topk/value"].astype(np.float32)}), "wrong_dtype", ""),
        (lambda w: w.update({"topk/value": w["topk/value"][:-1]}), "wrong_shape", "indices"),
        (lambda w: w.pop("topk/index"), "wrong_shape", "missing ['topk/index']"),
        (lambda w: w.update({"extra": np.zeros(1, np.float32)}), "wrong_shape", "unexpected"),
        (lambda w: w["topk/value"].__setitem__(0, np.inf), "non_finite", "topk/value"),
    ],
    ids=[
        "unsorted",
        "out-of-range",
        "repeated",
        "values-dtype",
        "count-mismatch",
        "missing",
        "extra",
        "inf",
    ],
)
def test_a_malformed_topk_update_is_refused_by_name(tamper, reason, words):
    wire, meta, scheme = topk_update()
    wire = {name: array.copy() for name, array in wire.items()}
    tamper(wire)
    with pytest.raises(UpdateRejected) as refused:
        compression.parse(wire, meta, SHAPES, scheme)
    assert refused.value.reason == reason and words in refused.value.detail


def test_a_topk_update_with_more_entries_than_its_fraction_is_refused_as_oversized():
    wire, meta, _ = topk_update(fraction=0.5)
    with pytest.raises(UpdateRejected) as refused:
        compression.parse(wire, meta, SHAPES, WireCompression(scheme="topk", fraction=0.1))
    assert refused.value.reason == "oversized" and "allows 215" in refused.value.detail


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda w, m: w.update({"int8/scale": -w["int8/scale"]}), "malformed"),
        # finite, but 127 · 3e38 is inf once dequantised in float32
        (lambda w, m: w["int8/scale"].__setitem__(0, 3e38), "non_finite"),
        (lambda w, m: w.update({"int8/scale": np.ones(3, np.float32)}), "wrong_shape"),
        (lambda w, m: w.update({"int8/q": w["int8/q"].astype(np.int16)}), "wrong_dtype"),
        (lambda w, m: m.update({"fedkube.int8_block": "x"}), "malformed"),
        (lambda w, m: m.update({"fedkube.int8_block": "256"}), "metadata_mismatch"),
        (lambda w, m: m.update({"fedkube.compression": "fp16"}), "metadata_mismatch"),
    ],
    ids=[
        "negative-scale",
        "huge-scale",
        "scale-count",
        "q-dtype",
        "block",
        "other-block",
        "other-scheme",
    ],
)
def test_a_malformed_int8_update_is_refused_by_name(tamper, reason):
    scheme = WireCompression(scheme="int8", block_size=128)
    wire, meta, _ = compression.encode(update(), scheme, np.random.default_rng(0))
    tamper(wire, meta)
    with pytest.raises(UpdateRejected) as refused:
        compression.parse(wire, meta, SHAPES, scheme)
    assert refused.value.reason == reason


def test_a_compressed_model_decodes_to_float32_with_the_models_shapes():
    tensors = update()
    for scheme in (WireCompression(scheme="fp16"), WireCompression(scheme="int8")):
        wire, meta, decoded = compression.encode(
            tensors, scheme, np.random.default_rng(0), with_shapes=True
        )
        shapes = compression.shapes_of(wire, meta)
        model = compression.dense(compression.parse(wire, meta, shapes, scheme), shapes)
        assert shapes == SHAPES
        for name in SHAPES:
            assert model[name].dtype == np.float32
            np.testing.assert_array_equal(model[name], decoded[name])


@pytest.mark.parametrize(
    "shapes",
    [
        '{"w": [-1], "b": [3]}',  # a negative size shifted every later tensor's slice
        '{"w": [1e999]}',  # int() of inf raised OverflowError
        '{"w": [true, 2]}',
        '{"w": [2.0]}',
        '{"w": "12"}',
        "[" * 100_000,  # json's parser raised RecursionError
    ],
    ids=["negative", "infinite", "bool", "float", "string", "nested"],
)
def test_a_compressed_model_whose_shapes_are_not_sizes_is_refused_by_name(shapes):
    # prepare: an int8 model whose metadata names its shapes
    scheme = WireCompression(scheme="int8")
    wire, meta, _ = compression.encode(update(), scheme, np.random.default_rng(0), True)
    meta[compression.SHAPES_KEY] = shapes
    # execute / assert
    with pytest.raises(UpdateRejected) as refused:
        compression.parse_model(wire, meta, scheme)
    assert refused.value.reason == "malformed" and compression.SHAPES_KEY in refused.value.detail


def test_an_empty_tensor_travels_in_int8_with_its_own_scale():
    # prepare: a model with a zero-size tensor, one scale per tensor
    tensors = {"empty": np.zeros((0, 4), np.float32), "w": np.ones(3, np.float32)}
    scheme = WireCompression(scheme="int8")
    # execute: the sender's encoder checks its own output with parse()
    wire, meta, decoded = compression.encode(tensors, scheme, np.random.default_rng(0))
    # assert
    assert wire["int8/scale"].shape == (2,)
    parts = compression.parse(wire, meta, {"empty": (0, 4), "w": (3,)}, scheme)
    np.testing.assert_array_equal(parts["w"].dense(), decoded["w"])
