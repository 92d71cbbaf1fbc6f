"""Fixtures of the unit tier that play a real peer in this process."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


class ScriptedCombiner:
    """Answers each path from a list (the last answer repeats); records the requests.

    An answer is ``(status, body)``, or ``(status, body, headers)``.

    A small aiohttp app on the loopback plays the combiner for the worker's
    tests: what the worker makes of each answer is the logic under test.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: dict[str, list[tuple[Any, ...]]] = {}

    def script(self, path: str, *answers: tuple[Any, ...]) -> None:
        self.answers[path] = list(answers)

    def bodies(self, path: str) -> list[bytes]:
        return [body for seen, _headers, body in self.seen if seen == path]

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers), await request.read()))
        queue = self.answers.get(request.path) or [(404, "no script")]
        status, body, *more = queue.pop(0) if len(queue) > 1 else queue[0]
        headers = more[0] if more else None
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers)
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def combiner() -> AsyncIterator[tuple[ScriptedCombiner, str]]:
    """A scripted combiner on the loopback, and its base URL."""
    fake = ScriptedCombiner()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
