"""HTTP plumbing shared by the services: serving an app, bearer-token auth.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``; a
service only ever holds the digests of the tokens it accepts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from fedkube.wire.codec import CHUNK_BYTES, CONTENT_TYPE, Encoded

if TYPE_CHECKING:
    from fedkube.service.tls import Tls

log = logging.getLogger(__name__)

TOKEN_ENV = "FEDKUBE_TOKEN"
AGGREGATOR_TOKEN_ENV = "FEDKUBE_AGGREGATOR_TOKEN"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(presented: str | None, expected_digest: str | None) -> bool:
    if presented is None or expected_digest is None:
        return False
    return hmac.compare_digest(digest(presented), expected_digest)


def load_digests(path: str | Path) -> dict[str, str]:
    """Read ``{name: sha256-hex}`` (the tenant-tokens file, a Secret in Kubernetes)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in data.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of name -> sha256 hex digest")
    return dict(data)


def json_error(status: int, reason: str, detail: str) -> web.Response:
    return web.json_response({"error": reason, "detail": detail}, status=status)


async def start_site(
    app: web.Application, host: str, port: int, tls: Tls | None = None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` (over TLS with ``tls``); the runner and the port bound (for port 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = tls.server_context() if tls is not None else None
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor for the socket
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound


async def _pieces(encoded: Encoded) -> AsyncIterator[memoryview]:
    for piece in encoded.chunks():
        yield piece


def upload(encoded: Encoded) -> tuple[AsyncIterator[memoryview], dict[str, str]]:
    """A request body that aiohttp sends piece by piece, and the headers it needs.

    With the Content-Length given, aiohttp sends the pieces as they are (no
    chunked encoding), each from the arrays' own memory: a 40 MB update is
    never copied into one ``bytes`` nor, as a whole, into the transport's
    buffer. Make a new one for every try: it can be sent once.
    """
    headers = {"Content-Length": str(len(encoded)), "Content-Type": CONTENT_TYPE}
    return _pieces(encoded), headers


async def send_payload(request: web.Request, data: bytes) -> web.StreamResponse:
    """Answer ``request`` with a large payload, one piece at a time.

    ``web.Response(body=...)`` hands the whole body to the transport, which
    (on Python 3.11) copies what the socket does not take at once; writing
    pieces and waiting for each to drain copies nothing.
    """
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    response.content_length = len(data)
    await response.prepare(request)
    view = memoryview(data)
    for start in range(0, len(view), CHUNK_BYTES):
        await response.write(view[start : start + CHUNK_BYTES])
    await response.write_eof()
    return response


def stop_on_signals(stop: asyncio.Event) -> None:
    """Turn SIGTERM/SIGINT into a graceful stop (Kubernetes sends SIGTERM)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            log.debug("cannot install handler for %s in this thread", sig)


def port_file_write(path: str | None, port: int) -> None:
    """Tell a launcher which port was bound (written atomically)."""
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)  # a Ray actor's node may lack it
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(target)
