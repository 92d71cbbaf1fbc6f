"""Read large request bodies into reusable buffers.

aiohttp's ``Request.read()`` grows a bytearray chunk by chunk and then copies
it into ``bytes``: two copies of every update, each into freshly faulted
memory. A combiner receiving a hundred 4 MB updates per round spends most of
its CPU there. :class:`BufferPool` hands out preallocated buffers that the
body is copied into once; the decoded tensors are views of that buffer, and
the buffer goes back to the pool once the update is folded.
"""

from __future__ import annotations

from typing import Any

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
    """A few reusable bytearrays; sized up to the largest body seen."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        for index, buffer in enumerate(self._free):
            if len(buffer) >= size:
                return self._free.pop(index)
        return bytearray(-(-size // _ALIGN) * _ALIGN)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buffer)


async def read_body(request: web.Request, limit: int, pool: BufferPool) -> tuple[bytearray, int]:
    """The body in a pooled buffer and its length; the caller gives the buffer back.

    Requires a Content-Length (so the size is checked before anything is
    read) and refuses bodies over ``limit`` or shorter than announced.
    """
    length = request.content_length
    if length is None:
        raise UpdateRejected(Reason.malformed.value, "Content-Length is required", 411)
    if length > limit:
        raise UpdateRejected(Reason.oversized.value, f"{length} bytes > {limit}", 413)
    buffer = pool.take(length)
    view = memoryview(buffer)
    filled = 0
    try:
        while filled < length:
            chunk = await request.content.readany()
            if not chunk:
                break
            end = filled + len(chunk)
            if end > length:
                raise UpdateRejected(Reason.malformed.value, "body longer than Content-Length")
            view[filled:end] = chunk
            filled = end
        if filled != length:
            raise UpdateRejected(Reason.malformed.value, f"body ended at {filled} of {length}")
    except UpdateRejected:
        view.release()
        pool.give(buffer)
        raise
    view.release()
    return buffer, length
