"""Tensor payloads on the wire: safetensors, never pickle.

The safetensors format is an 8-byte little-endian header length, a JSON
header (names, dtypes, shapes, byte offsets and a ``__metadata__`` map of
strings) padded with spaces to 8 bytes, then the tensors' raw bytes. Both
directions are written here rather than with the safetensors library:

* Encoding yields the header and zero-copy views of the arrays
  (:class:`Encoded`), so that an update of 40 MB goes to the socket (or a
  file) straight from the arrays the worker computed: the library's
  ``save`` builds a new ``bytes`` of the whole payload, and asyncio on
  Python 3.11 copies most of a large ``bytes`` into its transport buffer
  again. The files are ordinary safetensors (a test loads them with the
  library).
* Decoding checks every claim of the header before any tensor is touched,
  and returns the tensors as zero-copy read-only views of the received
  buffer: a combiner folding hundreds of updates should not copy each one
  first.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedkube.errors import CodecError

CODEC = "safetensors"
CONTENT_TYPE = "application/vnd.fedkube.safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024
# What a header may claim, each refused by name beyond it: a tensor entry costs the
# receiver an array object, and a shape's product is counted in Python integers,
# so no claim can overflow into a size that seems to fit the payload.
MAX_TENSORS = 100_000
MAX_NAME_CHARS = 1024
MAX_RANK = 32  # numpy's own limit on dimensions is 64 (32 before numpy 2)
_MAX_INDEX = int(np.iinfo(np.intp).max)
# A header is an object of tensor entries, each an object holding lists: three levels.
MAX_HEADER_DEPTH = 3

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U32": np.dtype("<u4"),  # secure aggregation's masked fixed point
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}

Tensors = dict[str, np.ndarray]


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Sends are cut into pieces of this size: each goes to the kernel from the
# array's memory, and no piece sits in the transport's buffer for long.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Encoded:
    """A safetensors payload as its header and views of the arrays it names.

    Nothing is copied until :meth:`tobytes`; the arrays must not change while
    the payload is in use (the encoder's callers hand over finished arrays).
    """

    header: bytes
    buffers: tuple[memoryview, ...]

    def __len__(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[memoryview]:
        """The payload in pieces of at most ``size`` bytes, none of them copied."""
        yield memoryview(self.header)
        for buffer in self.buffers:
            for start in range(0, buffer.nbytes, size):
                yield buffer[start : start + size]

    def tobytes(self) -> bytes:
        return b"".join([self.header, *self.buffers])


def encode_parts(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Encoded:
    """Named arrays plus string metadata as a safetensors payload, without copying them."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    buffers: list[memoryview] = []
    offset = 0
    for name, array in tensors.items():
        if name == "__metadata__":  # decode() would read the tensor's entry as the metadata
            raise CodecError("a tensor cannot be named __metadata__: the header's metadata is")
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        contiguous = np.require(array, dtype=little, requirements="C")  # keeps 0-d as 0-d
        kind = _NAMES.get(contiguous.dtype)
        if kind is None:
            raise CodecError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        size = int(contiguous.nbytes)
        header[name] = {
            "dtype": kind,
            "shape": [int(d) for d in contiguous.shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
        buffers.append(contiguous.reshape(-1).data.cast("B"))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return Encoded(struct.pack("<Q", len(text)) + text, tuple(buffers))


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialise named arrays plus string metadata to safetensors bytes."""
    return encode_parts(tensors, metadata).tobytes()


def decode(data: bytes | bytearray | memoryview) -> tuple[Tensors, dict[str, str]]:
    """Parse safetensors bytes into read-only array views and their metadata.

    Raises :class:`CodecError` naming the problem for anything that is not a
    well-formed safetensors payload: truncated input, a header that is not
    UTF-8 JSON or nests deeper than a header does, unknown dtypes, shapes
    beyond the limits above, offsets outside the buffer, overlapping tensors.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise CodecError("payload shorter than the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise CodecError(f"header length {header_len} does not fit a {len(view)}-byte payload")
    try:
        # UTF-8 only, as the format says (json.loads would also guess UTF-16 and -32).
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of over 4300 digits
        raise CodecError(f"header is not JSON: {exc}") from None
    except RecursionError:
        # ``[[[[...`` a hundred thousand deep: json's C parser recurses once per level
        # and gives up at the interpreter's recursion limit, long before the bytes end.
        raise CodecError(f"header nests deeper than {MAX_HEADER_DEPTH} levels") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise CodecError("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise CodecError(f"header names {len(header)} tensors, more than {MAX_TENSORS}")
    body = view[8 + header_len :]
    tensors: Tensors = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        tensors[name] = _tensor_view(name, info, body, spans)
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CodecError("tensor byte ranges overlap")
    return tensors, dict(raw_meta)


def _integer(value: object) -> bool:
    """A JSON integer: ``true`` is an ``int`` to Python, not to a header."""
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_view(name: str, info: object, body: memoryview, spans: list[tuple[int, int]]):
    if len(name) > MAX_NAME_CHARS:
        raise CodecError(
            f"tensor {name[:40]!r}...: name of {len(name)} characters, more than {MAX_NAME_CHARS}"
        )
    if not isinstance(info, dict):
        raise CodecError(f"tensor {name!r}: header entry is not an object")
    dtype = _DTYPES.get(str(info.get("dtype")))
    if dtype is None:
        raise CodecError(f"tensor {name!r}: unsupported dtype {str(info.get('dtype'))[:40]!r}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (isinstance(shape, list) and all(_integer(d) and d >= 0 for d in shape)):
        raise CodecError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise CodecError(f"tensor {name!r}: shape of rank {len(shape)}, more than {MAX_RANK}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_integer(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= len(body)
    ):
        raise CodecError(f"tensor {name!r}: data_offsets outside the payload")
    # Python integers: numpy's int64 product of [2**32, 2**32] wraps to 0, which an
    # empty byte range would then seem to match.
    count = math.prod(shape)
    # numpy refuses a shape whose non-zero dimensions multiply past its index type,
    # empty or not ([2**63, 0] raised "Maximum allowed dimension exceeded").
    if math.prod(d for d in shape if d) > _MAX_INDEX:
        raise CodecError(f"tensor {name!r}: shape {str(shape)[:200]} is beyond numpy's indexing")
    if offsets[1] - offsets[0] != count * dtype.itemsize:
        raise CodecError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {str(shape)[:200]}"
        )
    spans.append((offsets[0], offsets[1]))
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offsets[0])
    return array.reshape(shape)


def payload_nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(array.nbytes) for array in tensors.values())
