"""Safetensors payloads (fedkube.wire.codec): every input decodes or is refused by name.

An update's bytes are the tenant's: its header can claim any JSON, any
length, any offsets. Inputs start from payloads our encoder writes and are
then broken where a decoder is most likely to trust them: the header's
length, its JSON (nested, retyped, with lying offsets and shapes), the
bytes after it.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedkube.errors import CodecError
from fedkube.wire import codec
from tests.fuzz.properties import deep_json_text, json_values, mutated, scaled

DTYPES = sorted(codec._DTYPES.values(), key=str)
names = st.text(max_size=16).filter(lambda name: name != "__metadata__")
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


tensor_maps = st.dictionaries(names, arrays(), max_size=4)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, dict[str, np.ndarray], dict[str, str]]:
    tensors, meta = draw(tensor_maps), draw(metadata)
    return codec.encode(tensors, meta), tensors, meta


def split(payload: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length]), payload[8 + length :]


def join(header_text: bytes, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + body


def decoded_or_refused(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """The property: the decoder returns consistent views, or raises CodecError with a message."""
    try:
        tensors, meta = codec.decode(payload)
    except CodecError as exc:
        assert str(exc).strip()
        return None
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    (length,) = struct.unpack("<Q", payload[:8])
    body = len(payload) - 8 - length
    spans = []
    for name, array in tensors.items():
        assert isinstance(name, str) and len(name) <= codec.MAX_NAME_CHARS
        assert not array.flags.writeable, name
        assert array.dtype in DTYPES and array.ndim <= codec.MAX_RANK
        start = (
            array.__array_interface__["data"][0]
            - np.frombuffer(payload, np.uint8).__array_interface__["data"][0]
        )
        if array.nbytes:
            assert 8 + length <= start and start + array.nbytes <= 8 + length + body, name
            spans.append((start, start + array.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    return tensors, meta


# -- accepted: what we encode comes back ---------------------------------------------------
@given(payloads())
def test_every_payload_we_encode_decodes_to_the_same_arrays_and_metadata(case):
    # prepare
    payload, tensors, meta = case
    # execute
    result = decoded_or_refused(payload)
    # assert: bit-identical arrays (NaN payloads included), dtypes, shapes and metadata
    assert result is not None
    decoded, decoded_meta = result
    assert decoded_meta == meta and decoded.keys() == tensors.keys()
    for name, array in tensors.items():
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        assert decoded[name].dtype == little and decoded[name].shape == array.shape
        assert decoded[name].tobytes() == np.ascontiguousarray(array, little).tobytes()


# -- refused by name: the bytes broken ------------------------------------------------------
@st.composite
def broken_bytes(draw: st.DrawFn) -> bytes:
    payload = bytearray(draw(payloads())[0])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        how = draw(st.sampled_from(["flip", "truncate", "append", "insert", "length"]))
        where = draw(st.integers(min_value=0, max_value=max(len(payload) - 1, 0)))
        if how == "flip" and payload:
            payload[where] ^= draw(st.integers(min_value=1, max_value=255))
        elif how == "truncate":
            del payload[where:]
        elif how == "append":
            payload += draw(st.binary(min_size=1, max_size=16))
        elif how == "insert":
            payload[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif len(payload) >= 8:
            (length,) = struct.unpack("<Q", payload[:8])
            lie = draw(
                st.one_of(
                    st.integers(min_value=-16, max_value=16).map(lambda d, n=length: n + d),
                    st.integers(min_value=0, max_value=2**64 - 1),
                    st.just(codec.MAX_HEADER_BYTES + 1),
                )
            )
            payload[:8] = struct.pack("<Q", min(max(lie, 0), 2**64 - 1))
    return bytes(payload)


@given(broken_bytes())
def test_a_payload_with_flipped_missing_or_extra_bytes_decodes_or_is_refused_by_name(payload):
    decoded_or_refused(payload)


@given(st.binary(max_size=64))
def test_random_bytes_are_refused_by_name(payload):
    decoded_or_refused(payload)


# -- refused by name: the header's claims broken ---------------------------------------------
@st.composite
def lying_headers(draw: st.DrawFn) -> bytes:
    payload, _tensors, _meta = draw(payloads())
    header, body = split(payload)
    how = draw(st.sampled_from(["retyped", "lying", "lying", "both"]))
    if how in ("retyped", "both"):
        header = draw(mutated(header, edits=4))
    tensors = (
        [n for n, i in header.items() if isinstance(i, dict)] if isinstance(header, dict) else []
    )
    if how != "retyped" and tensors:
        for name in [draw(st.sampled_from(tensors))]:
            info = header[name]
            field = draw(st.sampled_from(["data_offsets", "shape", "dtype", "wrap"]))
            info = dict(info)
            if field == "data_offsets":
                bound = len(body) + 8
                ends = st.integers(min_value=-8, max_value=bound) | st.sampled_from([2**63, 2**64])
                info[field] = draw(st.lists(ends, min_size=0, max_size=3))
            elif field == "shape":
                dims = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=40))
                if dims and draw(st.booleans()):
                    odd = st.sampled_from([-1, 2**32, 2**63, 2**64, 2**70, 10**100, True, 1.0])
                    dims[draw(st.integers(min_value=0, max_value=len(dims) - 1))] = draw(odd)
                info[field] = dims
            elif field == "wrap":
                # Dimensions whose int64 product wraps to 0, with an empty byte range.
                info["shape"] = draw(
                    st.sampled_from([[2**32, 2**32], [2**62, 4], [2**64], [2**70]])
                )
                start = draw(st.integers(min_value=0, max_value=len(body)))
                info["data_offsets"] = [start, start]
            else:
                info[field] = draw(st.sampled_from(["F32", "F16", "BF16", "C64", "f32", "", 7]))
            header = {**header, name: info}
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(min_value=0, max_value=len(text) + 8)))
    return join(text, body, length)


@given(lying_headers())
def test_a_header_that_lies_about_offsets_shapes_dtypes_or_length_is_refused_by_name(payload):
    decoded_or_refused(payload)


@given(json_values, st.binary(max_size=32))
def test_any_json_header_decodes_or_is_refused_by_name(header, body):
    decoded_or_refused(join(json.dumps(header).encode(), body))


@given(deep_json_text, st.sampled_from(["", '{"w":', '{"__metadata__":']))
def test_a_deeply_nested_header_is_refused_by_name(text, prefix):
    # Any depth, closed or not, as the whole header or inside an entry.
    closing = "}" if prefix else ""
    decoded_or_refused(join((prefix + text + closing).encode(), b""))


@st.composite
def crowded_headers(draw: st.DrawFn) -> bytes:
    """Headers at and beyond the limits: many tensors, long names, high ranks."""
    if draw(st.booleans()):
        count = draw(st.sampled_from([codec.MAX_TENSORS, codec.MAX_TENSORS + 1]))
        empty = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        return join(json.dumps({str(i): empty for i in range(count)}).encode(), b"")
    name = "n" * draw(st.sampled_from([codec.MAX_NAME_CHARS, codec.MAX_NAME_CHARS + 1]))
    rank = draw(st.sampled_from([0, codec.MAX_RANK, codec.MAX_RANK + 1, 64, 65]))
    entry = {"dtype": "U8", "shape": [1] * rank, "data_offsets": [0, 1]}
    return join(json.dumps({name: entry}).encode(), b"\x00")


@scaled(0.1)  # each input is a header of up to 100,001 entries
@given(crowded_headers())
def test_headers_beyond_the_limits_are_refused_by_name(payload):
    decoded_or_refused(payload)
