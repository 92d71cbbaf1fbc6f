"""Waiting between attempts while something is unreachable: doubling delays with a cap.

Each loop that retries (a worker whose combiner is away, a combiner or the
global tier waiting for Redis, a combiner sending its partial upward) keeps
one :class:`Backoff`: it starts short, so a blip costs little, doubles so a
long outage is not hammered, and resets on the first success.
"""

from __future__ import annotations

import asyncio


class Backoff:
    """Delays ``first, 2·first, 4·first, …`` up to ``cap`` seconds; ``reset()`` after a success."""

    def __init__(self, first: float, cap: float):
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got {first} and {cap}")
        self.first = first
        self.cap = cap
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long (capped)."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self) -> float:
        """Sleep for the next delay; the delay slept."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay
