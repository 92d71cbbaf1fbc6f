"""Where a run's services start: one OS process each (:class:`ProcessLauncher`), or a
Ray actor each (:class:`fedkube.local.ray_runtime.RayLauncher`), behind one
:class:`Launcher` interface, so that :class:`fedkube.local.runner.LocalRun` supervises
both the same way."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from fedkube.errors import FedkubeError
from fedkube.service.process import die_with_parent

READY_TIMEOUT_S = 120.0  # a service's start-up, torch imports included, on a busy machine


class Handle(Protocol):
    """A started service: where to reach it, and its life."""

    name: str
    url_host: str  # the address other services use to reach it

    def read_port(self, path: Path) -> int | None:
        """The port the service wrote to ``path`` (on its own node), once it has."""

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout: float) -> int | None: ...


class Launcher(Protocol):
    """Starts one fedkube service (its CLI argv) somewhere: a process, a Ray actor."""

    host: str

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> Handle: ...

    def reserve_port(self) -> int | None:
        """A port a service can be told to bind, or None where only the service knows
        where it will run (a Ray cluster): then its address is read once it started."""

    def service_hosts(self) -> list[str]:
        """Every address a service may be reached at (its TLS certificate names them all)."""

    def close(self) -> None: ...


class ProcessHandle:
    url_host = "127.0.0.1"

    def __init__(self, name: str, process: Any):
        self.name = name
        self.process = process
        self.pid: int = process.pid

    def read_port(self, path: Path) -> int | None:
        return int(path.read_text()) if path.exists() else None

    def poll(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait(self, timeout: float) -> int | None:
        import subprocess

        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class ProcessLauncher:
    """Each service in its own OS process: ``python -m fedkube.cli ...``."""

    host = "127.0.0.1"

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> Handle:
        import subprocess

        with open(log, "ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedkube.cli", *argv],
                env={**os.environ, **env},
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        return ProcessHandle(name, process)

    def reserve_port(self) -> int | None:
        """A free loopback port (the kernel's choice): every service's address is then
        known before any starts, so they all start at once instead of one tier after
        another (start-up is the slowest tier's, not the sum)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((self.host, 0))
            return int(probe.getsockname()[1])

    def service_hosts(self) -> list[str]:
        return [self.host, "localhost"]

    def close(self) -> None:
        return None


def wait_port(path: Path, handle: Handle, log: Path, timeout_s: float = READY_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = handle.read_port(path)
        if port is not None:
            return port
        code = handle.poll()
        if code is not None:
            raise FedkubeError(
                f"{handle.name} exited with code {code} before it was ready; its log: {log}"
            )
        time.sleep(0.05)
    raise FedkubeError(
        f"{handle.name} did not become ready within {timeout_s:.0f}s; its log: {log}"
    )
