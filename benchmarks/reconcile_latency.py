"""Reconcile latency of the operator on a real control plane with kwok nodes.

For FederatedJobs of 10 and 100 tenants (1 worker with 1 GPU each, 4
regions), measured from ``kubectl apply`` returning:

* children: until every object the operator creates exists (ConfigMap,
  Secrets, ServiceAccounts, NetworkPolicies, Services, Deployments, pods);
* running: until every worker pod is Running on a kwok GPU node (the real
  kube-scheduler placed it; kwok plays the kubelet);
* a no-op pass: the duration of the operator's timer pass over the
  unchanged job (one list per kind, no write), from its own histogram.

Everything runs on this machine: etcd, kube-apiserver, controller-manager,
scheduler, kwok, redis-server and ``fedkube operator`` as a process. Each
size runs ``--repeat`` times in a fresh namespace; the table shows the median
and the worst. Numbers depend on the machine (2 shared cores here).

Run:  .venv/bin/python benchmarks/reconcile_latency.py   (``make bench``; it builds
the control plane first with scripts/build-control-plane.sh, as ``make test`` does)

``--quick`` runs jobs of 2 and 4 tenants once each on 2 nodes: every step of
the full run in well under a minute, not a measurement. The smoke test in
tests/cluster/test_benchmarks.py runs it so that a change to the operator or
the test cluster breaks ``make test``, not only ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedkube.state.redis_server import RedisServer  # noqa: E402
from tests.controlplane import ControlPlane, start_control_plane  # noqa: E402
from tests.operator_process import OperatorProcess  # noqa: E402
from tests.support import small_job_dict, wait_for  # noqa: E402

REGIONS = ["r0", "r1", "r2", "r3"]


def job(tenants: int) -> dict[str, Any]:
    document = small_job_dict(
        regions=[{"name": r} for r in REGIONS],
        tenants=[
            {"name": f"t{i:03d}", "region": REGIONS[i % len(REGIONS)], "resources": {"gpu": 1}}
            for i in range(tenants)
        ],
    )
    document["metadata"]["name"] = f"bench{tenants}"
    return document


def expected_objects(tenants: int) -> int:
    return 1 + 1 + tenants * 4 + len(REGIONS) * 3 + 2


def count(cp: ControlPlane, namespace: str, name: str) -> tuple[int, int]:
    """(children the operator made, worker pods Running)."""
    items = json.loads(
        cp.kubectl(
            "get",
            "-n",
            namespace,
            "configmaps,secrets,serviceaccounts,services,deployments,networkpolicies,pods",
            "-l",
            f"fedkube.io/job={name},app.kubernetes.io/managed-by=fedkube-operator",
            "-o",
            "json",
        ).stdout
    )["items"]
    made = [
        i
        for i in items
        if not any(r["kind"] == "ReplicaSet" for r in i["metadata"].get("ownerReferences", []))
    ]
    running = [
        i for i in made if i["kind"] == "Pod" and (i.get("status") or {}).get("phase") == "Running"
    ]
    return len(made), len(running)


def timer_passes(operator: OperatorProcess) -> tuple[float, float]:
    """(total seconds, count) of the operator's timer passes so far."""
    text = operator.metrics()
    total = re.search(r'reconcile_duration_seconds_sum\{trigger="timer"\} (\S+)', text)
    passes = re.search(r'reconcile_duration_seconds_count\{trigger="timer"\} (\S+)', text)
    assert total and passes
    return float(total.group(1)), float(passes.group(1))


def measure(cp: ControlPlane, tenants: int, workdir: Path, index: int) -> dict[str, float]:
    namespace = f"bench-{tenants}-{index}"
    cp.kubectl("create", "namespace", namespace)
    wait_for(
        lambda: cp.kubectl("get", "-n", namespace, "sa", "default", check=False).returncode == 0,
        30,
        "the namespace's default ServiceAccount",
    )
    run_dir = workdir / namespace
    run_dir.mkdir()
    with RedisServer(run_dir / "redis") as redis:
        operator = OperatorProcess(cp, namespace, redis.url, run_dir).start()
        try:
            operator.wait_serving()
            document = job(tenants)
            name = document["metadata"]["name"]
            wanted = expected_objects(tenants)
            started = time.perf_counter()
            cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document))
            # Either can come first: kwok may run the worker pods before the
            # operator has written its last NetworkPolicy or Service.
            children_s: float | None = None
            running_s: float | None = None
            while children_s is None or running_s is None:
                made, running = count(cp, namespace, name)
                now = time.perf_counter() - started
                if children_s is None and made >= wanted:
                    children_s = now
                if running_s is None and running >= tenants:
                    running_s = now
                if now > 600:
                    raise AssertionError(
                        f"{tenants} tenants: after 600 s, {made} of {wanted} objects"
                        f" and {running} of {tenants} worker pods Running"
                    )
                time.sleep(0.05)
            # Timer passes over the converged job: no write, lists and builds only.
            time.sleep(2)
            total_0, count_0 = timer_passes(operator)
            wait_for(lambda: timer_passes(operator)[1] >= count_0 + 3, 60, "3 timer passes")
            total_1, count_1 = timer_passes(operator)
            noop_s = (total_1 - total_0) / (count_1 - count_0)
        finally:
            operator.stop()
    cp.kubectl("delete", "namespace", namespace, "--wait=false")
    return {"children": children_s, "running": running_s, "noop": noop_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="tenants per job, comma-separated (default 10,100)")
    parser.add_argument("--repeat", type=int, help="runs per size (default 3, quick 1)")
    parser.add_argument(
        "--quick", action="store_true", help="jobs of 2 and 4 tenants, once each: a smoke test"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("2,4" if args.quick else "10,100")).split(",")]
    repeat = args.repeat or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="fedkube-bench-") as tmp:
        workdir = Path(tmp)
        gpus_needed = max(sizes)
        nodes = max(2, -(-gpus_needed // 8))
        cp = start_control_plane(workdir / "cluster", nodes=0)
        try:
            for i in range(nodes):
                cp.add_node(f"gpu-node-{i}", gpus=8)
            cp.kubectl("apply", "-f", str(ROOT / "crds"))
            cp.kubectl("wait", "--for=condition=Established", "crd/federatedjobs.fedkube.io")
            rows = []
            for tenants in sizes:
                runs = [measure(cp, tenants, workdir, i) for i in range(repeat)]
                rows.append((tenants, runs))
        finally:
            cp.stop()
    print(f"\nreconcile latency, {nodes} kwok nodes x 8 GPUs, {repeat} runs each")
    print(
        f"{'tenants':>8} {'objects':>8} {'children: median':>17} {'max':>7}"
        f" {'pods Running: median':>21} {'max':>7} {'no-op pass':>11}"
    )
    for tenants, runs in rows:
        children = [r["children"] for r in runs]
        running = [r["running"] for r in runs]
        noop = statistics.median(r["noop"] for r in runs)
        print(
            f"{tenants:>8} {expected_objects(tenants):>8} {statistics.median(children):>16.2f}s"
            f" {max(children):>6.2f}s {statistics.median(running):>20.2f}s {max(running):>6.2f}s"
            f" {noop * 1000:>9.1f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
