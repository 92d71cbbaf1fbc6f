"""Signed updates: the signed bytes, signing and checking, and reading keys."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from blake3 import blake3

from fedkube.errors import SigningKeyError, UpdateRejected
from fedkube.wire import codec, signing

DIGEST = blake3(b"an update").digest()
FIELDS = ("job", 3, "a-0", DIGEST)


def keys() -> tuple[signing.SigningKey, signing.VerifyKey]:
    private, public = signing.generate_key()
    return signing.load_signing_key(private, "test"), signing.load_verify_key(public, "test")


def rejection(key: signing.VerifyKey, signature: str | None, *fields: object) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as caught:
        signing.verify(key, signature, *fields, tenant="a")  # type: ignore[arg-type]
    return caught.value


def test_an_update_signed_with_the_tenants_key_verifies():
    # prepare
    private, public = keys()
    # execute
    signature = signing.sign(private, *FIELDS)
    # assert: no exception, and signing again gives the same signature (a resend repeats it)
    signing.verify(public, signature, *FIELDS, tenant="a")
    assert signing.sign(private, *FIELDS) == signature
    assert len(base64.b64decode(signature)) == signing.SIGNATURE_BYTES


@pytest.mark.parametrize(
    "changed",
    [
        ("other", 3, "a-0", DIGEST),
        ("job", 4, "a-0", DIGEST),
        ("job", 3, "a-1", DIGEST),
        ("job", 3, "a-0", blake3(b"another update").digest()),
    ],
    ids=["job", "round", "client", "body"],
)
def test_every_field_of_the_message_matters(changed):
    private, public = keys()
    signature = signing.sign(private, *FIELDS)
    refused = rejection(public, signature, *changed)
    assert refused.reason == "bad_signature" and refused.status == 403
    assert f"key of tenant 'a' for job {changed[0]}, round {changed[1]}" in refused.detail


def test_fields_cannot_run_into_each_other():
    # the same characters split differently between job and client, or round and client
    assert signing.signed_message("ab", 1, "c", DIGEST) != signing.signed_message(
        "a", 1, "bc", DIGEST
    )
    assert signing.signed_message("j", 12, "3", DIGEST) != signing.signed_message(
        "j", 1, "23", DIGEST
    )
    domain = b"fedkube-update-v2-blake3"
    assert signing.signed_message(*FIELDS).startswith(len(domain).to_bytes(4, "big") + domain)
    with pytest.raises(ValueError, match="32 bytes"):
        signing.signed_message("job", 3, "a-0", b"short")


def test_a_signature_made_with_another_tenants_key_is_refused():
    mine, _ = keys()
    _, theirs = keys()
    refused = rejection(theirs, signing.sign(mine, *FIELDS), *FIELDS)
    assert refused.reason == "bad_signature"
    assert "does not verify with the key of tenant 'a'" in refused.detail


@pytest.mark.parametrize(
    ("signature", "says"),
    [
        (None, "no X-Fedkube-Signature header"),
        ("", "no X-Fedkube-Signature header"),
        ("not base64!", "not an Ed25519 signature"),
        (base64.b64encode(b"x" * 63).decode(), "not an Ed25519 signature"),
        ("é", "not an Ed25519 signature"),
    ],
    ids=["missing", "empty", "not-base64", "too-short", "not-ascii"],
)
def test_a_missing_or_malformed_signature_is_refused_by_name(signature, says):
    _, public = keys()
    refused = rejection(public, signature, *FIELDS)
    assert refused.reason == "bad_signature" and says in refused.detail


def test_the_digest_of_an_encoded_update_is_that_of_its_bytes_taken_piece_by_piece():
    # prepare: a payload of several pieces (a header and two arrays, one cut in chunks)
    tensors = {"w": np.arange(3000, dtype=np.float32), "b": np.ones(7, np.float32)}
    encoded = codec.encode_parts(tensors, {"fedkube.round": "1"})
    # execute
    digest = signing.payload_digest(encoded.chunks(size=1024))
    # assert
    assert len(list(encoded.chunks(size=1024))) > 3
    assert digest == blake3(encoded.tobytes()).digest()


def test_a_body_large_enough_to_hash_on_several_threads_has_the_same_digest():
    # BLAKE3's tree makes the threaded digest equal the one-thread digest: checked, not assumed
    body = np.arange(signing.PARALLEL_HASH_BYTES // 4 + 1000, dtype=np.float32).tobytes()
    pieces = [body[:1_000_003], body[1_000_003:]]
    assert signing.payload_digest(pieces) == blake3(body, max_threads=1).digest()


def test_a_public_key_is_derived_from_its_private_key():
    private, public = signing.generate_key()
    assert signing.public_key_of(private, "test") == public
    assert private != public and len(base64.b64decode(private)) == signing.KEY_BYTES


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "no private key"),
        ("  ", "no private key"),
        ("%%%", "not base64"),
        (base64.b64encode(b"k" * 16).decode(), "32 bytes, this one is 16"),
    ],
)
def test_a_bad_private_key_names_its_source_and_never_shows_the_key(text, says):
    with pytest.raises(SigningKeyError) as caught:
        signing.load_signing_key(text, "environment variable FEDKUBE_SIGNING_KEY (tenant 'a')")
    message = str(caught.value)
    assert "environment variable FEDKUBE_SIGNING_KEY (tenant 'a')" in message and says in message
    assert not text or not text.strip() or text not in message


def test_a_public_keys_file_is_read_and_a_bad_entry_names_the_tenant(tmp_path):
    # prepare
    private, public = signing.generate_key()
    good, bad = tmp_path / "keys.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"a": public}))
    bad.write_text(json.dumps({"a": public, "b": "short"}))
    # execute
    loaded = signing.load_verify_keys(good)
    with pytest.raises(SigningKeyError) as caught:
        signing.load_verify_keys(bad)
    # assert
    key = signing.load_signing_key(private, "test")
    signing.verify(loaded["a"], signing.sign(key, *FIELDS), *FIELDS, tenant="a")
    assert f"--tenant-keys {bad}: tenant 'b'" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot be read"),
        ("{", "is not JSON"),
        ("[]", "expected a JSON object"),
        # json raised RecursionError and a bare ValueError for these two
        ("[" * 100_000 + "]" * 100_000, "is not JSON: nested deeper"),
        ('{"a": ' + "1" * 5000 + "}", "is not JSON"),
    ],
    ids=["missing", "not-json", "not-an-object", "nested", "integer-of-5000-digits"],
)
def test_a_missing_or_malformed_public_keys_file_is_named(tmp_path, content, says):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SigningKeyError, match=says) as caught:
        signing.load_verify_keys(path)
    assert str(path) in str(caught.value)


def test_a_client_or_job_that_is_not_utf8_is_signed_and_checked_like_any_other():
    # prepare: aiohttp hands a header of bytes that are not UTF-8 over with lone surrogates
    key, verify_key = keys()
    fields = ("job", 3, "a-\udcff", DIGEST)
    # execute / assert: it has its own signature, and another client's does not verify
    signing.verify(verify_key, signing.sign(key, *fields), *fields, tenant="a")
    other = signing.sign(key, "job", 3, "a-\udcfe", DIGEST)
    assert rejection(verify_key, other, *fields).reason == "bad_signature"
