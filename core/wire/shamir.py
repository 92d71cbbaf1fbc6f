"""Shamir secret sharing over GF(2^521 - 1), for secure aggregation's seeds and keys.

A client splits its self-mask seed and its mask-agreement key among its
neighbours (:mod:`fedkube.wire.secagg`, step 2); the combiner rebuilds one
from any ``threshold`` shares (step 4). The Mersenne prime 2^521 - 1 holds any
32-byte secret, so a share is a fixed 66 bytes on the wire. Pure integer
arithmetic; the coefficients come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from fedkube.errors import SecureAggregationFailed

SEED_BYTES = 32
PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ⌈521 / 8⌉


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs``: any ``threshold`` of them rebuild it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} for {len(xs)} holders")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], length: int = SEED_BYTES) -> bytes:
    """The secret (``length`` bytes) that these shares (exactly ``threshold`` of them) hide."""
    points = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _yj) in enumerate(points):
            if i != j:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise SecureAggregationFailed("shares do not rebuild a secret of the expected size")
    return secret.to_bytes(length, "big")
