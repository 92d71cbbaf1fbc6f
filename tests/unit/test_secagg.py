"""Secure aggregation's pure parts: Shamir, fixed point, masks, the graph, both sessions."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from scipy.stats import chisquare

from fedkube.errors import SecureAggregationFailed, SpecError, UpdateRejected
from fedkube.spec import SecureAggregation, parse_job
from fedkube.wire import masking, secagg, shamir
from tests.support import small_job_dict


def looks_uniform(values: np.ndarray) -> bool:
    """Chi-square of the top byte of uint32 values against uniform, at the 0.1 % level."""
    counts = np.bincount((values >> 24).astype(np.int64), minlength=256)
    return bool(chisquare(counts).pvalue > 1e-3)


class Region:
    """A server session and its clients, driven through the protocol in memory."""

    def __init__(self, n: int, length: int = 500, **config: object):
        self.config = SecureAggregation(**config)  # type: ignore[arg-type]
        rng = np.random.default_rng(n)
        self.names = [f"c{i:02d}" for i in range(n)]
        self.updates = {
            u: (0.05 * rng.standard_normal(length)).astype(np.float32) for u in self.names
        }
        self.weights = {u: float(5 + 3 * i) for i, u in enumerate(self.names)}
        self.server = secagg.ServerSession("job", 4, self.config, length)
        self.clients = {u: secagg.ClientSession("job", 4, u) for u in self.names}
        self.sent: dict[str, np.ndarray] = {}

    def advertise(self) -> None:
        for u in self.names:
            self.server.receive_keys(u, self.clients[u].advertisement(), self.weights[u])
        self.server.close_advertising()

    def share(self, skip: tuple[str, ...] = ()) -> None:
        for u in self.names:
            if u not in skip:
                sealed = self.clients[u].share(self.server.share_task(u))
                self.server.receive_shares(u, {"shares": sealed})
        self.server.close_sharing()

    def mask(self, skip: tuple[str, ...] = ()) -> None:
        for u in sorted(self.server.shared):
            if u not in skip:
                ratio = self.weights[u] / self.server.weight_total
                masked = self.clients[u].mask(
                    self.server.mask_task(u), self.updates[u], ratio, self.config.clip_range
                )
                self.sent[u] = masked
                self.server.receive_masked(u, masked)
        self.server.close_masking()

    def unmask(self, skip: tuple[str, ...] = ()) -> None:
        for u in sorted(self.server.masked):
            if u not in skip:
                shares = self.clients[u].unmask(self.server.unmask_task(u))
                self.server.receive_unmasking(u, {"shares": shares})

    def expected(self, clients: set[str]) -> np.ndarray:
        return sum(self.weights[u] * self.updates[u].astype(np.float64) for u in clients)


def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    # prepare
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], threshold=3)
    # execute / assert
    for chosen in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert shamir.combine({x: shares[x] for x in chosen}) == secret
    # Two points of a degree-2 polynomial give a line, whose value at 0 is another
    # number of the field: almost surely not even one of 32 bytes.
    with pytest.raises(SecureAggregationFailed, match="expected size"):
        shamir.combine({x: shares[x] for x in (1, 2)})
    assert all(len(share) == shamir.SHARE_BYTES for share in shares.values())


def test_fixed_point_sums_of_extreme_updates_do_not_overflow():
    # prepare: a region of 1000 clients, every coordinate at +clipRange or -clipRange
    clip, n = 8.0, 1000
    top = np.full(4, clip, np.float32)
    # execute: each client's share of the weight is 1/n, so the sum is ±clip
    up = sum(masking.encode(top, 1 / n, clip).astype(np.uint64) for _ in range(n))
    down = sum(masking.encode(-top, 1 / n, clip).astype(np.uint64) for _ in range(n))
    # assert: the mod-2^32 sums decode to ±clip·(total weight n) within the bound
    bound = masking.sum_error_bound(n, n, clip)
    for total, want in ((up, clip * n), (down, -clip * n)):
        decoded = masking.decode((total % 2**32).astype(np.uint32), n, clip)
        assert np.all(np.abs(decoded - want) <= bound), decoded


def test_masks_cancel_and_survivors_sum_exactly():
    # prepare
    region = Region(6)
    # execute
    region.advertise()
    region.share()
    region.mask()
    region.unmask()
    total, survivors = region.server.finish()
    # assert
    assert survivors == set(region.names)
    bound = masking.sum_error_bound(6, region.server.weight_total, region.config.clip_range)
    np.testing.assert_allclose(total, region.expected(survivors), atol=bound + 1e-6)


@pytest.mark.parametrize("dropped", [("c03",), ("c01", "c05")])
def test_clients_dropped_after_sharing_are_recovered(dropped):
    # prepare: seven clients (each shares among six neighbours, threshold 4)
    region = Region(7)
    region.advertise()
    region.share()
    # execute: the dropped clients never send their masked update
    region.mask(skip=dropped)
    region.unmask()
    total, survivors = region.server.finish()
    # assert: exactly the survivors' sum
    assert survivors == set(region.names) - set(dropped)
    bound = masking.sum_error_bound(7, region.server.weight_total, region.config.clip_range)
    np.testing.assert_allclose(total, region.expected(survivors), atol=bound + 1e-6)


def test_below_the_threshold_the_sum_fails_saying_how_many_shares_were_needed():
    # prepare: six clients share among five neighbours each, threshold 4
    region = Region(6)
    region.advertise()
    region.share()
    region.mask()
    # execute: three of the six do not reveal their shares
    region.unmask(skip=("c00", "c01", "c02"))
    # assert
    with pytest.raises(SecureAggregationFailed, match=r"needs 4 shares, 3 arrived"):
        region.server.finish()


def test_a_masked_update_looks_uniform_and_its_plain_encoding_does_not():
    # prepare
    region = Region(5, length=50_000)
    region.advertise()
    region.share()
    # execute
    region.mask()
    # assert: the test would fail for an update sent without masks
    plain = masking.encode(region.updates["c00"], 0.2, region.config.clip_range)
    assert not looks_uniform(plain)
    assert all(looks_uniform(masked) for masked in region.sent.values())


def test_a_wrong_length_share_is_refused_by_name():
    # prepare
    region = Region(5)
    region.advertise()
    sealed = region.clients["c00"].share(region.server.share_task("c00"))
    short = base64.b64decode(sealed["c01"])[:-6]
    sealed["c01"] = base64.b64encode(short).decode()
    # execute / assert
    with pytest.raises(UpdateRejected) as refused:
        region.server.receive_shares("c00", {"shares": sealed})
    assert refused.value.reason == "bad_share"
    assert "c00's share for c01 is 154 bytes, expected 160" in refused.value.detail
    assert "c00" not in region.server.shared


def test_a_share_revealed_for_another_round_is_refused_by_name():
    # prepare
    region = Region(5)
    region.advertise()
    region.share()
    region.mask()
    shares = region.clients["c00"].unmask(region.server.unmask_task("c00"))
    first = next(iter(shares))
    shares[first] = {**shares[first], "round": "3"}
    # execute / assert
    with pytest.raises(UpdateRejected) as refused:
        region.server.receive_unmasking("c00", {"shares": shares})
    assert refused.value.reason == "wrong_round"
    assert f"c00's share of {first} is for round 3, this is round 4" in refused.value.detail


def test_a_client_never_reveals_both_secrets_of_one_neighbour():
    # prepare
    region = Region(5)
    region.advertise()
    region.share()
    region.mask()
    # execute / assert: a server that calls c01 both a survivor and dropped
    with pytest.raises(SecureAggregationFailed, match="both survivors and dropped"):
        region.clients["c00"].unmask({"survivors": ["c01"], "dropped": ["c01"]})


def test_the_neighbour_graph_is_symmetric_of_the_asked_degree():
    roster = [f"c{i:03d}" for i in range(100)]
    graph = masking.neighbours(roster, masking.default_degree(100), b"seed")
    assert masking.default_degree(100) == 16
    assert all(len(peers) == 16 for peers in graph.values())
    assert all(u in graph[v] for u, peers in graph.items() for v in peers)
    assert masking.neighbours(roster[:8], 16, b"seed")["c000"] == roster[1:8]  # complete


def test_a_region_too_small_to_hide_a_client_is_refused():
    document = small_job_dict(privacy={"secureAggregation": {}})
    with pytest.raises(SpecError, match=r"region 'eu' has 2 clients"):
        parse_job(document)
    document["spec"]["tenants"] = [
        {"name": t, "region": r, "replicas": 3} for t, r in (("a", "eu"), ("c", "us"))
    ]
    document["spec"]["transport"] = {"normBound": 5.0}
    with pytest.raises(SpecError, match=r"spec.transport.normBound: a masked update's norm"):
        parse_job(document)


def test_a_low_order_key_is_refused_before_any_peer_uses_it():
    # prepare: the all-zero point makes every X25519 agreement with it zero
    region = Region(5)
    zero = base64.b64encode(bytes(32)).decode()
    # execute / assert
    with pytest.raises(UpdateRejected) as refused:
        region.server.receive_keys("c00", {"c": zero, "s": zero}, 1.0)
    assert refused.value.reason == "bad_share"
    assert "not a usable X25519 public key" in refused.value.detail


def test_a_client_leaves_rather_than_share_under_a_threshold_of_half_or_less():
    # prepare
    region = Region(5)
    region.advertise()
    task = region.server.share_task("c00")
    # execute / assert: five holders (four neighbours and itself), threshold 2
    with pytest.raises(SecureAggregationFailed, match="threshold 2 for 5 share holders"):
        region.clients["c00"].share({**task, "threshold": 2})
    with pytest.raises(SecureAggregationFailed, match="a share task we cannot use"):
        region.clients["c01"].share({**task, "peers": {"c02": {"x": 3}}})


@pytest.mark.parametrize(
    "change",
    [
        # json reads 1e999 as inf: int(inf) raised OverflowError
        lambda task: {
            **task,
            "peers": {v: {**p, "x": float("inf")} for v, p in task["peers"].items()},
        },
        # json keeps 10**400 an int: float(10**400) raised OverflowError
        lambda task: {**task, "weightTotal": 10**400},
    ],
    ids=["infinite-point", "huge-weight-total"],
)
def test_a_share_task_with_numbers_beyond_float_makes_the_client_leave_by_name(change):
    # prepare
    region = Region(5)
    region.advertise()
    task = change(region.server.share_task("c00"))
    # execute / assert
    with pytest.raises(SecureAggregationFailed, match="a share task we cannot use"):
        region.clients["c00"].share(task)
