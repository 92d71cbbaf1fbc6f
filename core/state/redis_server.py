"""Start and stop a real ``redis-server`` on a free loopback port.

Used by ``fedkube run`` (the embedded runtime) and by the integration tests.
With a data directory the server keeps an append-only file, so a killed run
can be resumed with its round state.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from fedkube.errors import FedkubeError
from fedkube.service.process import die_with_parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process; a context manager."""

    def __init__(
        self, data_dir: Path | None = None, port: int | None = None, host: str = "127.0.0.1"
    ):
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FedkubeError(
                "redis-server is not installed: run scripts/setup.sh (Debian package redis-server)"
            )
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += [
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                # Every acknowledged write is on disk before the reply: a
                # SIGKILLed redis-server restarts with every report and round
                # it confirmed (round state is small; the cost is one fsync
                # per write).
                "--appendfsync",
                "always",
            ]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise FedkubeError(f"redis-server exited at start: {err.strip()}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise FedkubeError(f"redis-server did not answer on {self.url}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
