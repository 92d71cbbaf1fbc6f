"""Signatures and keys (fedkube.wire.signing): verified, or refused by name.

The signature header, the job, client and round it is checked against, and
the body are all the sender's; the keys file is the operator's. A signature
verifies only for exactly the update its key signed, and every other input
is a ``bad_signature`` (403) or a ``SigningKeyError`` naming its source.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import given
from hypothesis import strategies as st

from fedkube.errors import SigningKeyError, UpdateRejected
from fedkube.wire import signing
from tests.fuzz.properties import deep_json_text, json_values, refused_by_name, scaled

PRIVATE, PUBLIC = signing.generate_key()
KEY = signing.load_signing_key(PRIVATE, "test")
VERIFY = signing.load_verify_key(PUBLIC, "test")

# Header text as aiohttp hands it over: any characters, and lone surrogates for bytes
# that were not UTF-8 (it decodes headers with surrogateescape).
header_text = st.lists(
    st.characters(codec="utf-8")
    | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"]),
    max_size=40,
).map("".join)
base64_text = st.binary(max_size=100).map(lambda raw: base64.b64encode(raw).decode())
signature_headers = st.one_of(
    st.none(),
    header_text,
    base64_text,
    base64_text.map(lambda text: f"  {text}\n"),
    st.binary(min_size=64, max_size=64).map(lambda raw: base64.b64encode(raw).decode()),
)
updates = st.tuples(
    header_text,
    st.integers(min_value=0, max_value=10**9),
    header_text,
    st.binary(min_size=32, max_size=32),
)


def refused_signature(exc: UpdateRejected) -> None:
    refused_by_name(exc)
    assert exc.reason == "bad_signature" and exc.status == 403


@given(signature_headers, st.text(max_size=10))
def test_a_signature_header_is_64_bytes_or_refused_as_a_bad_signature(header, tenant):
    try:
        raw = signing.parse_signature(header, tenant)
    except UpdateRejected as exc:
        refused_signature(exc)
        return
    assert len(raw) == signing.SIGNATURE_BYTES


@given(updates)
def test_a_signature_verifies_for_exactly_the_update_it_signed(update):
    # prepare
    job, number, client, digest = update
    signature = signing.sign(KEY, job, number, client, digest)
    # execute / assert: the signed tuple verifies, from the header's text or its bytes
    signing.verify(VERIFY, signature, job, number, client, digest, tenant="t")
    signing.verify(VERIFY, f" {signature} ", job, number, client, digest, tenant="t")


@given(updates, updates, signature_headers)
def test_any_other_update_or_signature_is_refused_as_a_bad_signature(signed, checked, header):
    # prepare: a real signature of one update, checked against another (or a forged header)
    signature = signing.sign(KEY, *signed)
    presented = signature if checked != signed else header
    # execute / assert
    try:
        signing.verify(VERIFY, presented, *checked, tenant="t")
    except UpdateRejected as exc:
        refused_signature(exc)
        return
    assert presented == signature and checked == signed  # only the update it signed


@given(updates, st.one_of(st.none(), updates), signature_headers, st.booleans(), st.booleans())
def test_a_partial_verifies_only_as_the_partial_its_regions_key_signed(
    signed, other, header, as_update, forged
):
    # prepare: a region's signature of one partial (or an update's signature of the same
    # tuple: another domain), presented (or a forged header instead) for that partial or
    # for another
    make = signing.sign if as_update else signing.sign_partial
    signature = make(KEY, *signed)
    presented = header if forged else signature
    checked = other or signed
    # execute / assert
    try:
        signing.verify_partial(VERIFY, presented, *checked)
    except UpdateRejected as exc:
        refused_signature(exc)
        return
    assert presented == signature and checked == signed and not as_update


key_text = st.one_of(
    st.none(),
    header_text,
    st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode()),
    st.just(PUBLIC),
    st.just(PRIVATE),
)


@given(key_text)
def test_a_key_loads_or_is_refused_naming_its_source_and_not_itself(text):
    for load in (signing.load_signing_key, signing.load_verify_key):
        try:
            load(text, "FEDKUBE_SIGNING_KEY")
        except SigningKeyError as exc:
            assert exc.problems and exc.problems[0][0] == "FEDKUBE_SIGNING_KEY"
            if text and len(text.strip()) >= 16:  # an error never shows the key itself
                assert text.strip() not in str(exc)


@st.composite
def keys_files(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["keys", "json", "deep", "bytes"]))
    if how == "keys":
        document = draw(
            st.dictionaries(st.text(max_size=6), key_text | json_values, max_size=3)
            | st.just({"a": PUBLIC})
        )
        return json.dumps(document).encode()
    if how == "json":
        return json.dumps(draw(json_values)).encode()
    if how == "deep":
        return draw(deep_json_text).encode()
    return draw(st.binary(max_size=64) | st.just(b'{"a": ' + b"1" * 5000 + b"}"))


@scaled(0.5)
@given(keys_files())
def test_a_tenant_keys_file_loads_or_is_refused_naming_the_flag(content):
    # prepare
    with TemporaryDirectory() as folder:
        path = Path(folder) / "keys.json"
        path.write_bytes(content)
        # execute / assert
        try:
            keys = signing.load_verify_keys(path)
        except SigningKeyError as exc:
            assert all(place.startswith(f"--tenant-keys {path}") for place, _ in exc.problems)
            assert all(reason.strip() for _, reason in exc.problems)
            return
    assert all(isinstance(tenant, str) for tenant in keys)


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_a_body_has_one_digest_however_it_is_cut(pieces):
    whole = signing.payload_digest([b"".join(pieces)])
    assert signing.payload_digest(pieces) == whole and len(whole) == signing.DIGEST_BYTES
