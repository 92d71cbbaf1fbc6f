"""Who may send what: the checks an update passes before it can touch the region's sum.

In the order a request meets them: the tenant's token (and that the client is
the tenant's, in this region; under mutual TLS, that the request came with the
tenant's certificate), the request's headers (job, codec, round,
weight under the tenant's cap), the signature header, and once the body is
read, the tenant's signature over job, round, client and body, the payload's
metadata against the headers, and finally the tensors themselves against the
model (structure, finiteness, norm; a central DP clip). Each failure is an
:class:`~fedkube.errors.UpdateRejected` naming the reason; nothing here
touches the round state, so a refused update cannot poison the round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from fedkube.aggregator.validation import Template, check_bound, check_update
from fedkube.errors import CodecError, SigningKeyError, UpdateRejected
from fedkube.service.certificates import identity
from fedkube.service.tls import Tls, require_peer
from fedkube.service.web import bearer, token_matches
from fedkube.spec import Client, FederatedJob
from fedkube.training import privacy
from fedkube.training.norms import l2_norm
from fedkube.wire import codec, compression, signing
from fedkube.wire.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    M_CLIENT,
    M_JOB,
    M_KIND,
    M_ROUND,
    M_TENANT,
    M_WEIGHT,
    Reason,
    check_metadata,
    parse_int,
    parse_weight,
)

# The folded form of an update: dense arrays, or compressed parts folded from their wire form.
Update = dict[str, np.ndarray | compression.Part]


@dataclass(frozen=True)
class Sender:
    """An update request whose headers passed: who sent it, for which round, with which weight."""

    tenant: str
    client: str
    round: int
    weight: float


class Admission:
    """The region's checks, from its clients, tokens, keys and the job's limits."""

    def __init__(
        self,
        job: FederatedJob,
        region: str,
        tenant_digests: Mapping[str, str],
        tenant_keys: Mapping[str, signing.VerifyKey],
        tls: Tls | None = None,
    ):
        self.job = job
        self.tls = tls
        self.name = job.name
        self.region = region
        self.clients: dict[str, Client] = {c.id: c for c in job.clients() if c.region == region}
        self.tenants = {c.tenant for c in self.clients.values()}
        self.tenant_digests = tenant_digests
        self.tenant_keys = tenant_keys
        self.weight_caps = {c: job.weight_cap(spec.tenant) for c, spec in self.clients.items()}
        self._check_keys()

    def _check_keys(self) -> None:
        """Every tenant of the region needs a public key, or none of its updates could pass."""
        missing = sorted(self.tenants - set(self.tenant_keys))
        if missing:
            reason = f"no public key (--tenant-keys) to check its updates in region {self.region}"
            raise SigningKeyError([(f"tenant {t!r}", reason) for t in missing])

    def authenticate(self, request: web.Request) -> str:
        """The request's tenant, once its token matches and its client (if any) is the tenant's."""
        tenant = request.headers.get(H_TENANT, "")
        if tenant not in self.tenants:
            raise UpdateRejected(
                Reason.unknown_tenant.value,
                f"tenant {tenant!r} is not served by region {self.region}",
                403,
            )
        if not token_matches(bearer(request), self.tenant_digests.get(tenant)):
            raise UpdateRejected(
                Reason.unauthenticated.value, f"bad or missing token for tenant {tenant!r}", 401
            )
        require_peer(request, self.tls, identity(self.name, "tenant", tenant))
        client = request.headers.get(H_CLIENT, "")
        if client and (client not in self.clients or self.clients[client].tenant != tenant):
            raise UpdateRejected(
                Reason.unknown_tenant.value,
                f"client {client!r} is not a client of tenant {tenant!r}",
                403,
            )
        return tenant

    def sender(self, request: web.Request, tenant: str) -> Sender:
        """An update request's job, codec, round and weight headers, checked."""
        client = request.headers.get(H_CLIENT, "")
        if request.headers.get(H_JOB) != self.name:
            raise UpdateRejected(
                Reason.metadata_mismatch.value,
                f"job {request.headers.get(H_JOB)!r} is not {self.name!r}",
            )
        if request.headers.get(H_CODEC, codec.CODEC) != codec.CODEC:
            raise UpdateRejected(
                Reason.malformed.value,
                f"codec {request.headers.get(H_CODEC)!r} is not supported",
                415,
            )
        number = parse_int(request.headers.get(H_ROUND), "round")
        weight = self.capped_weight(request.headers.get(H_WEIGHT), client, tenant)
        return Sender(tenant, client, number, weight)

    @staticmethod
    def signature(request: web.Request, tenant: str) -> bytes:
        """The signature header; missing or malformed, refused before the body is read."""
        return signing.parse_signature(request.headers.get(H_SIGNATURE), tenant)

    def capped_weight(self, value: str | None, client: str, tenant: str) -> float:
        """The weight a client claims, refused above its tenant's cap."""
        weight = parse_weight(value)
        cap = self.weight_caps.get(client)
        if cap is not None and weight > cap:
            raise UpdateRejected(
                Reason.weight_above_cap.value,
                f"weight {weight:g} is above the cap of {cap} samples for tenant {tenant!r} "
                "(spec.tenants[].maxWeight or spec.participation.maxWeight)",
            )
        return weight

    async def verify(self, sender: Sender, signature: bytes, body: memoryview) -> None:
        """Refuse an update that the tenant's key did not sign for this job, round and client.

        The round comes from the request, checked before, so an update replayed
        from an earlier round fails here even though its bytes are unchanged.
        """
        loop = asyncio.get_running_loop()
        # BLAKE3 releases the GIL: the loop goes on reading other updates.
        digest = await loop.run_in_executor(None, signing.payload_digest, (body,))
        signing.verify(
            self.tenant_keys[sender.tenant],
            signature,
            self.name,
            sender.round,
            sender.client,
            digest,
            tenant=sender.tenant,
        )

    def decode(
        self, body: memoryview, kind: str, sender: Sender
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """A payload's tensors and metadata, once its metadata agrees with its request's."""
        try:
            tensors, metadata = codec.decode(body)
        except CodecError as exc:
            raise UpdateRejected(Reason.malformed.value, str(exc)) from None
        check_metadata(
            metadata,
            {
                M_JOB: self.name,
                M_ROUND: str(sender.round),
                M_TENANT: sender.tenant,
                M_CLIENT: sender.client,
                M_KIND: kind,
            },
        )
        if parse_weight(metadata.get(M_WEIGHT)) != sender.weight:
            raise UpdateRejected(Reason.metadata_mismatch.value, "weight differs from header")
        return tensors, metadata

    def inspect(
        self, template: Template, tensors: dict[str, np.ndarray], metadata: dict[str, str]
    ) -> tuple[Update, float]:
        """The update in the form it is folded from, checked, and its L2 norm (in a thread)."""
        spec = self.job.spec
        bound = spec.transport.norm_bound
        if spec.compression.up.scheme == "none":
            norm = check_update(tensors, template, bound)
            privacy.check_clipped(spec.privacy.dp, norm)
            return dict(tensors), norm
        # Checked in its wire form and folded from it: no dense copy per update.
        shapes = {name: shape for name, (shape, _dtype) in template.items()}
        update = dict(compression.parse(tensors, metadata, shapes, spec.compression.up))
        norm = l2_norm(update)
        check_bound(norm, bound)
        return update, norm
