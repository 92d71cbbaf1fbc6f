"""Tensor payloads: safetensors in, read-only views out, garbage refused."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from fedkube.errors import CodecError
from fedkube.wire import codec


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": np.arange(4, dtype=np.float32),
        "steps": np.array([7], dtype=np.int64),
    }


def test_roundtrip_keeps_values_dtypes_and_metadata():
    data = codec.encode(sample(), {"fedkube.job": "j", "fedkube.round": "3"})
    tensors, meta = codec.decode(data)
    for name, array in sample().items():
        np.testing.assert_array_equal(tensors[name], array)
        assert tensors[name].dtype == array.dtype
    assert meta == {"fedkube.job": "j", "fedkube.round": "3"}


def test_our_bytes_are_standard_safetensors():
    loaded = st_load(codec.encode(sample(), {}))
    np.testing.assert_array_equal(loaded["w"], sample()["w"])


def test_every_kind_of_array_we_encode_loads_with_the_safetensors_library():
    # prepare: a scalar, an empty tensor, a transposed (non-contiguous) view,
    # big-endian floats, half floats, bytes and booleans
    arrays = {
        "scalar": np.float32(2.5).reshape(()),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "big_endian": np.arange(4, dtype=">f4"),
        "half": np.linspace(0, 1, 5, dtype=np.float16),
        "int8": np.arange(-3, 3, dtype=np.int8).reshape(2, 3),
        "flags": np.array([True, False, True]),
    }
    # execute
    loaded = st_load(codec.encode(arrays, {"fedkube.kind": "model"}))
    # assert
    for name, array in arrays.items():
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array)


def test_an_encoded_payload_is_sent_in_uncopied_pieces_that_add_up_to_the_bytes():
    arrays = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float32)}
    encoded = codec.encode_parts(arrays, {"fedkube.round": "2"})
    pieces = list(encoded.chunks(size=1024))
    assert b"".join(pieces) == codec.encode(arrays, {"fedkube.round": "2"})
    assert len(encoded) == sum(len(p) for p in pieces) and max(len(p) for p in pieces) <= 1024
    assert np.shares_memory(np.frombuffer(pieces[1], np.float32), arrays["w"])


def test_a_dtype_without_a_safetensors_name_is_refused_by_tensor_name():
    with pytest.raises(CodecError, match="'z'.*complex64"):
        codec.encode({"z": np.zeros(2, np.complex64)}, {})


def test_decoded_arrays_are_read_only_views():
    tensors, _ = codec.decode(codec.encode(sample(), {}))
    with pytest.raises(ValueError):
        tensors["w"][0, 0] = 1.0


def header_payload(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"", "shorter"),
        (pickle.dumps({"w": [1.0, 2.0]}), "header"),
        (struct.pack("<Q", 10) + b"{not json}", "not JSON"),
        (
            header_payload({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"0000"),
            "unsupported dtype",
        ),
        (
            header_payload({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"0000"),
            "outside",
        ),
        (
            header_payload({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"0000"),
            "bytes for shape",
        ),
        (
            header_payload(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"0" * 12,
            ),
            "overlap",
        ),
        (header_payload({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload, words):
    with pytest.raises(CodecError, match=words):
        codec.decode(payload)


def test_a_header_nested_a_hundred_thousand_deep_is_refused_by_name():
    # prepare: [[[[...]]]] as the whole header; json's C parser recurses once per level
    text = b"[" * 100_000 + b"]" * 100_000
    payload = struct.pack("<Q", len(text)) + text
    # execute / assert: a CodecError naming the nesting, not a RecursionError (a 500)
    with pytest.raises(CodecError, match="nests deeper than 3 levels"):
        codec.decode(payload)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        # int64 products that wrap to 0 bytes, which an empty range would match
        ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "beyond numpy"),
        ({"dtype": "U8", "shape": [2**62, 4], "data_offsets": [0, 0]}, "beyond numpy"),
        # beyond int64 altogether (numpy raised OverflowError)
        ({"dtype": "F32", "shape": [2**70], "data_offsets": [0, 0]}, "beyond numpy"),
        # JSON true is not a dimension or an offset, though Python counts it an int
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "non-negative integers"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}, "data_offsets"),
        ({"dtype": "U8", "shape": [1] * 33, "data_offsets": [0, 1]}, "rank 33, more than 32"),
        # empty, yet numpy's reshape raised "Maximum allowed dimension exceeded"
        ({"dtype": "U8", "shape": [2**63, 0], "data_offsets": [0, 0]}, "beyond numpy's indexing"),
    ],
)
def test_a_shape_or_offset_that_would_overflow_or_mislead_numpy_is_refused_by_name(entry, words):
    with pytest.raises(CodecError, match=words):
        codec.decode(header_payload({"w": entry}, b"0000"))


def test_too_many_tensors_or_too_long_a_name_is_refused_by_name():
    # prepare
    empty = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    crowded = header_payload({str(i): empty for i in range(codec.MAX_TENSORS + 1)}, b"")
    long_name = header_payload({"n" * (codec.MAX_NAME_CHARS + 1): empty}, b"")
    # execute / assert
    with pytest.raises(CodecError, match="100001 tensors, more than 100000"):
        codec.decode(crowded)
    with pytest.raises(CodecError, match="name of 1025 characters"):
        codec.decode(long_name)


@pytest.mark.parametrize(
    "text",
    [
        b'{"w": {"dtype": "U8", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 1]}}',
        json.dumps({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode("utf-16"),
    ],
    ids=["integer-of-5000-digits", "utf-16"],
)
def test_a_header_json_cannot_read_as_utf8_json_is_refused_by_name(text):
    # json.loads raised a bare ValueError for the first, and read the second
    with pytest.raises(CodecError, match="header is not JSON"):
        codec.decode(struct.pack("<Q", len(text)) + text + b"0")


def test_a_tensor_named_like_the_metadata_is_refused_when_encoded():
    # decode() reads the header's __metadata__ entry as the metadata, never as a tensor
    with pytest.raises(CodecError, match="__metadata__"):
        codec.encode({"__metadata__": np.zeros(2, np.float32)}, {})
