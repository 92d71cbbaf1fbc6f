"""Read large request and response bodies, each copied once into its buffer.

aiohttp's ``Request.read()`` grows a bytearray chunk by chunk and then copies
it into ``bytes``: two copies of every update, each into freshly faulted
memory. A combiner receiving a hundred 4 MB updates per round spends most of
its CPU there. :class:`BufferPool` hands out preallocated buffers that the
body is copied into once; the decoded tensors are views of that buffer, and
the buffer goes back to the pool once the update is folded.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from fedkube.errors import UpdateRejected
from fedkube.wire.protocol import Reason

_ALIGN = 64 * 1024


async def json_body(request: web.Request) -> Any:
    """A small JSON request's document; :class:`UpdateRejected` (malformed) if it is not JSON."""
    try:
        return await request.json()
    except ValueError:
        raise UpdateRejected(Reason.malformed.value, "the body is not JSON") from None


class BufferPool:
    """Reusable bytearrays, as many as the combiner has needed at once, within a byte budget.

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
        self._free: list[bytearray] = []
        self._idle_bytes = 0
        self.in_use = 0
        self.high_water = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, size: int) -> bytearray:
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
        return bytearray(-(-size // _ALIGN) * _ALIGN)

    def give(self, buffer: bytearray) -> None:
        self.in_use -= 1
        if (
            len(self._free) < self.high_water
            and self._idle_bytes + len(buffer) <= self.max_idle_bytes
        ):
            self._free.append(buffer)
            self._idle_bytes += len(buffer)


async def _fill(buffer: bytearray, length: int, stream: aiohttp.StreamReader) -> int:
    """Copy a body of ``length`` announced bytes into ``buffer``; the bytes that came.

    Returns ``length + 1`` as soon as more than announced arrives, fewer than
    ``length`` if the body ended early: each caller refuses those its own way.
    """
    view = memoryview(buffer)
    filled = 0
    try:
        while filled < length:
            chunk = await stream.readany()
            if not chunk:
                break
            end = filled + len(chunk)
            if end > length:
                return length + 1
            view[filled:end] = chunk
            filled = end
    finally:
        view.release()
    return filled


async def read_body(
    request: web.Request, limit: int, pool: BufferPool | None = None
) -> tuple[bytearray, int]:
    """The body in a buffer (pooled, if ``pool``: the caller gives it back) and its length.

    Requires a Content-Length (so the size is checked before anything is
    read) and refuses bodies over ``limit`` or shorter than announced.
    Without a pool the buffer is the body's alone, for a caller that keeps
    it (the global tier keeps a partial until its round closes).
    """
    length = request.content_length
    if length is None:
        raise UpdateRejected(Reason.malformed.value, "Content-Length is required", 411)
    if length > limit:
        raise UpdateRejected(Reason.oversized.value, f"{length} bytes > {limit}", 413)
    buffer = pool.take(length) if pool is not None else bytearray(length)
    filled = await _fill(buffer, length, request.content)
    if filled != length:
        if pool is not None:
            pool.give(buffer)
        if filled > length:
            raise UpdateRejected(Reason.malformed.value, "body longer than Content-Length")
        raise UpdateRejected(Reason.malformed.value, f"body ended at {filled} of {length}")
    return buffer, length


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
    filled = await _fill(buffer, length, response.content)
    if filled > length:
        raise aiohttp.ClientPayloadError(f"response longer than its {length} bytes")
    if filled < length:
        raise aiohttp.ClientPayloadError(f"response ended at {filled} of {length} bytes")
    return buffer
