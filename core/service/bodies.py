"""Read request and response bodies: large ones copied once, none beyond what was announced.

aiohttp's ``Request.read()`` grows a bytearray chunk by chunk and then copies
it into ``bytes``: two copies of every update, each into freshly faulted
memory. A combiner receiving a hundred 4 MB updates per round spends most of
its CPU there. :class:`BufferPool` hands out preallocated buffers that the
body is copied into once; the decoded tensors are views of that buffer, and
the buffer goes back to the pool once the update is folded.

A fresh buffer is an anonymous memory map, not a ``bytearray``: the kernel
commits its pages as the body's bytes land in them, whereas ``bytearray(n)``
zero-fills (and so commits) all ``n`` bytes at once. A sender that announces
a large body and sends it slowly then costs the memory of what it sent, not
of what it claimed (measured: a dozen such uploads grew a combiner by 3 GB).
What a service takes in at once is bounded separately
(:mod:`fedkube.service.inflight`), and so is how long a body may take.
"""

from __future__ import annotations

import asyncio
import json
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import Reason

if TYPE_CHECKING:
    from fedkube.spec import Transport

_ALIGN = 64 * 1024
# A JSON control message (a poll, a refusal, a report, a secure aggregation step)
# is small: a poll naming 10,000 virtual clients is about 200 KB.
MAX_JSON_BYTES = 16 * 1024 * 1024

Buffer = mmap.mmap
"""A body's buffer: an anonymous map, committed by the kernel page by page as it is written."""


def fresh_buffer(size: int) -> Buffer:
    """A zeroed buffer of at least ``size`` bytes, of which no page is committed yet.

    Private (as malloc's own large blocks are), not mmap's default shared
    mapping: its pages fault in as ordinary anonymous memory.
    """
    return mmap.mmap(-1, max(-(-size // _ALIGN), 1) * _ALIGN, flags=mmap.MAP_PRIVATE)


async def json_body(request: web.Request, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON request's document (see :func:`json_body_sized`)."""
    document, _size = await json_body_sized(request, limit)
    return document


async def json_body_sized(request: web.Request, limit: int = MAX_JSON_BYTES) -> tuple[Any, int]:
    """A small JSON request's document and its size in bytes, read up to ``limit`` bytes.

    Refused by name (:class:`UpdateRejected`): a body over the limit
    (oversized, 413, announced or not), one that is not JSON, or JSON nested
    deeper than the parser's recursion limit (malformed) — which ``json``
    reports as ``RecursionError``, not ``ValueError``.
    """
    announced = request.content_length
    if announced is not None and announced > limit:
        raise UpdateRejected(Reason.oversized.value, f"{announced} bytes > {limit}", 413)
    raw = bytearray()
    while chunk := await request.content.readany():
        raw += chunk
        if len(raw) > limit:
            raise UpdateRejected(Reason.oversized.value, f"more than {limit} bytes", 413)
    try:
        return json.loads(raw), len(raw)
    except ValueError:
        raise UpdateRejected(Reason.malformed.value, "the body is not JSON") from None
    except RecursionError:
        raise UpdateRejected(Reason.malformed.value, "the body's JSON nests too deeply") from None


class BufferPool:
    """Reusable buffers, as many as the combiner has needed at once, within a byte budget.

    A round's uploads arrive together: a hundred clients means a hundred bodies
    in flight. A fresh buffer costs a page fault per 4 KiB on its first write
    (measured: a fifth of a 100 x 4 MB round went to faulting fresh buffers
    when only 8 were kept), so the pool keeps the working set it has seen (its
    high-water mark of buffers in use) rather than a fixed few, but never more
    than ``max_idle_bytes`` of idle buffers: between rounds a combiner holds
    at most that, whatever a round needed.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30):
        self.max_idle_bytes = max_idle_bytes
        self._free: list[Buffer] = []
        self._idle_bytes = 0
        self.in_use = 0
        self.high_water = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, size: int) -> Buffer:
        self.in_use += 1
        self.high_water = max(self.high_water, self.in_use)
        # Smallest free buffer that fits: a large one stays for a large body.
        best = None
        for index, buffer in enumerate(self._free):
            if len(buffer) >= size and (best is None or len(buffer) < len(self._free[best])):
                best = index
        if best is not None:
            buffer = self._free.pop(best)
            self._idle_bytes -= len(buffer)
            return buffer
        return fresh_buffer(size)

    def give(self, buffer: Buffer) -> None:
        self.in_use -= 1
        if (
            len(self._free) < self.high_water
            and self._idle_bytes + len(buffer) <= self.max_idle_bytes
        ):
            self._free.append(buffer)
            self._idle_bytes += len(buffer)


class _Filling:
    """A buffer being filled with a body of ``length`` announced bytes; ``filled`` so far."""

    def __init__(self, buffer: Buffer | bytearray, length: int):
        self.buffer = buffer
        self.length = length
        self.filled = 0

    async def read(self, stream: aiohttp.StreamReader) -> int:
        """Copy the body in; the bytes that came.

        Returns ``length + 1`` as soon as more than announced arrives, fewer
        than ``length`` if the body ended early: each caller refuses those its
        own way.
        """
        view = memoryview(self.buffer)
        try:
            while self.filled < self.length:
                chunk = await stream.readany()
                if not chunk:
                    break
                end = self.filled + len(chunk)
                if end > self.length:
                    return self.length + 1
                view[self.filled : end] = chunk
                self.filled = end
        finally:
            view.release()
        return self.filled


def announced_length(request: web.Request, limit: int) -> int:
    """The body's Content-Length, checked before anything is read or reserved for it.

    Required (411), so that the size is known up front, and at most ``limit``
    (413, oversized).
    """
    length = request.content_length
    if length is None:
        raise UpdateRejected(Reason.malformed.value, "Content-Length is required", 411)
    if length > limit:
        raise UpdateRejected(Reason.oversized.value, f"{length} bytes > {limit}", 413)
    return length


@dataclass(frozen=True)
class Pace:
    """The slowest a body may come: ``min_bytes_per_s`` on average, ``grace_s`` behind.

    At every moment ``t`` seconds after the body began, at least
    ``min_bytes_per_s * (t - grace_s)`` of its bytes must have arrived. A
    sender that trickles (a slowloris) is cut off about ``grace_s`` after it
    falls behind, whatever length it announced; an honest upload on a slow
    link is cut off only if it really is slower than the minimum.
    """

    grace_s: float
    min_bytes_per_s: float

    @classmethod
    def of(cls, transport: Transport) -> Pace:
        """The job's pace for update bodies (``spec.transport``)."""
        return cls(transport.body_timeout_seconds, transport.min_upload_bytes_per_second)

    def due(self, received: int) -> float:
        """Seconds after the start by which more than ``received`` bytes must have come."""
        return self.grace_s + received / self.min_bytes_per_s


async def read_body(
    request: web.Request, length: int, pool: BufferPool, pace: Pace | None = None
) -> Buffer:
    """The body of ``length`` bytes (from :func:`announced_length`) in a pooled buffer.

    The caller gives the buffer back; a fresh one is committed as the bytes
    arrive. Refused by name (see :func:`_read_into`), the buffer given back.
    """
    buffer = pool.take(length)
    try:
        await _read_into(buffer, length, request.content, pace)
    except BaseException:  # refused, or the request cancelled: the buffer goes back
        pool.give(buffer)
        raise
    return buffer


async def read_own_body(request: web.Request, length: int, pace: Pace | None = None) -> bytearray:
    """The body of ``length`` bytes in a buffer of its own, for a caller that keeps it.

    The global tier keeps a partial until its round closes, and reads one
    only from a combiner whose region's credential it has checked. (An
    anonymous map per partial there, as the pool uses, measured as RSS growth
    of about 5 MB per 100 rounds of the soak: the maps outlived their rounds
    in a way not found yet.)
    """
    buffer = bytearray(length)
    await _read_into(buffer, length, request.content, pace)
    return buffer


async def _read_into(
    buffer: Buffer | bytearray, length: int, stream: aiohttp.StreamReader, pace: Pace | None
) -> None:
    """Fill ``buffer`` with the body, or refuse it by name.

    A body shorter or longer than announced is malformed; one that falls
    behind ``pace`` is refused as too slow (408, slow_body): a sender that
    trickles its bytes holds a buffer and a share of the in-flight budget,
    and must not hold them for long.
    """
    filling = _Filling(buffer, length)
    filled = await _read_paced(filling, stream, pace)
    if filled == length:
        return
    if filled < 0:
        assert pace is not None
        raise UpdateRejected(
            Reason.slow_body.value,
            f"{filling.filled} of {length} bytes after {pace.due(filling.filled):.0f} s: "
            f"slower than {pace.min_bytes_per_s:.0f} bytes/s with {pace.grace_s:g} s of "
            "grace (spec.transport.minUploadBytesPerSecond, bodyTimeoutSeconds)",
            408,
        )
    if filled > length:
        raise UpdateRejected(Reason.malformed.value, "body longer than Content-Length")
    raise UpdateRejected(Reason.malformed.value, f"body ended at {filled} of {length}")


async def _read_paced(filling: _Filling, stream: aiohttp.StreamReader, pace: Pace | None) -> int:
    """:meth:`_Filling.read` within ``pace``; -1 if the body fell behind it.

    One timer for the whole body, not one per chunk: it is set for when the
    bytes received so far stop being enough, and only when it fires is it
    set again from what has come since (a fast upload never sees it fire).
    Interrupting ``readany`` loses nothing: the stream keeps what arrives.
    """
    if pace is None:
        return await filling.read(stream)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        received = filling.filled
        try:
            async with asyncio.timeout_at(start + pace.due(received)):
                return await filling.read(stream)
        except TimeoutError:
            if filling.filled == received:
                return -1


async def read_response(response: aiohttp.ClientResponse) -> bytearray:
    """A response's body, copied once into a buffer of its announced length.

    ``ClientResponse.read()`` collects the pieces and joins them: two copies
    of every model a worker or a combiner downloads. A response without a
    Content-Length is read the usual way; one that ends short or runs long is
    refused as aiohttp refuses a broken payload.
    """
    length = response.content_length
    if length is None:
        return bytearray(await response.read())
    buffer = bytearray(length)
    filled = await _Filling(buffer, length).read(response.content)
    if filled > length:
        raise aiohttp.ClientPayloadError(f"response longer than its {length} bytes")
    if filled < length:
        raise aiohttp.ClientPayloadError(f"response ended at {filled} of {length} bytes")
    return buffer
