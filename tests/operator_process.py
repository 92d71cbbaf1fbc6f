"""The operator as the tests run it: ``fedkube operator`` in its own process.

The process is the same command a pod would run; only the kubeconfig and
the ports differ. Tests SIGKILL it to prove that a restarted operator
converges, so it is a real process and not a coroutine in the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from fedkube.service.process import die_with_parent
from fedkube.state.redis_server import free_port
from tests.controlplane import ControlPlane
from tests.support import wait_for


class OperatorProcess:
    """``fedkube operator --namespace NS`` against the test control plane.

    ``redis_url`` None: no ``--redis-url``, as at a site that cannot reach the
    central Redis. ``hosts`` (name -> loopback address) is the cluster DNS
    that a pod would have: a site operator reaches the central combiners by
    their Service names, which the pod runner serves on loopback addresses.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        namespace: str,
        redis_url: str | None,
        log_dir: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        hosts: dict[str, str] | None = None,
    ):
        self.control_plane = control_plane
        self.namespace = namespace
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.extra_env = dict(env or {})
        if hosts:
            self.extra_env.update(_dns_shim(log_dir, hosts))
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        env = {**self.control_plane.env(), "PYTHONUNBUFFERED": "1", **self.extra_env}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedkube.cli",
                "operator",
                "--kubeconfig",
                str(self.control_plane.kubeconfig),
                "--namespace",
                self.namespace,
                *(["--redis-url", self.redis_url] if self.redis_url else []),
                "--metrics-port",
                str(self.metrics_port),
                "--health-port",
                "0",
                "--status-interval",
                "1",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
        log.close()
        return self

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob("operator-*.log"))
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator's pod."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def metrics(self) -> str:
        return self._get("/metrics")

    def healthz(self) -> str:
        """The body of ``/healthz``; raises HTTPError when it is not 200."""
        return self._get("/healthz")

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}") as reply:
            text: str = reply.read().decode()
        return text

    def wait_serving(self) -> None:
        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"operator exited early:\n{self.log()[-3000:]}")
            try:
                self.metrics()
            except OSError:
                return False
            return True

        wait_for(up, 60, "the operator's /metrics")


_SITECUSTOMIZE = """
import json, os, socket

_hosts = json.loads(os.environ.get("FEDKUBE_TEST_HOSTS", "{}"))
_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    return _real_getaddrinfo(_hosts.get(name, host), *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
"""


def _dns_shim(log_dir: Path, hosts: dict[str, str]) -> dict[str, str]:
    """Env that makes the process resolve ``hosts`` (a sitecustomize on PYTHONPATH)."""
    folder = log_dir / "dns"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {"PYTHONPATH": str(folder), "FEDKUBE_TEST_HOSTS": json.dumps(hosts)}
