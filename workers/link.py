"""The worker's HTTP link to its combiner: every request a worker makes, and what answers mean.

One aiohttp session with the tenant's bearer token and the job and tenant
headers; the task long-poll (``POST /v1/tasks``), retried with backoff while
the combiner is away (a worker may start before its combiner listens, and a
combiner restarts); the model download; and the POSTs of updates,
evaluation and failure reports and secure aggregation's messages. The
combiner's answers are read here into what the worker does next (taken,
send again later, refused: the refusal logged with its reason), so the
callers never see HTTP.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp

from fedkube.errors import FedkubeError
from fedkube.service.backoff import Backoff
from fedkube.service.bodies import read_response
from fedkube.service.tls import Tls, client_ssl
from fedkube.service.web import upload
from fedkube.wire import codec
from fedkube.wire.failures import FailureReport
from fedkube.wire.protocol import (
    H_CLIENT,
    H_CODEC,
    H_JOB,
    H_ROUND,
    H_SIGNATURE,
    H_TENANT,
    H_WEIGHT,
    Reason,
)
from fedkube.workers.pipeline import Outgoing
from fedkube.workers.seat import Identity

log = logging.getLogger("fedkube.worker")

# Retry delays while the combiner is away: capped well below the combiner's
# reattach window (REATTACH_S in aggregator/combiner/region.py), so a
# restarted combiner gets its resends in time.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
# An unreachable combiner is said at INFO for this long, then at WARNING.
QUIET_S = 5.0

# What goes wrong on the way to the combiner (and back): the request may be tried again.
TRANSIT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class Taken(enum.Enum):
    """What became of an update sent to the combiner."""

    accepted = "accepted"  # recorded, or an earlier try of it was (a duplicate)
    later = "later"  # the combiner could not take it now (unavailable, busy): send it again
    refused = "refused"  # refused for good (logged with the reason)


def retry_after(headers: Mapping[str, str]) -> float:
    """A Retry-After header's delay in seconds (the number form; 0 when absent or a date).

    Capped at :data:`RETRY_MAX_S` times ten: a combiner (or something posing
    as one) must not be able to park a worker for a day.
    """
    try:
        value = float(headers.get("Retry-After", "0"))
    except ValueError:
        return 0.0
    return min(max(value, 0.0), 10 * RETRY_MAX_S) if math.isfinite(value) else 0.0


class CombinerLink:
    """The HTTP session to one combiner, opened with ``async with``."""

    def __init__(self, url: str, token: str, identity: Identity, tls: Tls | None = None):
        self.url = url
        self.tls = tls
        self.identity = identity
        self.headers = {
            "Authorization": f"Bearer {token}",
            H_JOB: identity.job,
            H_TENANT: identity.tenant,
        }
        self.backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        # What a busy combiner's Retry-After asked for: the next pause waits at least that.
        self.retry_after = 0.0
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CombinerLink:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._http = aiohttp.ClientSession(
            headers=self.headers,
            timeout=timeout,
            connector=aiohttp.TCPConnector(ssl=client_ssl(self.tls)),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the link to the combiner is not open (use `async with`)")
        return self._http

    async def pause(self) -> None:
        """Wait before asking again (the delays double while nothing gets through).

        At least as long as a busy combiner's Retry-After asked: it is
        receiving all it can, and asking sooner only costs it a refusal.
        """
        delay = max(self.backoff.next(), self.retry_after)
        self.retry_after = 0.0
        await asyncio.sleep(delay)

    # -- tasks and models ---------------------------------------------------------
    async def tasks(
        self, clients: list[str], after: int, wait: float, stop: asyncio.Event
    ) -> dict[str, Any] | None:
        """The combiner's next answer to a long-poll; None once ``stop`` is set.

        While the combiner is unreachable the poll is tried again with
        backoff: a worker may start before its combiner listens (fedkube run
        starts every service at once), so this is said as a warning only
        if it lasts. A combiner that refuses the worker's credentials
        (401, 403) raises :class:`FedkubeError`.
        """
        away_since: float | None = None
        while not stop.is_set():
            try:
                answer = await self._poll(clients, after, wait)
            except TRANSIT_ERRORS as exc:
                away_since = away_since or time.monotonic()
                quiet = time.monotonic() - away_since <= QUIET_S
                level = logging.INFO if quiet else logging.WARNING
                log.log(
                    level, "combiner unreachable (%s); retrying", exc, extra=self.identity.log()
                )
                await self.backoff.wait()
                continue
            self.backoff.reset()
            return answer
        return None

    async def _poll(self, clients: list[str], after: int, wait: float) -> dict[str, Any]:
        body = {"clients": clients, "after": after, "wait": wait}
        async with self.http.post(f"{self.url}/v1/tasks", json=body) as response:
            if response.status in (401, 403):
                detail = await response.text()
                raise FedkubeError(f"combiner refused {self.identity.describe()}: {detail}")
            if response.status >= 400:
                detail = await response.text()
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=detail
                )
            # Bytes, not text(): whatever charset the answer claims, it is read as UTF-8.
            text = (await response.read()).decode("utf-8", "replace")
        answer = answer_of(response.status, text)
        if "status" not in answer:
            # Not a poll's answer: as a combiner that answers nothing, asked again.
            raise aiohttp.ClientPayloadError(f"poll answer is not a task list: {text[:200]!r}")
        return answer

    async def model(self, version: int) -> bytearray:
        """Model ``version`` as the combiner serves it (encoded, maybe compressed)."""
        async with self.http.get(f"{self.url}/v1/model/{version}") as response:
            response.raise_for_status()
            return await read_response(response)

    # -- what a worker reports ---------------------------------------------------------
    async def send_update(self, client: str, number: int, outgoing: Outgoing) -> Taken:
        """POST one client's update (its pieces, uncopied) and read the combiner's answer."""
        body, framing = upload(outgoing.body)
        headers = {
            H_CLIENT: client,
            H_ROUND: str(number),
            H_WEIGHT: repr(outgoing.weight),
            H_CODEC: codec.CODEC,
            H_SIGNATURE: outgoing.signature,
            **framing,
        }
        async with self.http.post(f"{self.url}/v1/update", data=body, headers=headers) as response:
            text = await response.text()
        answer = answer_of(response.status, text)
        where = self.identity.log(number, client)
        if response.status == 503 and answer.get("error") == Reason.unavailable.value:
            log.warning(
                "update not taken yet (%s); it will be sent again",
                answer.get("detail"),
                extra=where,
            )
            return Taken.later
        if response.status in (429, 503) and answer.get("error") == Reason.busy.value:
            # The combiner is receiving all its budget allows: not a fault, so not a warning.
            self.retry_after = max(self.retry_after, retry_after(response.headers))
            log.info("combiner busy (%s); sending again", answer.get("detail"), extra=where)
            return Taken.later
        if response.status < 300 or answer.get("error") == "duplicate":
            # A duplicate means an earlier try of this very update was accepted.
            return Taken.accepted
        log.warning(
            "update refused (%s): %s", answer.get("error"), answer.get("detail"), extra=where
        )
        return Taken.refused

    async def post_evaluation(self, document: dict[str, Any]) -> tuple[int, str]:
        """POST one evaluation report: the answer's status and text."""
        async with self.http.post(f"{self.url}/v1/evaluation", json=document) as response:
            return response.status, await response.text()

    async def report_failure(self, report: FailureReport) -> None:
        """Tell the combiner (fedkube.wire.failures): the round closes without waiting for us.

        Not retried: a report that does not arrive leaves the round to its
        deadline, as for a client that dropped.
        """
        where = self.identity.log(report.round, report.client)
        try:
            url = f"{self.url}/v1/failure"
            async with self.http.post(url, json=report.document()) as response:
                if response.status >= 400:
                    detail = await response.text()
                    log.warning(
                        "failure report refused (%d): %s", response.status, detail, extra=where
                    )
        except TRANSIT_ERRORS as error:
            # The round then waits for its deadline, as for a client that dropped.
            log.warning("could not report the failure (%s)", error, extra=where)

    async def post_secagg(
        self, step: str, client: str, number: int, document: dict[str, Any]
    ) -> bool | None:
        """POST one secure aggregation message: True if taken, False if refused, None to retry.

        None answers a 503 (the combiner could not record it): it hands the
        step out again.
        """
        headers = {H_CLIENT: client, H_ROUND: str(number)}
        url = f"{self.url}/v1/secagg/{step}"
        async with self.http.post(url, json=document, headers=headers) as response:
            text = await response.text()
            status = response.status
        if status < 300:
            return True
        answer = answer_of(status, text)
        if status == 503:
            return None
        log.warning(
            "secure aggregation %s refused (%s): %s",
            step,
            answer.get("error"),
            answer.get("detail"),
            extra=self.identity.log(number, client),
        )
        return False


def answer_of(status: int, text: str) -> dict[str, Any]:
    """A combiner's JSON answer, or what to log of one that is not JSON.

    Whatever the text (deep nesting raises RecursionError, an over-long
    integer ValueError), a worker never fails on what a combiner answered.
    """
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        return {"error": f"http {status}", "detail": text[:200]}
    return answer if isinstance(answer, dict) else {"error": f"http {status}", "detail": text[:200]}
