"""The region's partial on its way to the global tier: encoded once, sent until it is taken.

The partial is the region's :class:`~.accumulators.RegionSum` in the wire
codec, with the envelope (job, round, region, weight) and the count and
weighted local steps in its metadata. It is sent again after a connection
failure, with backoff, until the global tier answers: accepted, or 409/410
(it has this region's partial already, or the round moved on). Any other
refusal is logged and not retried: the same bytes would be refused again.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from fedkube.aggregator.combiner.accumulators import RegionSum
from fedkube.service.backoff import Backoff
from fedkube.service.logs import fields
from fedkube.service.web import upload
from fedkube.wire import codec
from fedkube.wire.codec import Encoded
from fedkube.wire.protocol import (
    H_CODEC,
    H_JOB,
    H_REGION,
    H_ROUND,
    H_SIGNATURE,
    M_COUNT,
    M_WEIGHTED_STEPS,
    Envelope,
)

log = logging.getLogger("fedkube.combiner")


def encode_partial(job: str, number: int, region: str, result: RegionSum) -> Encoded:
    """The partial's wire form (codec parts, sent without joining them)."""
    envelope = Envelope(job, number, region, "", result.weight)
    metadata = {
        **envelope.metadata("partial"),
        M_COUNT: str(result.count),
        M_WEIGHTED_STEPS: repr(float(result.steps)),
    }
    return codec.encode_parts(result.tensors, metadata)


async def send_partial(
    http: aiohttp.ClientSession,
    global_url: str,
    job: str,
    number: int,
    region: str,
    encoded: Encoded,
    signature: str,
    result: RegionSum,
    stopped: asyncio.Event,
) -> None:
    """POST the partial, signed with the region's key, until the global tier has it (or
    moved on), or ``stopped``."""
    headers = {
        H_JOB: job,
        H_ROUND: str(number),
        H_REGION: region,
        H_CODEC: codec.CODEC,
        H_SIGNATURE: signature,
    }
    backoff = Backoff(0.2, 5.0)
    while not stopped.is_set():
        body, framing = upload(encoded)
        try:
            async with http.post(
                f"{global_url}/v1/partial", data=body, headers={**headers, **framing}
            ) as response:
                answer = await response.text()
                if response.status < 300 or response.status in (409, 410):
                    log.info(
                        "partial sent: %d updates, weight %.0f (%s)",
                        result.count,
                        result.weight,
                        response.status,
                        extra=fields(job=job, round=number, region=region),
                    )
                    return
                log.error(
                    "global refused partial: %s %s",
                    response.status,
                    answer,
                    extra=fields(job=job, round=number),
                )
                return
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning(
                "global unreachable (%s); retrying", exc, extra=fields(job=job, round=number)
            )
        await backoff.wait()
