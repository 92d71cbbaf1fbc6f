"""The pod runner really runs what a kwok cluster only pretends to run.

Objects are applied with kubectl, as a user would; the runner executes the
pods as local processes: ConfigMap and Secret data reach them as files and
env, a client finds a server by its Service's DNS name, a finished pod's
status becomes Succeeded or Failed, and deleting a pod kills its process.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from tests.controlplane import ControlPlane
from tests.podrunner import PodRunner
from tests.support import wait_for

TIMEOUT = 60

WEB_AND_CLIENT = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data:
  greeting.txt: hello from the configmap
  index.html: <p>served by web</p>
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {token: s3cr3t-token}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: server
        image: python:3.11
        command: [python, -m, http.server, --bind, $(POD_IP), "8080", --directory, /srv]
        env:
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        ports: [{name: http, containerPort: 8080}]
        volumeMounts: [{name: site, mountPath: /srv, readOnly: true}]
      volumes:
      - name: site
        configMap:
          name: settings
          items: [{key: index.html, path: index.html}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: OnFailure
  containers:
  - name: fetch
    image: python:3.11
    command: [python, -c]
    args:
    - |
      import os, sys, urllib.request
      print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
      print(open(sys.argv[2]).read())
      print("token:", os.environ["TOKEN"])
    - http://web.$(NAMESPACE).svc:8080/index.html
    - /etc/settings/greeting.txt
    env:
    - {name: NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: TOKEN, valueFrom: {secretKeyRef: {name: creds, key: token}}}
    volumeMounts: [{name: settings, mountPath: /etc/settings}]
  volumes:
  - {name: settings, configMap: {name: settings}}
"""

# A Service whose port differs from its (named) targetPort; an init container
# that fills an emptyDir; a pod that fails; a pod the runner cannot run.
PROXY_AND_FAILURES = """\
apiVersion: v1
kind: Service
metadata: {name: front}
spec:
  selector: {app: srv}
  ports: [{port: 9090, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: srv}}
spec:
  initContainers:
  - name: fill
    image: python:3.11
    command: [python, -c, "open('/srv/index.html', 'w').write('written by init')"]
    volumeMounts: [{name: site, mountPath: /srv}]
  containers:
  - name: http
    image: python:3.11
    command: [python, -m, http.server, --bind, $(POD_IP), "8080", --directory, /srv]
    env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
    ports: [{name: http, containerPort: 8080}]
    volumeMounts: [{name: site, mountPath: /srv}]
  volumes: [{name: site, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: probe}
spec:
  restartPolicy: OnFailure
  containers:
  - name: get
    image: python:3.11
    command: [python, -c, "import urllib.request as u; print(u.urlopen('http://front:9090/').read())"]
---
apiVersion: v1
kind: Pod
metadata: {name: failing}
spec:
  restartPolicy: Never
  containers:
  - {name: exit, image: python:3.11, command: [python, -c, "raise SystemExit(3)"]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-volume}
spec:
  containers:
  - name: c
    image: python:3.11
    command: [python, -c, "pass"]
    volumeMounts: [{name: host, mountPath: /host}]
  volumes: [{name: host, hostPath: {path: /etc}}]
"""

# One pod ignores SIGTERM and leaves a child in its process group; the other
# is an ordinary long-running pod.
STUBBORN_AND_STEADY = """\
apiVersion: v1
kind: Pod
metadata: {name: stubborn}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: python:3.11
    command: [sh, -c]
    args:
    - |
      sleep 300 &
      echo "child $!"
      exec python -c '
      import os, signal, time
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      print("main", os.getpid())
      time.sleep(300)'
---
apiVersion: v1
kind: Pod
metadata: {name: steady}
spec:
  containers:
  - name: c
    image: python:3.11
    command: [python, -c, "import os, time; print('main', os.getpid()); time.sleep(300)"]
"""


@pytest.fixture
def runner(
    api_client: kubernetes.client.ApiClient, namespace: str, tmp_path: Path
) -> Iterator[PodRunner]:
    with PodRunner(
        api_client, namespace, tmp_path / "pods", extra_env={"PYTHONUNBUFFERED": "1"}
    ) as runner:
        yield runner
        # Shown by pytest when the test failed.
        print(f"running={runner.running()} waiting={runner.waiting()} errors={runner.errors}")
        for folder in sorted((tmp_path / "pods").iterdir()):
            if folder.name != "claims":
                print(f"--- {folder.name}\n{runner.log(folder.name)}")


def apply(control_plane: ControlPlane, namespace: str, manifests: str) -> None:
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=manifests)


def get(control_plane: ControlPlane, namespace: str, *args: str) -> Any:
    done = control_plane.kubectl("get", "-n", namespace, *args, "-o", "json")
    return json.loads(done.stdout)


def phase(control_plane: ControlPlane, namespace: str, pod: str) -> str:
    return str(get(control_plane, namespace, "pod", pod)["status"].get("phase"))


def web_pods(control_plane: ControlPlane, namespace: str) -> list[str]:
    pods = get(control_plane, namespace, "pods", "-l", "app=web")["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_a_client_pod_reads_config_and_secrets_and_reaches_a_deployment_by_its_service(
    control_plane: ControlPlane, namespace: str, runner: PodRunner
) -> None:
    apply(control_plane, namespace, WEB_AND_CLIENT)

    wait_for(lambda: runner.exit_codes("client")[-1:] == [0], TIMEOUT, "the client to succeed")
    log = runner.log("client", "fetch")
    assert "<p>served by web</p>" in log
    assert "hello from the configmap" in log
    assert "token: s3cr3t-token" in log
    wait_for(
        lambda: phase(control_plane, namespace, "client") == "Succeeded",
        TIMEOUT,
        "the client pod's phase to become Succeeded",
    )
    status = get(control_plane, namespace, "pod", "client")["status"]
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert status["containerStatuses"][0]["restartCount"] == runner.restarts("client")

    # The web pod serves at its Service's address, which its POD_IP resolved to.
    (web,) = web_pods(control_plane, namespace)
    assert web in runner.running()
    assert runner.ip_of(web) == runner.ip_of("web")
    assert f"Serving HTTP on {runner.ip_of('web')} port 8080" in runner.log(web)
    assert runner.errors == []

    control_plane.kubectl("delete", "pod", "-n", namespace, web, "--wait=false")
    wait_for(lambda: web not in runner.running(), TIMEOUT, f"{web}'s process to be killed")

    # Its replacement takes the Service's address over.
    def replacement() -> str | None:
        running = runner.running()
        return next((p for p in web_pods(control_plane, namespace) if p in running), None)

    successor = wait_for(replacement, TIMEOUT, "the replacement web pod to run")
    assert successor != web
    assert runner.ip_of(successor) == runner.ip_of("web")

    # After a rolling update the Service still leads to the (new) web pod.
    control_plane.kubectl("set", "env", "-n", namespace, "deployment/web", "ROLLOUT=2")
    control_plane.kubectl("rollout", "status", "-n", namespace, "deployment/web")
    wait_for(
        lambda: runner.running() == set(web_pods(control_plane, namespace)) - {successor},
        TIMEOUT,
        "only the rolled-out web pod to run",
    )
    apply(control_plane, namespace, WEB_AND_CLIENT.replace("name: client", "name: client2"))
    wait_for(lambda: runner.exit_codes("client2")[-1:] == [0], TIMEOUT, "client2 to succeed")
    assert "<p>served by web</p>" in runner.log("client2")


def test_ports_differing_from_target_ports_init_containers_failures_and_bad_volumes(
    control_plane: ControlPlane, namespace: str, runner: PodRunner
) -> None:
    apply(control_plane, namespace, PROXY_AND_FAILURES)

    wait_for(lambda: runner.exit_codes("probe")[-1:] == [0], TIMEOUT, "the probe to succeed")
    assert "b'written by init'" in runner.log("probe")
    assert runner.exit_codes("server") == [0]  # the init container; the server still runs
    assert "server" in runner.running()
    assert runner.ip_of("server") == runner.ip_of("front")

    wait_for(lambda: runner.exit_codes("failing") == [3], TIMEOUT, "the failing pod to exit")
    wait_for(
        lambda: phase(control_plane, namespace, "failing") == "Failed",
        TIMEOUT,
        "the failing pod's phase to become Failed",
    )
    assert runner.restarts("failing") == 0
    terminated = get(control_plane, namespace, "pod", "failing")["status"]["containerStatuses"][0][
        "state"
    ]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"

    wait_for(lambda: runner.errors, TIMEOUT, "the bad volume to be reported")
    assert runner.errors == ["bad-volume: volume host: type hostPath is not supported"]
    assert "bad-volume" not in runner.running()


def pids(log: str) -> dict[str, int]:
    """``main``/``child`` process ids that a pod printed, by role."""
    return {role: int(pid) for role, pid in re.findall(r"^(main|child) (\d+)$", log, re.M)}


def gone(pid: int) -> bool:
    """No such process, or only its zombie (reaped by init in its own time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_deleting_a_pod_kills_its_process_group_and_leaving_the_runner_kills_the_rest(
    api_client: kubernetes.client.ApiClient,
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
) -> None:
    env = {"PYTHONUNBUFFERED": "1"}
    with PodRunner(api_client, namespace, tmp_path / "pods", extra_env=env) as runner:
        apply(control_plane, namespace, STUBBORN_AND_STEADY)
        stubborn = wait_for(
            lambda: len(found := pids(runner.log("stubborn"))) == 2 and found,
            TIMEOUT,
            "the stubborn pod's process ids",
        )
        steady = wait_for(lambda: pids(runner.log("steady")), TIMEOUT, "the steady pod's pid")

        deleted = time.monotonic()
        control_plane.kubectl("delete", "pod", "-n", namespace, "stubborn", "--wait=false")
        wait_for(lambda: "stubborn" not in runner.running(), TIMEOUT, "stubborn to be killed")
        # SIGTERM was ignored: only the SIGKILL after the 1 s grace period ended it.
        assert time.monotonic() - deleted >= 1.0
        wait_for(lambda: gone(stubborn["main"]) and gone(stubborn["child"]), 10, "its group")
        assert runner.running() == {"steady"}

    assert runner.running() == set()
    wait_for(lambda: gone(steady["main"]), 10, "the steady pod's process to be gone")
