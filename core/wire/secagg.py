"""Secure aggregation: a region's combiner learns the sum of its updates, not one of them.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") over the neighbour graph of SecAgg+
(Bell et al. 2020), run by each regional combiner for its own clients. This
module is its pure part, with no I/O: the client's and the server's state
machines, built from :mod:`.masking` (keys, masks, fixed point, the neighbour
graph) and :mod:`.shamir`. ``aggregator/combiner/secure_intake`` drives the
server side over HTTP (``secure_region`` times its steps),
``workers/secure_client`` the client side.

Over 400 lines on purpose: the protocol's description below and both state
machines stay in one file, so that each step's client half and server half,
and the checks each side makes of the other, read side by side.

One round, per region (U1 ⊇ U2 ⊇ U3 are the clients still in at each step)::

  1. advertise  client: trains, then sends two fresh X25519 public keys
                (c: to encrypt shares, s: to agree masks) and its weight.
  2. share      server: picks the neighbour graph over U1 (a ring of degree
                k over a permutation seeded by the round) and sends each
                client its neighbours' keys. Client: draws a self-mask seed
                b_u, Shamir-shares b_u and its mask key s_u^SK among its k
                neighbours and itself (threshold t = ⌈threshold·(k + 1)⌉),
                encrypts each neighbour's share pair with AES-GCM under
                HKDF(X25519(c_u, c_v)). U2: who sent.
  3. mask       server: routes each client the ciphertexts addressed to it.
                Client: sends y_u = encode(x_u) + PRG(b_u)
                + Σ_{v∈N(u)∩U2} ±PRG(s_uv) (mod 2^32); U3: who sent.
  4. unmask     server: tells each client which neighbours sent (U3) and
                which dropped (U2 \\ U3). Client: reveals its share of b_v for
                each v in U3 (itself included) and of s_v^SK for each dropped
                v, never both for one v. Server: rebuilds them from t shares each, removes the
                self masks and the dropped clients' pairwise masks, and
                decodes Σ_{U3} x_u. Pairwise masks between survivors cancel.

The PRG is AES-256 in counter mode (``cryptography``), its key stream read
by numpy as uint32: a cryptographic PRG, unlike numpy's own generators, whose
state can be recovered from their output.

Fixed-point encoding (the modulus is 2^32, as a uint32 per parameter, so a
masked update is exactly the size of its float32 form):

* every coordinate is clipped to ``[-c, c]`` (``clipRange``) and multiplied
  by the client's share of the region's weight, ``ρ_u = s_u / S`` (``s_u``
  its fold scale, ``S`` the sum over U1, announced in step 2);
* with ``f = 30 - ⌈log2 c⌉`` fractional bits, ``q_u = round(ρ_u·x_u·2^f)``,
  stored as two's complement mod 2^32;
* any subset of U1 sums to at most ``c·2^f ≤ 2^30`` in magnitude, plus at
  most ``n/2`` from rounding: below 2^31 for any region of fewer than 2^30
  clients, so the int32 reading of the sum is exact (no overflow);
* decoded, ``Σ q_u / 2^f · S`` is ``Σ s_u·x_u`` to within
  ``|U3|·S/2^(f+1)`` per coordinate (:func:`.masking.sum_error_bound`).

What it assumes: an honest-but-curious combiner (it follows the protocol but
may read everything it gets) and clients that follow the protocol. It does
not protect against a combiner that lies about who dropped to learn one
client's update (Bonawitz's active-adversary variant signs the key
advertisements for that), and the combiner cannot check a masked update's
norm or finiteness: a malicious client can shift the sum.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedkube.errors import SecureAggregationFailed, UpdateRejected
from fedkube.spec import SecureAggregation
from fedkube.wire.masking import (
    KEY_BYTES,
    agree,
    apply_masks,
    b64,
    bound_context,
    decode,
    default_degree,
    encode,
    neighbours,
    pair_context,
    pairwise_sign,
    private_bytes,
    public_bytes,
    threshold_for,
    unb64,
    usable_key,
)
from fedkube.wire.protocol import Reason
from fedkube.wire.shamir import SEED_BYTES, SHARE_BYTES, combine, split

# One encrypted share pair (of b_u and of s_u^SK): nonce, both shares, GCM tag.
NONCE_BYTES = 12
TAG_BYTES = 16
SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES

SELF = "b"  # a revealed share of a client's self-mask seed
PAIRWISE = "s"  # a revealed share of a dropped client's mask key


# -- the client's side -------------------------------------------------------------
@dataclass
class Peer:
    """A neighbour as the server announced it in step 2."""

    x: int  # its Shamir point (1-based place in the round's roster)
    c: bytes  # its public key for share encryption
    s: bytes  # its public key for mask agreement


@dataclass
class ClientSession:
    """One client's secrets and view for one round; dropped when the round ends."""

    job: str
    round: int
    client: str
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(SEED_BYTES))
    peers: dict[str, Peer] = field(default_factory=dict)
    weight_total: float = 0.0
    received: dict[str, bytes] = field(default_factory=dict)  # sealed shares addressed to us
    own_seed_share: bytes = b""
    # What step 4 revealed, and for which survivors and dropouts: a retry of the
    # same request gets the same answer, a different one gets nothing.
    revealed: tuple[frozenset[str], frozenset[str], dict[str, dict[str, str]]] | None = None

    def advertisement(self) -> dict[str, str]:
        return {"c": b64(public_bytes(self.c_key)), "s": b64(public_bytes(self.s_key))}

    def share(self, task: Mapping[str, object]) -> dict[str, str]:
        """Step 2: our seed and mask key, split among our neighbours and sealed for each."""
        own, threshold = self._read_share_task(task)
        xs = [own, *(peer.x for peer in self.peers.values())]
        seed_shares = split(self.seed, xs, threshold)
        key_shares = split(private_bytes(self.s_key), xs, threshold)
        # Our own share of our seed, revealed in step 4 like the others' (Bonawitz).
        self.own_seed_share = seed_shares[own]
        sealed = {}
        for name, peer in self.peers.items():
            key = agree(
                self.c_key,
                peer.c,
                b"fedkube-secagg-share",
                pair_context(self.job, self.round, self.client, name),
            )
            nonce = secrets.token_bytes(NONCE_BYTES)
            body = seed_shares[peer.x] + key_shares[peer.x]
            aad = bound_context(self.job, self.round, self.client, name)
            sealed[name] = b64(nonce + AESGCM(key).encrypt(nonce, body, aad))
        return sealed

    def _read_share_task(self, task: Mapping[str, object]) -> tuple[int, int]:
        """Our point and the threshold; our neighbours and the weight total are kept.

        What the server sends is checked like any input: a task we cannot use
        makes us leave the round (:class:`SecureAggregationFailed`).
        """
        try:
            peers, own, threshold = task["peers"], task["x"], task["threshold"]
            total = float(task["weightTotal"])  # type: ignore[arg-type]
            if not isinstance(peers, dict) or not isinstance(own, int):
                raise TypeError("peers must map names to keys, x must be an integer")
            for name, peer in peers.items():
                self.peers[str(name)] = Peer(
                    x=int(peer["x"]),
                    c=usable_key(unb64(peer["c"], f"{name}'s c key", KEY_BYTES)),
                    s=usable_key(unb64(peer["s"], f"{name}'s s key", KEY_BYTES)),
                )
        # OverflowError: a point of 1e999 (json reads it as inf), a total of 10**400.
        except (KeyError, TypeError, ValueError, OverflowError, UpdateRejected) as exc:
            raise SecureAggregationFailed(f"a share task we cannot use: {exc}") from None
        xs = [own, *(peer.x for peer in self.peers.values())]
        if len(set(xs)) != len(xs) or min(xs) < 1:
            raise SecureAggregationFailed("the share task's points are not distinct and positive")
        if not isinstance(threshold, int) or not len(xs) / 2 < threshold <= len(xs):
            # A threshold of half the holders or less would let fewer of them collude.
            raise SecureAggregationFailed(
                f"threshold {threshold!r} for {len(xs)} share holders: more than half needed"
            )
        if not total > 0:
            raise SecureAggregationFailed("the share task's weight total is not positive")
        self.weight_total = total
        return own, threshold

    def mask(
        self, task: Mapping[str, object], flat: np.ndarray, ratio: float, clip_range: float
    ) -> np.ndarray:
        """Step 3: our encoded update, masked (``flat`` is not changed)."""
        shares = task.get("shares")
        if not isinstance(shares, dict):
            raise SecureAggregationFailed("mask task without shares")
        for sender, sealed in shares.items():
            if sender not in self.peers:
                raise SecureAggregationFailed(f"a share from {sender!r}, not a neighbour")
            try:
                self.received[sender] = unb64(sealed, f"share from {sender}", SEALED_BYTES)
            except UpdateRejected as exc:
                raise SecureAggregationFailed(exc.detail) from None
        values = encode(flat, ratio, clip_range)
        plus: list[bytes] = [self.seed]
        minus: list[bytes] = []
        for name in self.received:  # the neighbours that shared (U2)
            key = self._pair_key(name)
            (plus if pairwise_sign(self.client, name) > 0 else minus).append(key)
        apply_masks(values, plus, minus)
        return values

    def _pair_key(self, name: str) -> bytes:
        return agree(
            self.s_key,
            self.peers[name].s,
            b"fedkube-secagg-mask",
            pair_context(self.job, self.round, self.client, name),
        )

    def unmask(self, task: Mapping[str, object]) -> dict[str, dict[str, str]]:
        """Step 4: for each neighbour that shared, its seed's share or (dropped) its key's."""
        survivors = set(_names(task.get("survivors")))
        dropped = set(_names(task.get("dropped")))
        if survivors & dropped:
            # Revealing both for one client would unmask its update.
            raise SecureAggregationFailed(
                f"the server calls {sorted(survivors & dropped)} both survivors and dropped"
            )
        if self.revealed is not None:
            if self.revealed[:2] != (frozenset(survivors), frozenset(dropped)):
                raise SecureAggregationFailed(
                    "asked again to reveal shares, for other survivors and dropouts"
                )
            return self.revealed[2]
        answer: dict[str, dict[str, str]] = {}
        if self.client in survivors:
            answer[self.client] = {
                "kind": SELF,
                "share": b64(self.own_seed_share),
                "round": str(self.round),
            }
        for sender in (survivors | dropped) & self.received.keys():
            seed_share, key_share = self._open(sender)
            if sender in survivors:
                answer[sender] = {"kind": SELF, "share": b64(seed_share), "round": str(self.round)}
            else:
                answer[sender] = {
                    "kind": PAIRWISE,
                    "share": b64(key_share),
                    "round": str(self.round),
                }
        self.revealed = (frozenset(survivors), frozenset(dropped), answer)
        return answer

    def _open(self, sender: str) -> tuple[bytes, bytes]:
        sealed = self.received[sender]
        key = agree(
            self.c_key,
            self.peers[sender].c,
            b"fedkube-secagg-share",
            pair_context(self.job, self.round, sender, self.client),
        )
        aad = bound_context(self.job, self.round, sender, self.client)
        try:
            body = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
        except InvalidTag:
            raise SecureAggregationFailed(
                f"the share from {sender} does not decrypt for round {self.round}"
            ) from None
        return body[:SHARE_BYTES], body[SHARE_BYTES:]


def _names(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SecureAggregationFailed("expected a list of client names")
    return value


# -- the server's side -------------------------------------------------------------
@dataclass
class _Member:
    c: bytes
    s: bytes
    scale: float  # its fold scale s_u (what its update is weighted by)
    x: int = 0
    sealed: dict[str, bytes] = field(default_factory=dict)  # recipient -> ciphertext
    reveals: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # about -> (kind, share)


class ServerSession:
    """A combiner's view of one round's protocol for its region.

    ``step`` goes advertise, share, mask, unmask, finish (the driver's: the
    sum is due), done. Steps advance when the driver says so (everyone
    answered, or the step's time ran out); each ``receive_*`` checks its input and raises
    :class:`~fedkube.errors.UpdateRejected` (reason ``bad_share`` or
    ``wrong_round``) without changing anything when it is refused.
    """

    def __init__(self, job: str, number: int, config: SecureAggregation, length: int):
        self.job = job
        self.round = number
        self.config = config
        self.step = "advertise"
        self.members: dict[str, _Member] = {}
        self.graph: dict[str, list[str]] = {}
        self.threshold = 0
        self.weight_total = 0.0
        self.shared: set[str] = set()  # U2
        self.masked: set[str] = set()  # U3
        self.unmasked: set[str] = set()
        self.total = np.zeros(length, np.uint32)

    # step 1
    def receive_keys(self, client: str, document: Mapping[str, object], scale: float) -> None:
        self._expect("advertise", client)
        if client in self.members:
            raise UpdateRejected(Reason.duplicate.value, f"{client} already sent its keys", 409)
        self.members[client] = _Member(
            c=usable_key(unb64(document.get("c"), "key c", KEY_BYTES)),
            s=usable_key(unb64(document.get("s"), "key s", KEY_BYTES)),
            scale=scale,
        )

    def close_advertising(self) -> None:
        """U1 is fixed: the graph, every member's point and the threshold follow."""
        roster = sorted(self.members)
        for x, client in enumerate(roster, start=1):
            self.members[client].x = x
        degree = self.config.neighbours or default_degree(len(roster))
        seed = hashlib.sha256(
            b"fedkube-secagg-graph" + bound_context(self.job, self.round)
        ).digest()
        self.graph = neighbours(roster, degree, seed) if len(roster) > 1 else {}
        # A client's share holders: its neighbours and itself (Bonawitz shares to all of U1).
        holders = 1 + min((len(p) for p in self.graph.values()), default=0)
        self.threshold = threshold_for(holders, self.config.threshold)
        self.weight_total = sum(m.scale for m in self.members.values())
        self.step = "share"

    def share_task(self, client: str) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "x": self.members[client].x,
            "weightTotal": self.weight_total,
            "peers": {
                v: {
                    "x": self.members[v].x,
                    "c": b64(self.members[v].c),
                    "s": b64(self.members[v].s),
                }
                for v in self.graph.get(client, [])
            },
        }

    # step 2
    def receive_shares(self, client: str, document: Mapping[str, object]) -> None:
        self._expect("share", client)
        if client in self.shared:
            raise UpdateRejected(Reason.duplicate.value, f"{client} already shared", 409)
        sealed = document.get("shares")
        expected = set(self.graph.get(client, []))
        if not isinstance(sealed, dict) or set(sealed) != expected:
            raise UpdateRejected(
                Reason.bad_share.value,
                f"{client} must send one sealed share to each of its {len(expected)} neighbours",
            )
        checked = {
            v: unb64(text, f"{client}'s share for {v}", SEALED_BYTES) for v, text in sealed.items()
        }
        self.members[client].sealed = checked
        self.shared.add(client)

    def close_sharing(self) -> None:
        self.step = "mask"

    def mask_task(self, client: str) -> dict[str, object]:
        """The sealed shares addressed to ``client`` from its neighbours in U2."""
        return {
            "shares": {
                u: b64(self.members[u].sealed[client])
                for u in self.graph.get(client, [])
                if u in self.shared
            }
        }

    # step 3
    def receive_masked(self, client: str, values: np.ndarray) -> None:
        """Add one masked update (flat uint32 of the model's length) to the running total."""
        self._expect("mask", client)
        if client not in self.shared:
            raise UpdateRejected(Reason.bad_share.value, f"{client} did not share its keys")
        if client in self.masked:
            raise UpdateRejected(Reason.duplicate.value, f"{client} already reported", 409)
        if values.dtype != np.uint32 or values.size != self.total.size:
            raise UpdateRejected(
                Reason.wrong_shape.value,
                f"a masked update is {self.total.size} uint32 values, got {values.size} "
                f"{values.dtype}",
            )
        np.add(self.total, values, out=self.total)
        self.masked.add(client)

    def close_masking(self) -> None:
        self.step = "unmask"

    def unmask_task(self, client: str) -> dict[str, object]:
        survivors, dropped = self._fates(client)
        return {"survivors": survivors, "dropped": dropped}

    def _fates(self, client: str) -> tuple[list[str], list[str]]:
        """``client``'s neighbours that shared: those that sent an update, those that did not."""
        mine = [v for v in self.graph.get(client, []) if v in self.shared]
        if client in self.masked:
            mine.append(client)  # it holds a share of its own seed too
        return [v for v in mine if v in self.masked], [v for v in mine if v not in self.masked]

    # step 4
    def receive_unmasking(self, client: str, document: Mapping[str, object]) -> None:
        self._expect("unmask", client)
        if client in self.unmasked:
            raise UpdateRejected(Reason.duplicate.value, f"{client} already unmasked", 409)
        reveals = document.get("shares")
        survivors, dropped = self._fates(client)
        expected = {v: SELF for v in survivors} | {v: PAIRWISE for v in dropped}
        if not isinstance(reveals, dict) or set(reveals) != set(expected):
            raise UpdateRejected(
                Reason.bad_share.value,
                f"{client} must reveal a share for each of {sorted(expected)}",
            )
        checked = {}
        for about, reveal in reveals.items():
            if not isinstance(reveal, dict):
                raise UpdateRejected(
                    Reason.bad_share.value, f"the share of {about} is not an object"
                )
            if reveal.get("round") != str(self.round):
                raise UpdateRejected(
                    Reason.wrong_round.value,
                    f"{client}'s share of {about} is for round {reveal.get('round')}, "
                    f"this is round {self.round}",
                    409,
                )
            if reveal.get("kind") != expected[about]:
                raise UpdateRejected(
                    Reason.bad_share.value,
                    f"{client} must reveal the {'seed' if expected[about] == SELF else 'mask key'}"
                    f" share of {about}",
                )
            checked[about] = (
                expected[about],
                unb64(reveal.get("share"), f"{client}'s share of {about}", SHARE_BYTES),
            )
        self.members[client].reveals = checked
        self.unmasked.add(client)

    def finish(self) -> tuple[np.ndarray, set[str]]:
        """The region's decoded ``Σ s_u·x_u`` over U3, and U3 itself.

        Raises :class:`~fedkube.errors.SecureAggregationFailed` naming the
        shares needed and arrived when some secret cannot be rebuilt.
        """
        self.step = "done"
        plus: list[bytes] = []
        minus: list[bytes] = []
        for v in sorted(self.masked):
            minus.append(self._rebuild(v, SELF))
        for v in sorted(self.shared - self.masked):
            key = X25519PrivateKey.from_private_bytes(self._rebuild(v, PAIRWISE))
            if public_bytes(key) != self.members[v].s:
                raise SecureAggregationFailed(
                    f"the shares of {v}'s mask key rebuild a key that is not the one it advertised"
                )
            for u in self.graph.get(v, []):
                if u in self.masked:
                    pair = agree(
                        key,
                        self.members[u].s,
                        b"fedkube-secagg-mask",
                        pair_context(self.job, self.round, u, v),
                    )
                    # u added sign(u, v)·PRG(pair): take it out again.
                    (minus if pairwise_sign(u, v) > 0 else plus).append(pair)
        total = self.total
        apply_masks(total, plus, minus)
        return decode(total, self.weight_total, self.config.clip_range), set(self.masked)

    def _rebuild(self, about: str, kind: str) -> bytes:
        shares = {
            self.members[holder].x: reveal[1]
            for holder in [about, *self.graph.get(about, [])]
            if holder in self.unmasked
            and (reveal := self.members[holder].reveals.get(about)) is not None
            and reveal[0] == kind
        }
        if len(shares) < self.threshold:
            what = "self-mask seed" if kind == SELF else "mask key"
            raise SecureAggregationFailed(
                f"round {self.round}: rebuilding {about}'s {what} needs {self.threshold} shares, "
                f"{len(shares)} arrived"
            )
        chosen = dict(sorted(shares.items())[: self.threshold])
        return combine(chosen, SEED_BYTES if kind == SELF else KEY_BYTES)

    def _expect(self, step: str, client: str) -> None:
        if self.step != step:
            raise UpdateRejected(
                Reason.late.value,
                f"round {self.round} is at step {self.step!r}, not {step!r} ({client})",
                410,
            )
        if step != "advertise" and client not in self.members:
            raise UpdateRejected(
                Reason.not_selected.value, f"{client} did not advertise keys this round", 403
            )
