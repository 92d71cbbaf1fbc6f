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
