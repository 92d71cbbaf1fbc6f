"""Place the same services as Ray actors: ``fedkube run --runtime ray``.

Each service (global aggregator, combiners, workers) runs its ordinary CLI
entrypoint inside a Ray actor, so the code path is the one the pods run. On a
local Ray (the default) everything binds to loopback; with ``--ray-address``
the services bind to all interfaces of their node and are reached at the
node's IP, and Redis is started on the driver's node IP. The cluster's nodes
need fedkube installed (the same image the chart uses).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray

from fedkube.errors import FedkubeError
from fedkube.logs import LOG_FILE_ENV


@ray.remote(num_cpus=0, max_concurrency=2)  # type: ignore[call-overload]
class ServiceActor:
    """Runs one fedkube service; a second thread answers small questions."""

    def __init__(self, env: dict[str, str]):
        os.environ.update(env)

    def node_ip(self) -> str:
        return str(ray.util.get_node_ip_address())

    def run(self, argv: list[str], log_path: str) -> int:
        import logging

        from fedkube.cli import main

        code = main(argv)
        logging.shutdown()
        return code

    def read_text(self, path: str) -> str | None:
        target = Path(path)
        return target.read_text() if target.exists() else None


class RayHandle:
    def __init__(self, name: str, actor: Any, ref: Any, url_host: str):
        self.name = name
        self.actor = actor
        self.ref = ref
        self.url_host = url_host
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self._code = int(ray.get(self.ref))
                except ray.exceptions.RayError:
                    self._code = -9  # the actor died (killed or crashed)
        return self._code

    def read_port(self, path: Path) -> int | None:
        text = ray.get(self.actor.read_text.remote(str(path)))
        return int(text) if text else None

    def terminate(self) -> None:
        if self.poll() is None:
            ray.kill(self.actor)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.poll() is None:
            ray.kill(self.actor)
        return self.poll()


class RayLauncher:
    """Starts services as actors on a local Ray or on the cluster at ``address``."""

    def __init__(self, address: str | None):
        self.address = address
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=max(2, os.cpu_count() or 2),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        self.host = "127.0.0.1" if address is None else str(ray.util.get_node_ip_address())

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> RayHandle:
        argv = list(argv)
        if self.address is not None and "--host" in argv:
            argv[argv.index("--host") + 1] = "0.0.0.0"  # reached at the actor node's IP
        options = ServiceActor.options  # type: ignore[attr-defined]
        actor = options(name=None).remote({**env, LOG_FILE_ENV: str(log)})
        url_host = self.host if self.address is None else ray.get(actor.node_ip.remote())
        if not isinstance(url_host, str):
            raise FedkubeError(f"{name}: Ray actor did not report its node address")
        return RayHandle(name, actor, actor.run.remote(argv, str(log)), url_host)

    def close(self) -> None:
        if ray.is_initialized() and self.address is None:
            ray.shutdown()
