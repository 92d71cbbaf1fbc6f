"""Secure aggregation's messages (fedkube.wire.secagg): each taken, or refused by reason.

Both sides read what the other sends: the combiner a client's keys, sealed
shares, masked update and revealed shares; a client the combiner's share,
mask and unmask tasks. One region of four runs the protocol in memory, and
one message of one party is replaced by a broken copy of itself: keys
dropped or retyped, base64 of the wrong length, shares for another round or
of the other kind, a masked update of the wrong dtype or size. The receiver
takes it or refuses it by name (the combiner: ``UpdateRejected``; a client:
``SecureAggregationFailed``, it leaves the round), and the round ends with a
sum or with ``SecureAggregationFailed`` saying why, never anything else.
"""

from __future__ import annotations

import base64

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedkube.errors import SecureAggregationFailed, UpdateRejected
from fedkube.spec import SecureAggregation
from fedkube.wire import masking, secagg, shamir
from tests.fuzz.properties import json_values, mutated, refused_by_name, scaled, wrong_values

LENGTH = 40
NAMES = ["c0", "c1", "c2", "c3"]
STEPS = ["keys", "shares", "masked", "unmask"]


def b64_of_length(length: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=length, max_size=length).map(masking.b64)


# Strings a base64 field might hold instead of the right number of bytes.
base64_like = st.one_of(
    st.sampled_from([0, 1, 31, 33, 65, 67, 92, 96, 1000]).flatmap(b64_of_length),
    st.text(max_size=12),
    st.just("=" * 4),
    st.just("QUJD\n"),
    st.just("Q U J D"),
    wrong_values,
)


def messages(document: object) -> st.SearchStrategy[object]:
    """``document`` broken: structurally (fields gone, retyped) or a base64 field replaced."""
    in_place = st.builds(lambda x: x, mutated(document))
    if not isinstance(document, dict):
        return in_place
    fields = [key for key, value in document.items() if isinstance(value, str | dict)]
    if not fields:
        return in_place

    @st.composite
    def rewritten(draw: st.DrawFn) -> object:
        key = draw(st.sampled_from(fields))
        value = document[key]
        if isinstance(value, dict) and value:
            inner = draw(st.sampled_from(sorted(value)))
            item = value[inner]
            if isinstance(item, dict) and item:
                part = draw(st.sampled_from(sorted(item)))
                item = {**item, part: draw(base64_like | st.sampled_from(["b", "s", "3", "4"]))}
            else:
                item = draw(base64_like)
            return {**document, key: {**value, inner: item}}
        return {**document, key: draw(base64_like)}

    return st.one_of(in_place, rewritten())


class Region:
    """A combiner's session and its four clients, one message of one party broken."""

    def __init__(self) -> None:
        self.config = SecureAggregation(neighbours=None)
        rng = np.random.default_rng(0)
        self.updates = {u: rng.standard_normal(LENGTH).astype(np.float32) / 4 for u in NAMES}
        self.server = secagg.ServerSession("job", 4, self.config, LENGTH)
        self.clients = {u: secagg.ClientSession("job", 4, u) for u in NAMES}
        self.left: set[str] = set()  # clients that left the round (refused a task)

    def deliver(self, client: str, receive, document) -> None:
        """The server receives one message: taken, or refused by name (the client is out)."""
        try:
            receive(client, document)
        except UpdateRejected as exc:
            refused_by_name(exc)

    def task(self, client: str, call, task):
        """A client handles one task: its answer, or None once it left the round by name."""
        try:
            return call(task)
        except SecureAggregationFailed as exc:
            assert str(exc).strip()
            self.left.add(client)
            return None


def run(region: Region, data: st.DataObject, step: str, victim: str, side: str) -> None:
    """One round, in which ``side``'s message at ``step`` to or from ``victim`` is broken."""
    server = region.server

    def broken(name: str, at: str, document):
        if (name, at) != (victim, step):
            return document
        changed = data.draw(messages(document))
        # Every message is a JSON object by then (the intake and the worker's poll see to it).
        return changed if isinstance(changed, dict) else {"shares": changed}

    for u in NAMES:
        document = region.clients[u].advertisement()
        if side == "client":
            document = broken(u, "keys", document)
        region.deliver(u, lambda c, d: server.receive_keys(c, d, 1.0 + NAMES.index(c)), document)
    server.close_advertising()
    for u in sorted(server.members):
        task = server.share_task(u)
        if side == "server":
            task = broken(u, "shares", task)
        sealed = region.task(u, region.clients[u].share, task)
        if sealed is not None:
            document = {"shares": sealed}
            if side == "client":
                document = broken(u, "shares", document)
            region.deliver(u, server.receive_shares, document)
    server.close_sharing()
    for u in sorted(server.shared - region.left):
        task = server.mask_task(u)
        if side == "server":
            task = broken(u, "masked", task)
        ratio = (1.0 + NAMES.index(u)) / server.weight_total
        client = region.clients[u]
        masked = region.task(
            u, lambda t, c=client, u=u, r=ratio: c.mask(t, region.updates[u], r, 8.0), task
        )
        if masked is None:
            continue
        if side == "client" and (u, "masked") == (victim, step):
            masked = data.draw(masked_arrays(masked))
        region.deliver(u, server.receive_masked, masked)
    server.close_masking()
    for u in sorted(server.masked - region.left):
        task = server.unmask_task(u)
        if side == "server":
            task = broken(u, "unmask", task)
        reveals = region.task(u, region.clients[u].unmask, task)
        if reveals is not None:
            document = {"shares": reveals}
            if side == "client":
                document = broken(u, "unmask", document)
            region.deliver(u, server.receive_unmasking, document)


def masked_arrays(masked: np.ndarray) -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from(
        [
            masked.astype(np.int32),
            masked.astype(np.float32),
            masked[:-1],
            np.concatenate([masked, masked[:1]]),
            masked.reshape(4, -1).copy().reshape(-1),
            np.zeros(0, np.uint32),
        ]
    )


@scaled(0.5)
@given(
    st.data(),
    st.sampled_from(STEPS),
    st.sampled_from(NAMES),
    st.sampled_from(["client", "server"]),
)
def test_a_broken_message_is_taken_or_refused_and_the_round_sums_or_fails_by_name(
    data, step, victim, side
):
    # prepare / execute: the round, with one message broken
    region = Region()
    run(region, data, step, victim, side)
    # assert: the region's sum, or a named failure of the round
    try:
        total, survivors = region.server.finish()
    except SecureAggregationFailed as exc:
        assert str(exc).strip()
        return
    assert total.shape == (LENGTH,) and total.dtype == np.float32
    assert survivors <= set(NAMES) and np.isfinite(total).all()


def test_a_round_without_broken_messages_sums_exactly():
    # prepare / execute
    region = Region()
    run(region, None, "none", "nobody", "nobody")
    total, survivors = region.server.finish()
    # assert: the weighted sum of all four, within the fixed point's bound
    expected = sum((1.0 + i) * region.updates[u].astype(np.float64) for i, u in enumerate(NAMES))
    bound = masking.sum_error_bound(4, region.server.weight_total, 8.0)
    assert survivors == set(NAMES)
    np.testing.assert_allclose(total, expected, atol=bound + 1e-6)


# -- the pieces each message goes through ------------------------------------------------
@given(json_values | base64_like, st.sampled_from([32, 66, secagg.SEALED_BYTES]))
def test_a_base64_field_is_bytes_of_its_length_or_a_bad_share(text, length):
    try:
        data = masking.unb64(text, "field", length)
    except UpdateRejected as exc:
        refused_by_name(exc)
        assert exc.reason == "bad_share"
        return
    assert isinstance(data, bytes) and len(data) == length
    assert base64.b64decode(text, validate=True) == data


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_are_a_usable_key_or_a_bad_share(raw):
    try:
        assert masking.usable_key(raw) == raw
    except UpdateRejected as exc:
        refused_by_name(exc)


@given(
    st.dictionaries(
        st.integers(min_value=1, max_value=10_000),
        st.binary(min_size=shamir.SHARE_BYTES, max_size=shamir.SHARE_BYTES),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([shamir.SEED_BYTES, masking.KEY_BYTES]),
)
def test_any_revealed_shares_rebuild_a_secret_of_its_size_or_fail_by_name(shares, length):
    try:
        secret = shamir.combine(shares, length)
    except SecureAggregationFailed as exc:
        assert str(exc).strip()
        return
    assert len(secret) == length


# What a number in a task might be instead: json reads 1e999 as inf, and keeps 10**400 an int.
numbers = st.one_of(
    st.integers(min_value=-2, max_value=5),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400, 2**64, 2.5, True]),
    st.sampled_from(["2", "", None, [], {}]),
)


@st.composite
def share_tasks(draw: st.DrawFn) -> object:
    """A share task for c0 with one neighbour c1: each field right, wrong, or missing."""
    keys = secagg.ClientSession("job", 4, "c1").advertisement()
    peer = {"x": draw(numbers | st.just(2)), **keys}
    if draw(st.booleans()):
        peer = draw(messages(peer))
    task = {
        "x": draw(numbers | st.just(1)),
        "threshold": draw(numbers | st.just(2)),
        "weightTotal": draw(numbers | st.just(3.0)),
        "peers": draw(st.just({"c1": peer}) | st.just({}) | wrong_values),
    }
    for field in draw(st.lists(st.sampled_from(sorted(task)), max_size=2)):
        task.pop(field, None)
    return task if draw(st.integers(0, 3)) else draw(mutated(task))


@given(share_tasks())
def test_a_share_task_of_any_shape_is_used_or_the_client_leaves_by_name(task):
    client = secagg.ClientSession("job", 4, "c0")
    try:
        sealed = client.share(task)
    except SecureAggregationFailed as exc:
        assert str(exc).strip()
        return
    assert set(sealed) <= {"c1"}
