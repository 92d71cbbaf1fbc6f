"""Secure aggregation's primitives: keys, masks, fixed point, the neighbour graph.

What :mod:`fedkube.wire.secagg`'s two state machines are built from, each a
pure function: X25519 key agreement through HKDF, bound to the job, round and
pair of clients; AES-256-CTR mask streams added or subtracted mod 2^32, chunk
by chunk; the fixed-point encoding whose sums cannot overflow (the module
docstring of :mod:`fedkube.wire.secagg` proves the bound); the flat layout
masks are drawn over; and SecAgg+'s seeded ring of neighbours.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import Reason

KEY_BYTES = 32
MASK_CHUNK = 1 << 16  # elements per step of mask expansion (256 KiB: stays in cache)


# -- encodings on the wire -----------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str, length: int) -> bytes:
    """Base64 ``text`` of exactly ``length`` bytes, or a refusal naming ``what``."""
    if not isinstance(text, str):
        raise UpdateRejected(Reason.bad_share.value, f"{what} is not a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise UpdateRejected(Reason.bad_share.value, f"{what} is not valid base64") from None
    if len(data) != length:
        raise UpdateRejected(
            Reason.bad_share.value, f"{what} is {len(data)} bytes, expected {length}"
        )
    return data


# -- keys ------------------------------------------------------------------------
def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def usable_key(public: bytes) -> bytes:
    """``public`` if X25519 agreement with it works: not a low-order point (all-zero secret)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise UpdateRejected(
            Reason.bad_share.value, "a key that is not a usable X25519 public key"
        ) from None
    return public


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 shared secret."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose + b"\0" + context
    ).derive(shared)


def bound_context(job: str, number: int, *clients: str) -> bytes:
    """Binds a key or ciphertext to its job, round and clients (length-prefixed)."""
    parts = [job.encode(), str(number).encode(), *(c.encode() for c in clients)]
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def pair_context(job: str, number: int, u: str, v: str) -> bytes:
    return bound_context(job, number, *sorted((u, v)))


# -- masks -----------------------------------------------------------------------
def apply_masks(values: np.ndarray, plus: Iterable[bytes], minus: Iterable[bytes]) -> None:
    """``values += Σ PRG(plus) - Σ PRG(minus)`` in place (uint32, so mod 2^32).

    PRG(key) is the AES-256-CTR key stream of ``key`` from counter 0, read as
    uint32. Chunk by chunk, every stream at once: the chunk of ``values``
    stays in cache while each key's stream is added to it.
    """
    streams: list[tuple[CipherContext, np.ufunc]] = [(_stream(key), np.add) for key in plus]
    streams += [(_stream(key), np.subtract) for key in minus]
    if not streams:
        return
    zeros = bytes(4 * MASK_CHUNK)
    buffer = bytearray(4 * MASK_CHUNK + 16)
    for start in range(0, values.size, MASK_CHUNK):
        stop = min(start + MASK_CHUNK, values.size)
        chunk = values[start:stop]
        plain = memoryview(zeros)[: 4 * (stop - start)]
        for stream, operation in streams:
            stream.update_into(plain, buffer)
            operation(chunk, np.frombuffer(buffer, np.uint32, count=stop - start), out=chunk)


def _stream(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def pairwise_sign(u: str, v: str) -> int:
    """+1 if ``u`` adds the mask it shares with ``v``, -1 if it subtracts it."""
    return 1 if u < v else -1


# -- fixed point -----------------------------------------------------------------
def fraction_bits(clip_range: float) -> int:
    """Fractional bits f with ``clip_range·2^f ≤ 2^30`` (see the module docstring)."""
    return 30 - math.ceil(math.log2(clip_range))


def encode(flat: np.ndarray, ratio: float, clip_range: float) -> np.ndarray:
    """``round(ratio·clip(flat)·2^f)`` as two's complement uint32 (a new array).

    In float64 (a float32 product would lose bits below the quantum), chunk by
    chunk: the temporaries stay the size of a chunk, not of the model.
    """
    scale = ratio * 2.0 ** fraction_bits(clip_range)
    out = np.empty(flat.size, np.uint32)
    for start in range(0, flat.size, MASK_CHUNK):
        chunk = flat[start : start + MASK_CHUNK].astype(np.float64)
        np.clip(chunk, -clip_range, clip_range, out=chunk)
        chunk *= scale
        np.rint(chunk, out=chunk)
        out[start : start + chunk.size] = chunk.astype(np.int64)  # wraps mod 2^32
    return out


def decode(total: np.ndarray, weight_total: float, clip_range: float) -> np.ndarray:
    """The float32 ``Σ s_u·x_u`` that a uint32 sum of encodings stands for."""
    scale = weight_total / 2.0 ** fraction_bits(clip_range)
    return (total.view(np.int32).astype(np.float64) * scale).astype(np.float32)


def flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors as one vector, in name order: the layout masks are drawn over."""
    return np.concatenate([tensors[name].reshape(-1) for name in sorted(tensors)])


def unflatten(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Views of ``flat`` as the named tensors :func:`flatten` laid out."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        tensors[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    return tensors


def sum_error_bound(count: int, weight_total: float, clip_range: float) -> float:
    """The most a decoded sum of ``count`` encodings can differ from the exact one."""
    return count * weight_total / 2.0 ** (fraction_bits(clip_range) + 1)


# -- the neighbour graph ---------------------------------------------------------
def default_degree(n: int) -> int:
    """SecAgg+'s O(log n) neighbours: min(n - 1, 2⌈log2 n⌉ + 2)."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))) + 2)


def neighbours(roster: Sequence[str], degree: int, seed: bytes) -> dict[str, list[str]]:
    """A ring of ``degree`` (rounded up to even) over a seeded permutation of ``roster``.

    ``degree ≥ n - 1`` is the complete graph (Bonawitz). The permutation is
    public (derived from the job and round) and random, so which clients
    mask with which is not chosen by anyone.
    """
    n = len(roster)
    if degree >= n - 1:
        return {u: [v for v in roster if v != u] for u in roster}
    order = sorted(roster)
    random.Random(seed).shuffle(order)
    half = (degree + 1) // 2
    graph: dict[str, list[str]] = {}
    for i, u in enumerate(order):
        around = {order[(i + d) % n] for d in range(-half, half + 1) if d}
        graph[u] = sorted(around)
    return graph


def threshold_for(holders: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * holders - 1e-9))
