"""The global tier's HTTP API, handlers only: what combiners and operators ask of it.

``GET /v1/model/{version}`` (the model a round trains), ``POST /v1/partial``
(a region's sums), ``GET /v1/status``, ``/healthz`` and ``/metrics``. A
partial is made durable (the checkpoint volume) before it is acknowledged;
a refused one is counted, logged and answered by
:func:`fedkube.aggregator.refusals.refuse`.

Every request carries a region combiner's token; a partial is taken only
from the credential of the region it is for, and only if that region's key
signed it: one combiner (or its stolen token) cannot post another region's
sums. Under mutual TLS (``spec.transport.tls``) the request must also come
with that region's certificate.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from fedkube.aggregator.global_aggregator.common import TIER, log
from fedkube.aggregator.global_aggregator.wire import decode_partial
from fedkube.aggregator.refusals import refuse
from fedkube.aggregator.strategies.sums import Partial
from fedkube.errors import UpdateRejected
from fedkube.service.bodies import Pace, announced_length, read_own_body
from fedkube.service.certificates import identity
from fedkube.service.logs import fields
from fedkube.service.tls import require_peer
from fedkube.service.web import bearer, digest, json_error, send_payload, start_site
from fedkube.state import checkpoint
from fedkube.wire import signing
from fedkube.wire.protocol import H_JOB, H_REGION, H_ROUND, H_SIGNATURE, Reason, parse_int

# A partial is a sum over the model's float32 tensors: as large as an update, with room
# for metadata; the limit on a body is this times spec.transport.maxUpdateBytes.
PARTIAL_LIMIT_FACTOR = 4

if TYPE_CHECKING:
    from fedkube.aggregator.global_aggregator.service import GlobalAggregator


def app(agg: GlobalAggregator) -> web.Application:
    routes = Routes(agg)
    application = web.Application(
        client_max_size=PARTIAL_LIMIT_FACTOR * agg.spec.transport.max_update_bytes
    )
    application.router.add_get("/v1/model/{version}", routes.model)
    application.router.add_post("/v1/partial", routes.partial)
    application.router.add_get("/v1/status", routes.status)
    application.router.add_get("/metrics", agg.metrics.handle)
    application.router.add_get("/healthz", routes.health)
    return application


async def serve(agg: GlobalAggregator) -> tuple[web.AppRunner, int]:
    """Serve :func:`app` on the configured address; the runner and the port bound."""
    return await start_site(app(agg), agg.config.host, agg.config.port, agg.config.tls)


class Routes:
    """The handlers, over the aggregator's state."""

    def __init__(self, agg: GlobalAggregator):
        self.agg = agg

    def _credential(self, request: web.Request) -> str | None:
        """The region whose combiner's token the request carries (None: no region's)."""
        presented = bearer(request)
        if presented is None:
            return None
        seen = digest(presented)
        owners = [
            region
            for region, expected in self.agg.config.region_digests.items()
            if hmac.compare_digest(seen, expected)  # every one compared: no early exit
        ]
        return owners[0] if owners else None

    def _caller(self, request: web.Request) -> str:
        """The region calling: its combiner's token and, under mutual TLS, its certificate."""
        owner = self._credential(request)
        if owner is None:
            raise UpdateRejected(Reason.unauthenticated.value, "bad or missing token", 401)
        require_peer(request, self.agg.config.tls, identity(self.agg.name, "region", owner))
        return owner

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "round": self.agg.round_no})

    async def status(self, request: web.Request) -> web.Response:
        try:
            self._caller(request)
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        agg = self.agg
        return web.json_response(
            {
                "job": agg.name,
                "last_closed_round": agg.round_no,
                "version": agg.version,
                "partials": sorted(agg.partials),
            }
        )

    async def model(self, request: web.Request) -> web.StreamResponse:
        try:
            self._caller(request)
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        try:
            version = int(request.match_info["version"])
        except ValueError:
            return json_error(400, Reason.malformed.value, "version must be an integer")
        data = self.agg.model_bytes.get(version)
        if data is None:
            return json_error(
                404,
                "unknown_version",
                f"model version {version} is not served (current {self.agg.version})",
            )
        region = request.query.get("region", "")
        self.agg.metrics.bytes_down.labels(self.agg.name, TIER, region, "").inc(len(data))
        return await send_payload(request, data)

    async def partial(self, request: web.Request) -> web.Response:
        agg = self.agg
        region = request.headers.get(H_REGION, "")
        label = region if region in agg.regions else "unknown"
        try:
            owner = self._caller(request)
            if owner != region:
                raise UpdateRejected(
                    Reason.wrong_region.value,
                    f"the credential of region {owner!r} cannot send region {region!r}'s partial",
                    403,
                )
            partial, body = await self._accept(request, region)
        except UpdateRejected as exc:
            return refuse(
                exc,
                what="partial",
                metrics=agg.metrics,
                log=log,
                job=agg.name,
                tier=TIER,
                region=label,
            )
        agg.metrics.bytes_up.labels(agg.name, TIER, region, "").inc(len(body))
        agg.metrics.updates_accepted.labels(agg.name, TIER, region, "").inc()
        agg.arrived.set()
        return web.json_response({"status": "accepted", "region": partial.region})

    async def _accept(self, request: web.Request, region: str) -> tuple[Partial, memoryview]:
        agg = self.agg
        if request.headers.get(H_JOB) != agg.name:
            raise UpdateRejected(Reason.metadata_mismatch.value, "partial for another job")
        if region not in agg.regions:
            raise UpdateRejected(Reason.unknown_tenant.value, f"unknown region {region!r}", 403)
        number = parse_int(request.headers.get(H_ROUND), "round")
        open_round = agg.round_no + 1
        if number < open_round:
            raise UpdateRejected(Reason.late.value, f"round {number} is closed", 410)
        if number > open_round:
            raise UpdateRejected(Reason.wrong_round.value, f"round {number} is not open", 409)
        if region in agg.partials:
            raise UpdateRejected(
                Reason.duplicate.value, f"{region} already sent round {number}", 409
            )
        # Read once into its own buffer (aiohttp's read() copies a body twice); the
        # partial's tensors are views of it until the round closes.
        transport = agg.spec.transport
        length = announced_length(request, PARTIAL_LIMIT_FACTOR * transport.max_update_bytes)
        body = memoryview(await read_own_body(request, length, Pace.of(transport)))
        # On the loop: a partial a round per region (10 ms for 40 MB); in an executor
        # thread the global tier's RSS crept up by 5 MB per 100 rounds of the soak.
        body_digest = signing.payload_digest((body,))
        signing.verify_partial(
            agg.config.region_keys[region],
            request.headers.get(H_SIGNATURE),
            agg.name,
            number,
            region,
            body_digest,
        )
        partial = decode_partial(body, agg.name, number, region, agg.template)
        # Durable before acknowledged: a restarted aggregator reloads it.
        await asyncio.get_running_loop().run_in_executor(
            None, checkpoint.save_partial, agg.config.checkpoint_dir, number, region, body
        )
        agg.partials[region] = partial
        try:
            # A combiner restarted after this point finds its region done here.
            await agg.store.record_partial(number, region, partial.count)
        except RedisError as exc:  # it would send again, and hear "duplicate"
            log.warning("partial not recorded in Redis: %s", exc, extra=fields(job=agg.name))
        return partial, body
