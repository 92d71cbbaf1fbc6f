"""``fedkube run --ray-address``: a real two-node Ray cluster on this machine.

The test starts a head node (region ``eu``) and a second node (region ``us``)
with the venv's ``ray start``, each in its own session, temp dir and ports,
with token authentication (its own token, in the environment). It runs the
small job on the cluster and checks that each region's combiner and workers
ran on that region's node. Both nodes are stopped by ending exactly the
processes of the two sessions it started (``ray stop`` would stop every Ray
of this user on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkube.local.ray_runtime import RayLauncher
from fedkube.local.runner import RunOptions, make_launcher, run_job
from tests.support import small_job_dict, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ray]

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
HEAD_PORT_FLAGS = ("--port", "--ray-client-server-port", "--dashboard-port")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _ports(flags: tuple[str, ...]) -> list[str]:
    return [part for flag in flags for part in (flag, str(_free_port()))]


def _session_processes(sessions: set[int]) -> dict[int, str]:
    """Live (not zombie) processes of the given session ids: pid -> command name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session in sessions and state != "Z":
            found[int(entry.name)] = name
    return found


def _signal_and_wait(pids: list[int], sessions: set[int], grace: float) -> None:
    """SIGTERM ``pids``, SIGKILL what is left of them after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if pid in _session_processes(sessions)]
            if not pids:
                return
            time.sleep(0.1)


@dataclass
class RayNodes:
    """Ray nodes this test started, each the leader of its own session."""

    env: dict[str, str]
    sessions: set[int] = field(default_factory=set)
    temp_dirs: list[str] = field(default_factory=list)

    def start(self, resources: dict[str, float], *args: str) -> None:
        # Short temp dirs: Ray's Unix socket paths must stay under ~107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="fkray-")
        self.temp_dirs.append(temp_dir)
        command = [
            RAY,
            "start",
            *args,
            *_ports(NODE_PORT_FLAGS),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--resources",
            json.dumps(resources),
            "--object-store-memory",
            str(100 * 1024 * 1024),
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
        ]
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its daemons stay in this session: stop() finds them
        )
        self.sessions.add(process.pid)
        output, _ = process.communicate(timeout=START_TIMEOUT_S)
        assert process.returncode == 0, f"ray start {' '.join(args)} failed:\n{output[-3000:]}"

    def stop(self) -> None:
        """As ``ray stop`` does, but only for these sessions: raylets, the rest, then GCS."""
        for bucket in ("raylet", None, "gcs_server"):
            live = _session_processes(self.sessions)
            pids = [
                pid
                for pid, name in live.items()
                if name == bucket or (bucket is None and name not in ("raylet", "gcs_server"))
            ]
            _signal_and_wait(pids, self.sessions, grace=30.0)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _refresh_ray_auth() -> None:
    """Make this process's Ray read RAY_AUTH_* again.

    Ray caches the authentication mode and token when it is first imported (an
    earlier test may have imported it); its own tests refresh them this way.
    Rays without token authentication have nothing to refresh.
    """
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:
        return
    reset_auth_token_state()


@contextmanager
def _environment(changes: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _refresh_ray_auth()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _refresh_ray_auth()


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head node with ``region-eu`` and a second node with ``region-us``; its address."""
    import ray

    # The driver (this process) and both nodes share one token, given in the
    # environment, so nothing depends on ~/.ray/auth_token.
    environment: dict[str, str | None] = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_AUTH_TOKEN_PATH": None,
        "RAY_ADDRESS": None,
        "RAY_DISABLE_USAGE_STATS": "1",
    }
    with _environment(environment):
        nodes = RayNodes(env=dict(os.environ))
        head_ports = _ports(HEAD_PORT_FLAGS)
        address = f"127.0.0.1:{head_ports[head_ports.index('--port') + 1]}"
        try:
            nodes.start({"region-eu": 8}, "--head", "--include-dashboard", "false", *head_ports)
            nodes.start({"region-us": 8}, "--address", address)
            yield address
        finally:
            ray.shutdown()
            nodes.stop()
    leftover = _session_processes(nodes.sessions)
    assert not leftover, f"Ray processes still running after the test: {leftover}"


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def test_fedkube_run_places_each_region_on_its_ray_node(ray_cluster, tmp_path):
    import ray

    address = ray_cluster
    ray.init(address=address, log_to_driver=False)
    try:
        wait_for(lambda: len(_alive_nodes()) == 2, timeout=START_TIMEOUT_S, what="2 Ray nodes")
        region_node = {
            region: node["NodeID"]
            for node in _alive_nodes()
            for region in ("eu", "us")
            if node["Resources"].get(f"region-{region}")
        }
    finally:
        ray.shutdown()
    assert set(region_node) == {"eu", "us"} and region_node["eu"] != region_node["us"]

    job = tmp_path / "small.yaml"
    job.write_text(yaml.safe_dump(small_job_dict(rounds=2)))
    options = RunOptions(job_path=job, out_dir=tmp_path / "run", ray_address=address, quiet=True)
    launcher = make_launcher(options)  # connects the driver; run_job's stop disconnects it
    result = run_job(options, launcher)
    assert result.status == "succeeded", result.message + "\n" + _logs(tmp_path / "run")
    assert [r["round"] for r in result.history] == [1, 2]
    assert all(r["reported"] == 4 for r in result.history)

    assert isinstance(launcher, RayLauncher)
    placed = launcher.nodes  # each service's Ray node, as its actor reported it
    expected = {
        "combiner-eu": "eu",
        "worker-a-0": "eu",
        "worker-b-0": "eu",
        "combiner-us": "us",
        "worker-c-0": "us",
        "worker-d-0": "us",
    }
    assert {name: placed.get(name) for name in expected} == {
        name: region_node[region] for name, region in expected.items()
    }
    assert "global" in placed
    assert set(placed.values()) == set(region_node.values())  # both nodes ran services
    # The services reached each other across nodes: the workers' updates arrived.
    assert "update sent" in (tmp_path / "run" / "logs" / "worker-d-0.log").read_text()


def _logs(run_dir: Path) -> str:
    parts = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n{log.read_text()[-1500:]}")
    return "\n".join(parts)
