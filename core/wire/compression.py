"""Lossy codecs for what travels: fp16, int8 and top-k, in plain safetensors.

A compressed payload is still a safetensors file; its ``__metadata__`` says
the scheme (``fedkube.compression``) and, for int8, the block size
(``fedkube.int8_block``, 0 for one scale per tensor). int8 and top-k carry
the whole model as one flat vector (the tensors in sorted-name order): two
wire tensors whatever the model, so the header costs the same few hundred
bytes for a ten-thousand-parameter model as for a billion-parameter one.

=========  ==============================================  ======================
scheme     wire tensors                                    bytes per parameter
=========  ==============================================  ======================
``none``   each tensor as float32, the model's names       4
``fp16``   each tensor as float16, the model's names       2
``int8``   ``int8/q`` int8 (N,); ``int8/scale`` float32:   1 (+ 4 per scale)
           one per tensor, or one per block of the vector
``topk``   ``topk/index`` int32, strictly increasing;      6 per kept entry
           ``topk/value`` float16
=========  ==============================================  ======================

int8 is symmetric: ``x ≈ q · s`` with ``s = max|x| / 127`` over the tensor
(or block), rounded to nearest or, with ``stochasticRounding``, up or down at
random in proportion (unbiased). top-k keeps the ``ceil(fraction · N)``
entries of largest magnitude across the whole update; with error feedback the
worker adds what it did not send before (its residual, kept in its durable
client state) before choosing, so nothing is dropped for good, only delayed.

The receiver never trusts the form: :func:`parse` checks every name, dtype,
shape, index (in range, strictly increasing, so unique, and no more than the
job's fraction allows), scale and value, and returns per-tensor views that
fold straight into a float32 sum without a dense copy per update
(:meth:`Part.fold_into`).

A little over 400 lines on purpose: the three codecs and the one parser that
checks all of them share the wire format above, and are read together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedkube.errors import UpdateRejected
from fedkube.spec import WireCompression
from fedkube.wire.protocol import Reason

SCHEME_KEY = "fedkube.compression"
BLOCK_KEY = "fedkube.int8_block"
# A model sent as one flat int8 vector names its tensors' shapes here (JSON).
SHAPES_KEY = "fedkube.shapes"
FP16_MAX = float(np.finfo(np.float16).max)
# The largest int8 scale whose products q·s (|q| ≤ 127) are all finite float32 values.
INT8_MAX_SCALE = float(np.finfo(np.float32).max) / 127
# Elements per step of a fold, as the dense fold (strategies.sums.FOLD_CHUNK):
# the temporary stays in cache, the per-call overhead is negligible.
CHUNK = 1 << 18

Shapes = Mapping[str, tuple[int, ...]]


# -- sending -----------------------------------------------------------------
def layout(shapes: Shapes) -> list[tuple[str, int, int]]:
    """``(name, offset, size)`` of each tensor in the flat vector: sorted names."""
    out, offset = [], 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out.append((name, offset, size))
        offset += size
    return out


def encode(
    tensors: Mapping[str, np.ndarray],
    scheme: WireCompression,
    rng: np.random.Generator,
    with_shapes: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, np.ndarray]]:
    """``(wire tensors, metadata, what the receiver will decode)`` for float32 ``tensors``.

    The third item is the dense float32 reconstruction, for error feedback
    (``residual = sent − decoded``); for ``none`` it is ``tensors`` itself.
    ``with_shapes`` writes the tensors' shapes into the metadata, for a model
    (its receivers know nothing yet); an update is checked against the model.
    """
    name = scheme.scheme
    if name == "none":
        return dict(tensors), {SCHEME_KEY: "none"}, dict(tensors)
    if name == "fp16":
        half = {
            key: np.clip(np.asarray(a, np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)
            for key, a in tensors.items()
        }
        decoded = {key: h.astype(np.float32) for key, h in half.items()}
        return half, {SCHEME_KEY: "fp16"}, decoded
    shapes = {key: tuple(a.shape) for key, a in tensors.items()}
    places = layout(shapes)
    flat = (
        np.concatenate([np.asarray(tensors[key], np.float32).reshape(-1) for key, _, _ in places])
        if places
        else np.zeros(0, np.float32)
    )
    wire: dict[str, np.ndarray]
    meta = {SCHEME_KEY: name}
    if with_shapes:
        meta[SHAPES_KEY] = json.dumps({key: list(shape) for key, shape in shapes.items()})
    if name == "int8":
        random = rng if scheme.stochastic_rounding else None
        if scheme.block_size:
            q, scales = _quantise(flat, scheme.block_size, random)
        else:  # one scale per tensor
            # An empty tensor still has its scale (0): the receiver expects one per tensor.
            pieces = [_quantise(flat[o : o + n], max(n, 1), random, 1) for _, o, n in places]
            q = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int8)
            scales = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.float32)
        wire = {"int8/q": q, "int8/scale": scales}
        meta[BLOCK_KEY] = str(scheme.block_size or 0)
    elif name == "topk":
        keep = min(flat.size, max(1, math.ceil(scheme.fraction * flat.size)))
        index = np.sort(np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :])
        values = np.clip(flat[index], -FP16_MAX, FP16_MAX).astype(np.float16)
        wire = {"topk/index": index.astype(np.int32), "topk/value": values}
    else:  # the spec's Literal makes this unreachable
        raise ValueError(f"unknown compression scheme {name!r}")
    parts = parse(wire, meta, shapes, scheme)
    return wire, meta, dense(parts, shapes)


def _quantise(
    flat: np.ndarray, block: int, rng: np.random.Generator | None, least: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    blocks = max(-(-flat.size // block), least)
    padded = np.zeros(blocks * block, np.float32)
    padded[: flat.size] = flat
    rows = padded.reshape(blocks, block)
    scales = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = rows / safe[:, None]
    if rng is not None:
        scaled = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    else:
        scaled = np.rint(scaled)
    q = np.clip(scaled, -127, 127).astype(np.int8).reshape(-1)[: flat.size]
    return q, scales


# -- receiving ---------------------------------------------------------------
class Part:
    """One tensor of a received payload, in its wire form."""

    size: int

    def fold_into(self, dst: np.ndarray, factor: np.float32, assign: bool = False) -> None:
        """``dst += factor · x`` (or ``=`` with ``assign``) for flat float32 ``dst``."""
        raise NotImplementedError

    def squared_norm(self) -> float:
        raise NotImplementedError

    def dense(self) -> np.ndarray:
        out = np.empty(self.size, np.float32)
        self.fold_into(out, np.float32(1.0), assign=True)
        return out


@dataclass(frozen=True)
class Dense(Part):
    """float32 or float16 values in the model's layout."""

    values: np.ndarray  # flat

    @property
    def size(self) -> int:  # type: ignore[override]
        return int(self.values.size)

    def fold_into(self, dst: np.ndarray, factor: np.float32, assign: bool = False) -> None:
        scratch = np.empty(min(CHUNK, dst.size), np.float32)
        for start in range(0, dst.size, CHUNK):
            stop = min(start + CHUNK, dst.size)
            if assign:
                np.multiply(self.values[start:stop], factor, out=dst[start:stop])
                continue
            part = scratch[: stop - start]
            np.multiply(self.values[start:stop], factor, out=part)
            np.add(dst[start:stop], part, out=dst[start:stop])

    def squared_norm(self) -> float:
        total = 0.0
        for start in range(0, self.values.size, CHUNK):
            piece = self.values[start : start + CHUNK].astype(np.float32)
            total += float(np.dot(piece, piece))
        return total


@dataclass(frozen=True)
class Int8(Part):
    """``x = q · s``: dequantised chunk by chunk straight into the sum.

    ``q`` is this tensor's slice of the flat vector, which starts at
    ``offset``; with ``block`` 0 one ``scales[0]`` covers the tensor,
    otherwise element ``i`` of the vector uses ``scales[i // block]``.
    """

    q: np.ndarray  # flat int8, this tensor's slice
    scales: np.ndarray  # float32
    block: int = 0
    offset: int = 0

    @property
    def size(self) -> int:  # type: ignore[override]
        return int(self.q.size)

    def fold_into(self, dst: np.ndarray, factor: np.float32, assign: bool = False) -> None:
        if not self.block:  # one scale: one fused multiply-add per chunk
            Dense(self.q).fold_into(dst, np.float32(factor * self.scales[0]), assign)
            return
        block, size = self.block, self.q.size
        scratch = np.empty(min(CHUNK + 2 * block, max(size, 1)), np.float32)
        start = 0
        while start < size:
            # [start, stop): a partial block up to a boundary, then whole blocks
            first = (self.offset + start) // block
            head = min(size, (first + 1) * block - self.offset) - start
            whole = max(0, min(size - start - head, CHUNK) // block)
            stop = min(size, start + head + whole * block)
            part = scratch[: stop - start]
            np.multiply(self.q[start : start + head], self.scales[first] * factor, out=part[:head])
            if whole:
                np.multiply(
                    self.q[start + head : start + head + whole * block].reshape(whole, block),
                    (self.scales[first + 1 : first + 1 + whole] * factor)[:, None],
                    out=part[head : head + whole * block].reshape(whole, block),
                )
            tail = stop - (start + head + whole * block)
            if tail:
                last = (self.offset + stop - 1) // block
                np.multiply(
                    self.q[stop - tail : stop], self.scales[last] * factor, out=part[-tail:]
                )
            if assign:
                dst[start:stop] = part
            else:
                np.add(dst[start:stop], part, out=dst[start:stop])
            start = stop

    def squared_norm(self) -> float:
        if not self.block:
            return Dense(self.q).squared_norm() * float(self.scales[0]) ** 2
        values = self.dense()
        return float(np.dot(values, values))


@dataclass(frozen=True)
class Sparse(Part):
    """The kept entries only: folded with one scatter-add, no dense copy."""

    index: np.ndarray  # int32, strictly increasing
    values: np.ndarray  # float16
    length: int

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.length

    def fold_into(self, dst: np.ndarray, factor: np.float32, assign: bool = False) -> None:
        if assign:
            dst[:] = 0.0
        # Indices are unique (checked), so a fancy-index add is exact.
        dst[self.index] += self.values.astype(np.float32) * factor

    def squared_norm(self) -> float:
        values = self.values.astype(np.float32)
        return float(np.dot(values, values))


def scheme_of(metadata: Mapping[str, str]) -> str:
    return metadata.get(SCHEME_KEY, "none")


WIRE_NAMES = {"int8": {"int8/q", "int8/scale"}, "topk": {"topk/index", "topk/value"}}


def parse(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    shapes: Shapes,
    expected: WireCompression,
) -> dict[str, Part]:
    """Check a received payload against the model's ``shapes``; its parts by name.

    ``expected`` is what the job configured for this direction: a payload in
    another scheme or block size is refused (``metadata_mismatch``), and a
    top-k payload may not keep more entries than its fraction allows, so a
    client cannot choose a form the receiver did not plan for.
    """
    scheme = scheme_of(metadata)
    if scheme != expected.scheme:
        raise UpdateRejected(
            Reason.metadata_mismatch.value,
            f"compression {scheme!r}, the job sends {expected.scheme!r} (spec.compression)",
        )
    names = set(shapes) if scheme in ("none", "fp16") else WIRE_NAMES.get(scheme)
    if names is None:
        raise UpdateRejected(Reason.malformed.value, f"unknown compression {scheme!r}")
    missing, extra = names - tensors.keys(), tensors.keys() - names
    if missing or extra:
        raise UpdateRejected(
            Reason.wrong_shape.value,
            f"tensor names differ from the model's {scheme} form: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}",
        )
    if scheme in ("none", "fp16"):
        dtype = "float32" if scheme == "none" else "float16"
        parts: dict[str, Part] = {}
        for name, shape in shapes.items():
            _expect(tensors[name], name, dtype, shape)
            _finite(tensors[name], name)
            parts[name] = Dense(tensors[name].reshape(-1))
        return parts
    places = layout(shapes)
    total = sum(size for _, _, size in places)
    if scheme == "int8":
        return _int8_parts(tensors, metadata, places, total, expected)
    return _topk_parts(tensors, places, total, expected)


def _int8_parts(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    places: list[tuple[str, int, int]],
    total: int,
    expected: WireCompression,
) -> dict[str, Part]:
    block = _block(metadata)
    if block != (expected.block_size or 0):
        raise UpdateRejected(
            Reason.metadata_mismatch.value,
            f"int8 block {block}, the job uses {expected.block_size or 0} (0: one per tensor)",
        )
    q, scales = tensors["int8/q"], tensors["int8/scale"]
    _expect(q, "int8/q", "int8", (total,))
    _expect(scales, "int8/scale", "float32", (-(-total // block) if block else len(places),))
    _finite(scales, "int8/scale")
    if (scales < 0).any():
        raise UpdateRejected(Reason.malformed.value, "int8/scale: a scale is negative")
    # Finite is not enough: 127 · 3e38 is inf in float32, so the dense value would not be.
    if (scales > INT8_MAX_SCALE).any():
        raise UpdateRejected(
            Reason.non_finite.value,
            f"int8/scale: a scale above {INT8_MAX_SCALE:.4g} makes q·scale overflow float32",
        )
    if block:
        return {name: Int8(q[o : o + n], scales, block, o) for name, o, n in places}
    return {name: Int8(q[o : o + n], scales[i : i + 1]) for i, (name, o, n) in enumerate(places)}


def _topk_parts(
    tensors: Mapping[str, np.ndarray],
    places: list[tuple[str, int, int]],
    total: int,
    expected: WireCompression,
) -> dict[str, Part]:
    index, values = tensors["topk/index"], tensors["topk/value"]
    limit = min(total, max(1, math.ceil(expected.fraction * total)))
    if index.ndim != 1 or values.ndim != 1 or index.size != values.size:
        raise UpdateRejected(
            Reason.wrong_shape.value,
            f"topk: {index.size} indices and {values.size} values, expected one each per entry",
        )
    if index.size > limit:
        raise UpdateRejected(
            Reason.oversized.value,
            f"topk: {index.size} entries, the job's fraction {expected.fraction} allows {limit}",
        )
    _expect(index, "topk/index", "int32", (index.size,))
    _expect(values, "topk/value", "float16", (values.size,))
    if index.size and (index[0] < 0 or index[-1] >= total or (np.diff(index) <= 0).any()):
        raise UpdateRejected(
            Reason.malformed.value,
            f"topk/index: indices must be strictly increasing within [0, {total})",
        )
    _finite(values, "topk/value")
    bounds = np.searchsorted(index, [o for _, o, _ in places] + [total])
    return {
        name: Sparse(index[lo:hi] - o, values[lo:hi], n)
        for (name, o, n), lo, hi in zip(places, bounds[:-1], bounds[1:], strict=True)
    }


def _block(metadata: Mapping[str, str]) -> int:
    try:
        block = int(metadata.get(BLOCK_KEY, ""))
    except ValueError:
        raise UpdateRejected(Reason.malformed.value, f"{BLOCK_KEY} is not an integer") from None
    if block < 0:
        raise UpdateRejected(Reason.malformed.value, f"{BLOCK_KEY} is negative")
    return block


def _expect(array: np.ndarray, name: str, dtype: str, shape: tuple[int, ...]) -> None:
    if array.dtype != np.dtype(dtype):
        raise UpdateRejected(Reason.wrong_dtype.value, f"{name}: dtype {array.dtype}, not {dtype}")
    if tuple(array.shape) != shape:
        raise UpdateRejected(
            Reason.wrong_shape.value, f"{name}: shape {tuple(array.shape)}, expected {shape}"
        )


def _finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise UpdateRejected(Reason.non_finite.value, f"{name} holds NaN or Inf")


def dense(parts: Mapping[str, Part], shapes: Shapes) -> dict[str, np.ndarray]:
    """Float32 tensors from parts (a worker's view of a compressed model)."""
    return {name: parts[name].dense().reshape(shape) for name, shape in shapes.items()}


def shapes_of(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> dict[str, tuple[int, ...]]:
    """The model's tensor shapes, from a model payload's ``fedkube.shapes`` or its fp16 tensors."""
    scheme = scheme_of(metadata)
    if scheme in ("none", "fp16"):
        return {name: tuple(array.shape) for name, array in tensors.items()}
    refused = UpdateRejected(
        Reason.malformed.value,
        f"a {scheme} model must say its shapes in {SHAPES_KEY}: a JSON object of tensor "
        "name -> list of non-negative integers",
    )
    try:
        document = json.loads(metadata[SHAPES_KEY])
    except (KeyError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise refused from None
    # Checked, not coerced: int() of 1e999 overflows, and a negative dimension would
    # shift every later tensor's slice of the flat vector (layout() adds the sizes).
    if not isinstance(document, dict) or not all(
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        for shape in document.values()
    ):
        raise refused
    return {name: tuple(shape) for name, shape in document.items()}


def parse_model(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], expected: WireCompression
) -> tuple[dict[str, Part], Shapes]:
    """A compressed model payload (the downlink), checked: its parts and the model's shapes.

    The combiner keeps the shapes (every update must match the model they
    describe) and serves the payload as it came; a worker makes it dense.
    """
    shapes = shapes_of(tensors, metadata)
    return parse(tensors, metadata, shapes, expected), shapes
