"""Waking long polls: a request waits until what it asks about may have changed.

A worker's ``/v1/tasks`` poll is held open until one of its clients has a
task (a round opened, a secure-aggregation step moved on, an evaluation
started, the job ended) or its wait runs out. Whoever changes such state calls
:meth:`Changes.notify`; every waiting poll wakes, looks again and answers or
goes back to waiting. One object, so no change can forget to wake them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Changes:
    """A broadcast "something changed" for long polls (an asyncio.Condition underneath)."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()

    async def notify(self) -> None:
        """Wake every waiting poll; each looks again."""
        async with self._condition:
            self._condition.notify_all()

    async def poll(self, answer: Callable[[], T | None], wait_s: float) -> T | None:
        """``answer()`` once it is not None, or None after ``wait_s`` seconds without one."""
        deadline = time.monotonic() + wait_s
        while True:
            result = answer()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            async with self._condition:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._condition.wait(), remaining)
