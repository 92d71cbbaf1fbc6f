"""The combiner's HTTP API: handlers that parse, call the region, and answer.

No handler folds, decides a round or touches Redis itself: each checks who
is asking (:mod:`.admission`), hands the request to the region's intake, to
the evaluation reports or to the model cache, and turns a refusal into a JSON
error through :func:`fedkube.aggregator.refusals.refuse` (counted, logged,
answered, the same way everywhere).

=====================================  ==========================================
``POST /v1/tasks``                     a worker's long poll for its clients' tasks
``GET /v1/model/{version}``            the round's model (sendfile from the cache)
``POST /v1/update``                    one client's update (signed)
``POST /v1/secagg/{keys,shares,unmask}``  one secure-aggregation message
``POST /v1/evaluation``                a client's evaluation report
``POST /v1/failure``                   a client's task failed this round
``POST /v1/refusal``                   a site's policy refuses its tenant
``GET /metrics``, ``GET /healthz``     Prometheus, liveness
=====================================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from fedkube.aggregator.combiner.secure_intake import SecureIntake
from fedkube.aggregator.refusals import refuse
from fedkube.aggregator.validation import check_client
from fedkube.errors import UpdateRejected
from fedkube.service.bodies import Pace, announced_length, json_body, read_body
from fedkube.service.logs import fields
from fedkube.service.web import json_error
from fedkube.wire import codec
from fedkube.wire.failures import check_failure
from fedkube.wire.protocol import H_CLIENT, Reason, RoundState

if TYPE_CHECKING:
    from fedkube.aggregator.combiner.service import Combiner

log = logging.getLogger("fedkube.combiner")

TIER = "combiner"
# A refusal message is shown in conditions and logs, never more than this.
MAX_REFUSAL_CHARS = 2000
# The longest a task poll is held open, whatever the worker asks.
MAX_POLL_S = 60.0


def make_app(combiner: Combiner) -> web.Application:
    routes = Routes(combiner)
    app = web.Application(client_max_size=combiner.job.spec.transport.max_update_bytes)
    app.router.add_post("/v1/tasks", routes.tasks)
    app.router.add_get("/v1/model/{version}", routes.model)
    app.router.add_post("/v1/update", routes.update)
    app.router.add_post("/v1/refusal", routes.refusal)
    app.router.add_post("/v1/evaluation", routes.evaluation)
    app.router.add_post("/v1/failure", routes.failure)
    app.router.add_post("/v1/secagg/{step}", routes.secagg)
    app.router.add_get("/metrics", combiner.metrics.handle)
    app.router.add_get("/healthz", routes.health)
    return app


class Routes:
    """The handlers of one combiner."""

    def __init__(self, combiner: Combiner):
        self.c = combiner
        self.name = combiner.name
        self.region = combiner.region
        self.admission = combiner.admission

    def _refuse(self, exc: UpdateRejected, what: str, tenant: str, **where: Any) -> web.Response:
        return refuse(
            exc,
            what=what,
            metrics=self.c.metrics,
            log=log,
            job=self.name,
            tier=TIER,
            region=self.region,
            tenant=tenant,
            **where,
        )

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "region": self.region})

    async def tasks(self, request: web.Request) -> web.Response:
        """Long poll for a worker's clients (``{"clients": [...], "after": r, "wait": s}``).

        One request (and one Redis write to register them all) for every
        client a worker hosts: a worker of a thousand virtual clients polls
        as cheaply as a worker of one. The answer lists a task per client
        that has one (``train`` or ``resend``; ``evaluate`` while an
        evaluation at the sites is open, see :mod:`fedkube.training.evaluation`), the
        round the combiner is at, or ``done`` with the job's status.
        """
        try:
            tenant = self.admission.authenticate(request)
            clients, after, wait_s = await self._poll_request(request, tenant)
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        due = self.c.registrations.due(clients)
        if due:
            try:
                await self.c.store.register_clients(due)
                self.c.registrations.written(due)
            except RedisError as exc:  # the task can still be answered from memory
                log.warning("cannot record registration: %s", exc, extra=fields(job=self.name))
        mine = set(clients)
        answer = await self.c.state.changes.poll(
            lambda: self.c.tasks_for(mine, after), min(wait_s, MAX_POLL_S)
        )
        if answer is None:
            current = self.c.state.current
            answer = {"status": "wait", "round": current.info.round if current else 0}
        return web.json_response(answer)

    async def _poll_request(
        self, request: web.Request, tenant: str
    ) -> tuple[list[str], int, float]:
        """The checked body of a ``/v1/tasks`` poll: every client must be the tenant's, here."""
        document = await json_body(request)
        if not isinstance(document, dict):
            raise UpdateRejected(Reason.malformed.value, 'expected {"clients": [...], ...}')
        clients = document.get("clients")
        if (
            not isinstance(clients, list)
            or not clients
            or not all(isinstance(c, str) for c in clients)
        ):
            raise UpdateRejected(
                Reason.malformed.value, "clients must be a non-empty list of client ids"
            )
        for client in clients:
            check_client(self.admission.clients, client, tenant, self.region)
        after, wait_s = document.get("after", 0), document.get("wait", 20)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise UpdateRejected(Reason.malformed.value, "after must be a round number (>= 0)")
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or wait_s < 0:
            raise UpdateRejected(Reason.malformed.value, "wait must be seconds (>= 0)")
        return clients, after, float(wait_s)

    async def model(self, request: web.Request) -> web.StreamResponse:
        try:
            tenant = self.admission.authenticate(request)
            version = int(request.match_info["version"])
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        except ValueError:
            return json_error(400, "malformed", "version must be an integer")
        try:
            data = await self.c.models.get(version)
        except aiohttp.ClientResponseError as exc:
            return json_error(exc.status, "unavailable", f"model {version}: {exc.message}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return json_error(503, "unavailable", f"global aggregator unreachable: {exc}")
        self.c.metrics.bytes_down.labels(self.name, TIER, self.region, tenant).inc(len(data))
        current = self.c.state.current
        if current is not None:
            await self.c.state.count(current.info.round, bytes_down=len(data))
        return web.FileResponse(
            self.c.models.path(version), headers={"Content-Type": codec.CONTENT_TYPE}
        )

    async def update(self, request: web.Request) -> web.Response:
        tenant = "unknown"
        try:
            tenant = self.admission.authenticate(request)
            result = await self._accept_update(request, tenant)
        except UpdateRejected as exc:
            current = self.c.state.current
            round_no = current.info.round if current else None
            if exc.reason in (Reason.duplicate.value, Reason.late.value) and round_no:
                await self.c.state.count(round_no, **{exc.reason: 1})
            return self._refuse(
                exc, "update", tenant, round=round_no, client=request.headers.get(H_CLIENT)
            )
        return web.json_response(result)

    async def _accept_update(self, request: web.Request, tenant: str) -> dict[str, object]:
        sender = self.admission.sender(request, tenant)
        intake = self.c.intake
        current = self.c.state.current
        intake.check_open(current, sender)
        assert current is not None
        signature = self.admission.signature(request, tenant)
        transport = self.c.job.spec.transport
        length = announced_length(request, transport.max_update_bytes)
        pool = self.c.buffers
        # Counted from before the buffer is taken until it is given back: what a
        # tenant's uploads can hold in this combiner is bounded whatever they announce.
        with self.c.inflight.hold(tenant, length):
            buffer = await read_body(request, length, pool, Pace.of(transport))
            try:
                body = memoryview(buffer)[:length]
                await self.admission.verify(sender, signature, body)
                return await intake.accept(sender, current, body)
            finally:
                pool.give(buffer)

    async def secagg(self, request: web.Request) -> web.Response:
        """``POST /v1/secagg/{keys,shares,unmask}``: one client's message for one step."""
        tenant = "unknown"
        step = request.match_info["step"]
        try:
            tenant = self.admission.authenticate(request)
            intake = self.c.intake
            if not isinstance(intake, SecureIntake):
                raise UpdateRejected(
                    Reason.malformed.value, f"no secure aggregation step {step!r} here", 404
                )
            number, size = await intake.message(request, tenant, step)
        except UpdateRejected as exc:
            return self._refuse(
                exc, f"secure aggregation {step}", tenant, client=request.headers.get(H_CLIENT)
            )
        # Key material, counted apart from the masked updates (bytes_up).
        await self.c.state.count(number, secagg_bytes=size)
        return web.json_response({"status": "accepted", "round": number})

    async def refusal(self, request: web.Request) -> web.Response:
        """A site's operator says its policy refuses this tenant (with the tenant's token).

        The site has no Redis; its only line to the central side is the
        tenant's token and this combiner. The refusal is recorded in Redis,
        where the global aggregator stops waiting on the tenant's clients
        and the central operator shows it in the job's status.
        """
        try:
            tenant = self.admission.authenticate(request)
            document = await json_body(request)
            if not isinstance(document, dict):
                raise UpdateRejected(Reason.malformed.value, 'expected {"message": "..."}')
            message = str(document.get("message", ""))[:MAX_REFUSAL_CHARS] or "refused"
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        await self.c.store.record_refusal(tenant, message)
        log.warning(
            "tenant refused at its site: %s",
            message,
            extra=fields(job=self.name, region=self.region, tenant=tenant),
        )
        return web.json_response({"recorded": True, "tenant": tenant})

    async def evaluation(self, request: web.Request) -> web.Response:
        """A client's evaluation of the model it was asked to evaluate (JSON, checked)."""
        tenant = "unknown"
        try:
            tenant = self.admission.authenticate(request)
            result = await self.c.evaluations.receive(tenant, await json_body(request))
        except UpdateRejected as exc:
            if exc.reason != Reason.duplicate.value:
                log.warning(
                    "evaluation report rejected: %s",
                    exc.detail,
                    extra=fields(job=self.name, region=self.region, tenant=tenant),
                )
            return json_error(exc.status, exc.reason, exc.detail)
        await self.c.state.changes.notify()
        return web.json_response(result)

    async def failure(self, request: web.Request) -> web.Response:
        """A client's task failed this round (``fedkube.wire.failures``): recorded, not waited for.

        Once every selected client of the region has sent its update or said
        that its task failed, the region's partial goes up without waiting for
        the deadline. Under secure aggregation the protocol's own deadlines
        decide; the failure is still recorded for the round's record.
        """
        state = self.c.state
        tenant = "unknown"
        try:
            tenant = self.admission.authenticate(request)
            report = check_failure(await json_body(request))
            check_client(self.admission.clients, report.client, tenant, self.region)
            current = state.current
            if current is None or report.round != current.info.round:
                raise UpdateRejected(
                    Reason.wrong_round.value, f"round {report.round} is not open", 409
                )
            if report.client not in current.selected or report.client in current.folded:
                raise UpdateRejected(
                    Reason.not_selected.value,
                    f"{report.client} has no update owed in round {report.round}",
                    409,
                )
            try:
                await self.c.store.record_task_failure(report.round, report.client, report.message)
            except RedisError as exc:
                raise UpdateRejected(
                    Reason.unavailable.value, f"round state unavailable: {exc}", 503
                ) from None
        except UpdateRejected as exc:
            return json_error(exc.status, exc.reason, exc.detail)
        log.warning(
            "the client's task failed the round: %s",
            report.message,
            extra=fields(
                job=self.name,
                round=report.round,
                region=self.region,
                tenant=tenant,
                client=report.client,
            ),
        )
        async with state.lock:
            current.failed.add(report.client)
            complete = (
                self.c.intake.closes_on_failures
                and current.info.state == RoundState.collecting
                and current.heard_from_all()
            )
        if complete:
            state.schedule_flush(current)
        return web.json_response({"recorded": True})
