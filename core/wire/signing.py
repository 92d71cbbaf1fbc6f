"""Signed updates: a tenant's identity that its bearer token alone does not prove.

A worker's bearer token travels with every request, so whatever sees one
request (a proxy that terminates TLS, a log line, a captured connection) can
post updates as that tenant. Each tenant therefore also holds an Ed25519 key
pair. The private key stays with the tenant's workers
(``$FEDKUBE_SIGNING_KEY``); combiners hold only the public keys. A worker
signs every update it sends, and its combiner checks the signature after
reading the body and before decoding it, so it folds only what the tenant's
key signed for this job, this round and this client:

* a body changed on the way, or an update signed with another tenant's key,
  does not verify;
* a replay of an accepted update in a later round does not verify either,
  since the round is part of the signed bytes (a replay in the same round is a
  ``duplicate``, refused before this check).

What is signed is :func:`signed_message`: a domain-separation prefix, then the
job, the round, the client and the BLAKE3 digest of the exact request body,
each prefixed with its length, so that no two different tuples give the same
bytes and no other message fedkube might sign later can pass for an update's.
Keys travel as base64 of their 32 raw bytes, signatures as base64 of 64.

Why BLAKE3 for the body (a security decision, see the README's *Signed
updates*): the digest is what binds the signature to the bytes, so it must be
a collision-resistant cryptographic hash; BLAKE3-256 gives 128-bit collision
resistance, as SHA-256 does, and is a maintained, audited design (the
``blake3`` package is its authors' Rust implementation). It is hashed at the
sender and again at the combiner over every byte of every update, which made
SHA-256 (1.6 GB/s here, with SHA-NI) one of the largest costs of a round;
BLAKE3 runs at 3.9 GB/s on one core and spreads a large body over several.
The domain prefix names the hash (``v2``: ``v1`` signed SHA-256 digests), so a
signature made over one digest can never be checked as the other's.

Pure but for :func:`load_verify_keys`, which reads one file.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterable
from pathlib import Path

from blake3 import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedkube.errors import SigningKeyError, UpdateRejected
from fedkube.wire.protocol import H_SIGNATURE, Reason

SIGNING_KEY_ENV = "FEDKUBE_SIGNING_KEY"
DOMAIN = b"fedkube-update-v2-blake3"
# A region's partial, signed by its combiner's key for the global tier: a domain of
# its own, so that no update's signature can pass for a partial's or the reverse.
PARTIAL_DOMAIN = b"fedkube-partial-v1-blake3"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32  # BLAKE3-256
# Bodies above this are hashed on several threads (BLAKE3 splits a body into a tree
# of 1 KiB chunks); below it one thread is faster than handing the work out.
PARALLEL_HASH_BYTES = 8 << 20

SigningKey = Ed25519PrivateKey
VerifyKey = Ed25519PublicKey


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
        return None


# -- keys -----------------------------------------------------------------------------------


def generate_key() -> tuple[str, str]:
    """A new key pair: ``(private, public)``, each base64 of its 32 raw bytes."""
    key = Ed25519PrivateKey.generate()
    return _b64(key.private_bytes_raw()), _b64(key.public_key().public_bytes_raw())


def _key_bytes(text: str | None, source: str, what: str) -> bytes:
    """The raw bytes of a base64 key; never shows the key itself in an error."""
    if not text or not text.strip():
        raise SigningKeyError([(source, f"no {what} key")])
    raw = _unb64(text)
    if raw is None:
        raise SigningKeyError([(source, f"the {what} key is not base64")])
    if len(raw) != KEY_BYTES:
        raise SigningKeyError(
            [(source, f"an Ed25519 {what} key is {KEY_BYTES} bytes, this one is {len(raw)}")]
        )
    return raw


def load_signing_key(text: str | None, source: str) -> SigningKey:
    """A private key from base64; ``source`` (a variable, a Secret's key) names it in errors."""
    return Ed25519PrivateKey.from_private_bytes(_key_bytes(text, source, "private"))


def load_verify_key(text: str | None, source: str) -> VerifyKey:
    """A public key from base64; ``source`` names it in errors."""
    raw = _key_bytes(text, source, "public")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SigningKeyError([(source, "not an Ed25519 public key")]) from None


def public_key_of(private: str, source: str) -> str:
    """The base64 public key that goes with the base64 private key ``private``."""
    return _b64(load_signing_key(private, source).public_key().public_bytes_raw())


def load_verify_keys(
    path: str | Path, flag: str = "--tenant-keys", what: str = "tenant"
) -> dict[str, VerifyKey]:
    """``{name: public key}`` from a JSON object of ``what`` (tenant, region) -> base64 key."""
    source = f"{flag} {path}"
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SigningKeyError([(source, f"cannot be read: {exc.strerror}")]) from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of over 4300 digits
        raise SigningKeyError([(source, f"is not JSON: {exc}")]) from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise SigningKeyError([(source, "is not JSON: nested deeper than a keys file")]) from None
    if not isinstance(document, dict):
        raise SigningKeyError(
            [(source, f"expected a JSON object of {what} -> base64 Ed25519 public key")]
        )
    return {
        str(tenant): load_verify_key(
            text if isinstance(text, str) else None, f"{source}: {what} {tenant!r}"
        )
        for tenant, text in document.items()
    }


# -- signatures -----------------------------------------------------------------------------


def payload_digest(pieces: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """BLAKE3-256 of a body given as its pieces (``codec.Encoded.chunks()``: nothing copied).

    Releases the GIL while it hashes (as hashlib did), so callers run it in a
    thread and their event loop goes on.
    """
    pieces = list(pieces)
    size = sum(memoryview(piece).nbytes for piece in pieces)
    threads = blake3.AUTO if size >= PARALLEL_HASH_BYTES else 1
    hasher = blake3(max_threads=threads)
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def signed_message(
    job: str, number: int, client: str, digest: bytes, domain: bytes = DOMAIN
) -> bytes:
    """The bytes an update's signature covers: one encoding for one tuple, and only one.

    Every field is prefixed with its length (4 bytes, big-endian), the round
    is written in decimal, and the domain prefix comes first, so a signature
    made here can be mistaken neither for another update's nor for any other
    kind of message.
    """
    if len(digest) != DIGEST_BYTES:
        raise ValueError(
            f"a payload digest is {DIGEST_BYTES} bytes (BLAKE3-256), got {len(digest)}"
        )
    # surrogatepass: a header that is not UTF-8 reaches Python with lone surrogates
    # (aiohttp decodes with surrogateescape); each string still has one encoding,
    # distinct from every other string's, instead of a UnicodeEncodeError.
    fields = (
        domain,
        job.encode("utf-8", "surrogatepass"),
        str(int(number)).encode(),
        client.encode("utf-8", "surrogatepass"),
        digest,
    )
    return b"".join(_field(value) for value in fields)


def sign(key: SigningKey, job: str, number: int, client: str, digest: bytes) -> str:
    """The base64 signature of an update (Ed25519 is deterministic: a resend repeats it)."""
    return _b64(key.sign(signed_message(job, number, client, digest)))


def _rejected(detail: str) -> UpdateRejected:
    return UpdateRejected(Reason.bad_signature.value, detail, 403)


def parse_signature(header: str | None, tenant: str) -> bytes:
    """The raw signature from its header; missing or malformed is refused by name."""
    if not header:
        raise _rejected(
            f"no {H_SIGNATURE} header: the updates of tenant {tenant!r} must be signed with its key"
        )
    raw = _unb64(header)
    if raw is None or len(raw) != SIGNATURE_BYTES:
        raise _rejected(
            f"{H_SIGNATURE} is not an Ed25519 signature ({SIGNATURE_BYTES} bytes in base64)"
        )
    return raw


def verify(
    key: VerifyKey,
    signature: bytes | str | None,
    job: str,
    number: int,
    client: str,
    digest: bytes,
    *,
    tenant: str,
) -> None:
    """Refuse (``bad_signature``) unless ``tenant``'s key signed exactly this update."""
    raw = signature if isinstance(signature, bytes) else parse_signature(signature, tenant)
    try:
        key.verify(raw, signed_message(job, number, client, digest))
    except InvalidSignature:
        raise _rejected(
            f"signature does not verify with the key of tenant {tenant!r} for job {job}, "
            f"round {number}, client {client}: signed with another key, or for another "
            "job, round, client or body"
        ) from None


# -- partials: a region's identity upward ----------------------------------------------------


def sign_partial(key: SigningKey, job: str, number: int, region: str, digest: bytes) -> str:
    """The base64 signature of region ``region``'s partial for round ``number``."""
    return _b64(key.sign(signed_message(job, number, region, digest, PARTIAL_DOMAIN)))


def verify_partial(
    key: VerifyKey, header: str | None, job: str, number: int, region: str, digest: bytes
) -> None:
    """Refuse (``bad_signature``) unless ``region``'s combiner key signed exactly this partial."""
    if not header:
        raise _rejected(f"no {H_SIGNATURE} header: region {region!r}'s partial must be signed")
    raw = _unb64(header)
    if raw is None or len(raw) != SIGNATURE_BYTES:
        raise _rejected(
            f"{H_SIGNATURE} is not an Ed25519 signature ({SIGNATURE_BYTES} bytes in base64)"
        )
    try:
        key.verify(raw, signed_message(job, number, region, digest, PARTIAL_DOMAIN))
    except InvalidSignature:
        raise _rejected(
            f"signature does not verify with the key of region {region!r} for job {job}, "
            f"round {number}: signed with another key, or for another job, round or body"
        ) from None
