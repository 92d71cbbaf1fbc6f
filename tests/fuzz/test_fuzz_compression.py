"""Compressed updates and models (fedkube.wire.compression): parsed, or refused by reason.

A tenant chooses every tensor of its update and every string of its
metadata; the receiver checks them against the model's shapes and the job's
scheme. Inputs are real fp16, int8 and top-k payloads made by the sender's
own encoder, then broken: retyped, reshaped, truncated, renamed, given NaN,
negative or huge scales, indices out of order, out of range or too many.
Whatever :func:`parse` accepts must fold into a float32 sum as finite values
of the model's sizes.
"""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedkube.errors import CodecError, UpdateRejected
from fedkube.spec import WireCompression
from fedkube.wire import codec, compression
from tests.fuzz.properties import deep_json_text, json_values, refused_by_name, scaled

shapes_maps = st.dictionaries(
    st.text(alphabet="abcdefgh.", min_size=1, max_size=6),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    min_size=1,
    max_size=3,
)
schemes = st.one_of(
    st.builds(WireCompression, scheme=st.sampled_from(["none", "fp16"])),
    st.builds(
        WireCompression,
        scheme=st.just("int8"),
        block_size=st.sampled_from([None, 16, 32]),
        stochastic_rounding=st.booleans(),
    ),
    st.builds(WireCompression, scheme=st.just("topk"), fraction=st.sampled_from([0.01, 0.3, 1.0])),
)
finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def updates(draw: st.DrawFn) -> tuple[dict, dict, dict, dict, WireCompression]:
    """(wire tensors, metadata, shapes, what the receiver should decode, the scheme)."""
    shapes = draw(shapes_maps)
    tensors = {
        name: draw(hnp.arrays(np.float32, shape, elements=finite32))
        for name, shape in shapes.items()
    }
    scheme = draw(schemes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    wire, meta, decoded = compression.encode(tensors, scheme, rng)
    return wire, meta, shapes, decoded, scheme


def parsed_or_refused(tensors, metadata, shapes, scheme) -> dict | None:
    """The property: parts that fold as finite float32 values of the model's sizes, or a reason."""
    try:
        parts = compression.parse(tensors, metadata, shapes, scheme)
    except UpdateRejected as exc:
        refused_by_name(exc)
        return None
    assert parts.keys() == shapes.keys()
    for name, part in parts.items():
        assert part.size == math.prod(shapes[name]), name
        dense = part.dense()
        assert dense.dtype == np.float32 and np.isfinite(dense).all(), name
        total = np.zeros(part.size, np.float32)
        part.fold_into(total, np.float32(0.5))
        # The norm of finite float32 values near 3e38 overflows float32 (as their sum with
        # another update would): only NaN, which no clipping can handle, is wrong.
        with np.errstate(over="ignore"):
            squared = part.squared_norm()
        assert np.isfinite(total).all() and not math.isnan(squared), name
    return parts


# -- accepted: what the sender's encoder makes ------------------------------------------------
@given(updates())
def test_every_update_the_encoder_makes_parses_to_what_the_sender_decoded(case):
    # prepare
    wire, meta, shapes, decoded, scheme = case
    # execute
    parts = parsed_or_refused(wire, meta, shapes, scheme)
    # assert: the receiver folds exactly the values the sender's error feedback assumed
    assert parts is not None
    for name, shape in shapes.items():
        np.testing.assert_array_equal(parts[name].dense().reshape(shape), decoded[name])


# -- refused by reason: the tensors or the metadata broken -----------------------------------
ODD_VALUES = [np.nan, np.inf, -np.inf, -1.0, 0.0, 3e38, 6.5e4, -3e38]


@st.composite
def broken_updates(draw: st.DrawFn) -> tuple[dict, dict, dict, WireCompression]:
    wire, meta, shapes, _decoded, scheme = draw(updates())
    wire, meta = dict(wire), dict(meta)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        how = draw(
            st.sampled_from(
                ["value", "dtype", "shape", "size", "drop", "extra", "meta", "index", "scheme"]
            )
        )
        name = draw(st.sampled_from(sorted(wire))) if wire else None
        array = wire[name] if name is not None else None
        if how == "value" and array is not None and array.size:
            array = array.copy().reshape(-1)
            position = draw(st.integers(0, array.size - 1))
            with np.errstate(all="ignore"):
                array[position] = np.array(draw(st.sampled_from(ODD_VALUES))).astype(array.dtype)
            wire[name] = array.reshape(wire[name].shape)
        elif how == "dtype" and array is not None:
            dtype = draw(st.sampled_from(["float64", "float32", "float16", "int32", "int8", "u1"]))
            with np.errstate(all="ignore"):
                wire[name] = array.astype(dtype)
        elif how == "shape" and array is not None:
            wire[name] = array.reshape((1, *array.shape)) if draw(st.booleans()) else array.ravel()
        elif how == "size" and array is not None:
            flat = array.reshape(-1)
            cut = draw(st.integers(0, flat.size + 3))
            wire[name] = np.resize(flat, cut) if cut else flat[:0]
        elif how == "drop" and name is not None:
            del wire[name]
        elif how == "extra":
            wire[draw(st.text(max_size=8))] = np.zeros(draw(st.integers(0, 3)), np.float32)
        elif how == "meta":
            key = draw(st.sampled_from([compression.SCHEME_KEY, compression.BLOCK_KEY, "x"]))
            meta[key] = draw(
                st.sampled_from(["none", "fp16", "int8", "topk", "", "-16", "16", "1e3"])
                | st.text(max_size=6)
            )
        elif how == "index" and "topk/index" in wire:
            index = wire["topk/index"].astype(np.int64)
            total = sum(math.prod(s) for s in shapes.values())
            change = draw(st.sampled_from(["swap", "repeat", "out", "more"]))
            if change == "swap" and index.size > 1:
                index[[0, -1]] = index[[-1, 0]]
            elif change == "repeat" and index.size > 1:
                index[1] = index[0]
            elif change == "out" and index.size:
                index[-1] = draw(st.sampled_from([total, -1, 2**31 - 1, -(2**31)]))
            elif change == "more":
                extra = draw(st.integers(1, 4))
                start = index[-1] + 1 if index.size else 0
                index = np.concatenate([index, start + np.arange(extra)])
                if "topk/value" in wire:
                    wire["topk/value"] = np.resize(wire["topk/value"], index.size)
            wire["topk/index"] = index.astype(np.int32)
        elif how == "scheme":
            scheme = draw(schemes)
    return wire, meta, shapes, scheme


@given(broken_updates())
def test_a_broken_compressed_update_is_parsed_or_refused_by_reason(case):
    parsed_or_refused(*case)


@given(updates(), st.data())
def test_broken_bytes_of_a_compressed_update_are_refused_by_the_codec_or_the_parser(case, data):
    # prepare: the update as it travels, with bytes flipped or cut
    wire, meta, shapes, _decoded, scheme = case
    payload = bytearray(codec.encode(wire, meta))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(payload) - 1))
        if data.draw(st.booleans()):
            payload[where] ^= data.draw(st.integers(1, 255))
        else:
            del payload[where:]
            if not payload:
                break
    # execute / assert
    try:
        tensors, metadata = codec.decode(bytes(payload))
    except CodecError as exc:
        assert str(exc).strip()
        return
    parsed_or_refused(tensors, metadata, shapes, scheme)


# -- a compressed model: its shapes come from its own metadata -------------------------------
@st.composite
def models(draw: st.DrawFn) -> tuple[dict, dict, WireCompression]:
    shapes = draw(shapes_maps)
    tensors = {
        name: draw(hnp.arrays(np.float32, shape, elements=finite32))
        for name, shape in shapes.items()
    }
    scheme = draw(schemes.filter(lambda s: s.scheme != "topk"))  # the spec refuses topk down
    wire, meta, _decoded = compression.encode(tensors, scheme, np.random.default_rng(0), True)
    if scheme.scheme in ("int8",) and draw(st.booleans()):
        document = json.loads(meta[compression.SHAPES_KEY])
        meta[compression.SHAPES_KEY] = draw(
            st.one_of(
                json_values.map(json.dumps),
                deep_json_text,
                st.just(json.dumps({k: [-1] + v for k, v in document.items()})),
                st.just(json.dumps({k: [1e999] for k in document})),
                st.just(json.dumps({k: [True] * len(v) for k, v in document.items()})),
                st.just(json.dumps({k: [float(d) for d in v] for k, v in document.items()})),
            )
        )
    return wire, meta, scheme


@scaled(0.5)
@given(models())
def test_a_model_whose_shapes_are_broken_is_made_dense_or_refused_by_reason(case):
    # prepare
    wire, meta, scheme = case
    # execute
    try:
        parts, shapes = compression.parse_model(wire, meta, scheme)
        dense = compression.dense(parts, shapes)
    except UpdateRejected as exc:
        refused_by_name(exc)
        return
    # assert: the model the worker gets has the shapes its metadata claims
    for name, shape in shapes.items():
        assert dense[name].shape == tuple(shape) and dense[name].dtype == np.float32
