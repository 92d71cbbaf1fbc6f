"""``/metrics`` and ``/healthz`` on the operator's metrics port.

``/healthz`` answers from the HTTP server's own thread but reports on the
asyncio event loop: a task in the loop beats every few seconds, and a beat
older than ``max_age`` means the loop is stuck (a blocking call in a coroutine,
a deadlock), which is what a liveness probe should restart. A plain
``/metrics`` probe cannot see that: prometheus_client serves it from a thread
that keeps answering while the loop is dead. Standby replicas (waiting for the
Lease) beat too, so the probe means the same on every replica.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

BEAT_INTERVAL_S = 2.0
MAX_AGE_S = 30.0

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass
class Heartbeat:
    """The last time the event loop ran; ``clock`` is injectable for tests."""

    clock: Callable[[], float] = time.monotonic
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._last = self.clock()

    def beat(self) -> None:
        self._last = self.clock()

    def age(self) -> float:
        return self.clock() - self._last

    async def keep(self, interval: float = BEAT_INTERVAL_S) -> None:
        """Beat until cancelled; runs in the loop whose health it reports."""
        while True:
            self.beat()
            await asyncio.sleep(interval)


def health_app(
    registry: CollectorRegistry, heartbeat: Heartbeat, max_age: float = MAX_AGE_S
) -> WSGIApp:
    """A WSGI app: ``/healthz`` from the heartbeat, everything else ``/metrics``."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics(environ, start_response)
        age = heartbeat.age()
        if age <= max_age:
            status, body = "200 OK", b"ok\n"
        else:
            status = "503 Service Unavailable"
            body = f"event loop has not run for {age:.0f} s (limit {max_age:.0f} s)\n".encode()
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Probes and scrapes every few seconds: not worth a log line each."""


def serve(app: WSGIApp, host: str, port: int) -> WSGIServer:
    """Serve ``app`` from a daemon thread; returns the server (``server_port``)."""
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="fedkube-metrics", daemon=True).start()
    return server
