"""The real node itself: it runs a pod from an image, serves a Service by DNS name, and
leaves the host as it found it, so that it can be started again in the same session
(the shared node of the next modules is that second start).

This module's test runs before any other of tests/node starts the shared node (file order),
since one node runs at a time on a machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.controlplane import ControlPlane
from tests.node import (
    BRIDGE,
    VERSION,
    HostState,
    _kubepods,
    _mounts_under,
    start_node_cluster,
)
from tests.realnode.conftest import host_differences
from tests.support import wait_for

SLIM = f"fedkube-slim:{VERSION}"


def pod(name: str, args: list[str], **extra: object) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": SLIM,
                    "command": ["python", "-c"],
                    "args": args,
                    "securityContext": {"readOnlyRootFilesystem": True},
                    **extra,
                }
            ],
        },
    }


SERVER = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200)\n"
    "        self.end_headers()\n"
    "        self.wfile.write(b'served by ' + os.environ['HOSTNAME'].encode())\n"
    "http.server.HTTPServer(('', 8080), H).serve_forever()\n"
)
# Until kube-proxy has programmed the Service (a busy node takes seconds), a connection
# is refused: the client retries, as any client of a new Service must.
CLIENT = (
    "import urllib.request, os, time\n"
    "deadline = time.monotonic() + 90\n"
    "while True:\n"
    "    try:\n"
    "        web = urllib.request.urlopen('http://web.default.svc.cluster.local', timeout=10)\n"
    "        break\n"
    "    except OSError:\n"
    "        if time.monotonic() > deadline:\n"
    "            raise\n"
    "        time.sleep(1)\n"
    "print(web.read().decode())\n"
    "print('uid', os.getuid())\n"
    "open('/etc/x', 'w')\n"
)


def finished_phase(cp: ControlPlane, pod: str) -> str | None:
    phase = cp.kubectl("get", "pod", pod, "-o", "jsonpath={.status.phase}").stdout
    return phase if phase in ("Succeeded", "Failed") else None


def test_a_node_runs_a_pod_behind_a_service_and_its_stop_restores_the_host(tmp_path: Path):
    before = HostState.capture()
    # The shared node of tests/realnode starts after this one stopped: that start is the
    # proof that a stop leaves nothing in the way of the next.
    with start_node_cluster(tmp_path / "node", images=("pause:3.10", SLIM)) as c:
        cp = c.cp
        # Ready once it listens, not once its container started.
        listening = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
        cp.kubectl(
            "apply", "-f", "-", input=json.dumps(pod("web", [SERVER], readinessProbe=listening))
        )
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web"},
                    "spec": {
                        "selector": {"app": "web"},
                        "ports": [{"port": 80, "targetPort": 8080}],
                    },
                }
            ),
        )
        cp.kubectl("wait", "--for=condition=Ready", "pod/web", "--timeout=120s")
        cp.kubectl("apply", "-f", "-", input=json.dumps(pod("client", [CLIENT])))

        wait_for(lambda: finished_phase(cp, "client"), 180, "the client pod to finish")
        log = cp.kubectl("logs", "client").stdout
        # A Service name resolved by CoreDNS, its port mapped by kube-proxy, the image's
        # user (not root), and the root filesystem read-only as the pod asked.
        assert "served by web" in log, log
        assert "uid 10001" in log, log
        assert "Read-only file system" in log, log
    after = HostState.capture()
    assert not host_differences(before, after)
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    assert not _kubepods()
    assert not _mounts_under([tmp_path, Path("/run/containerd")])
