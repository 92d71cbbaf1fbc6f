"""The chart's dashboards and alert rules, as the observability tests and scripts use them.

The dashboards' JSON files and the PrometheusRule template are the only
sources of their PromQL: everything here reads those (and renders the chart
with the real helm), so a test can never check a copy that has drifted.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedkube.local.launcher import ProcessHandle, ProcessLauncher
from fedkube.local.runner import LocalRun, RunOptions
from fedkube.operator.metrics import OperatorMetrics
from fedkube.service.metrics import Metrics
from fedkube.wire.protocol import H_CLIENT, H_CODEC, H_JOB, H_ROUND, H_TENANT, H_WEIGHT
from tests.controlplane import resolve_bin_dir
from tests.prometheus import PrometheusServer
from tests.support import ROOT, small_job_dict, wait_for

CHART = ROOT / "charts" / "fedkube"
DASHBOARDS = CHART / "dashboards"
JOB_OVERVIEW = DASHBOARDS / "fedkube-job-overview.json"
OPERATOR = DASHBOARDS / "fedkube-operator.json"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
# What Grafana puts in for its built-in interval variables when the tests
# query Prometheus directly: a rate window of several 1 s scrapes.
GRAFANA_VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
    "__range_s": "300",
}
METRIC_NAME = re.compile(r"\bfedkube_[a-z0-9_]+")


# -- dashboards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: what Grafana would send to Prometheus."""

    panel: str
    ref_id: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"panel {self.panel!r} target {self.ref_id}: {self.expr}"


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace ``$name`` and ``${name}`` as Grafana does before it sends a query.

    Longer names first, so that ``$__range_s`` is not read as ``$__range``.
    """
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name])
        expr = expr.replace("$" + name, variables[name])
    return expr


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def known_series() -> set[str]:
    """Every sample name the services and the operator can expose (core/service/metrics.py and
    operator/metrics.py), with the suffixes Prometheus sees for counters and histograms."""
    names: set[str] = set()
    for registry in (Metrics().registry, OperatorMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names |= {f"{family.name}_total", f"{family.name}_created"}
            elif family.type == "histogram":
                names |= {f"{family.name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
            else:
                names.add(family.name)
    return names


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number Grafana can draw (NaN and ±Inf draw nothing)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def panels_without_data(
    prometheus: PrometheusServer,
    queries: list[PanelQuery],
    variables: Mapping[str, str],
    timeout: float,
) -> list[PanelQuery]:
    """Wait until every query returns data (``has_data``); the queries that never did.

    Rates need two scrapes in their window, so a fresh target's panels fill
    over a few seconds: the caller asserts on what is still empty at the end.
    """
    empty: list[PanelQuery] = []

    def every_query_has_data() -> bool:
        empty[:] = [
            q for q in queries if not has_data(prometheus.query(substitute(q.expr, variables)))
        ]
        return not empty

    try:
        wait_for(every_query_has_data, timeout, "data from every panel query")
    except AssertionError:
        return empty
    return []


# -- the chart --------------------------------------------------------------------------------


def helm_template(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """``helm template`` the chart (no cluster needed) and return its documents."""
    helm = resolve_bin_dir() / "helm"
    done = subprocess.run(
        [str(helm), "template", "fedkube", str(chart), "--namespace", "fedkube", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"helm template {' '.join(args)} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def set_values(values: Mapping[str, Any]) -> list[str]:
    """``--set-json`` arguments: unlike ``--set``, they keep 0.3 a number, as the schema wants."""
    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def prometheus_rule(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The chart's PrometheusRule, rendered as on a cluster that has the CRD."""
    args = ["--api-versions", PROMETHEUS_RULE_API, *set_values(values or {})]
    rules = [doc for doc in helm_template(*args) if doc["kind"] == "PrometheusRule"]
    assert len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"
    return rules[0]


def write_rule_file(path: Path, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered PrometheusRule's groups as a Prometheus rule file; returns its rules.

    This is what the prometheus-operator does with the object: its
    ``spec.groups`` becomes a rule file of the Prometheus it configures.
    """
    groups = prometheus_rule(values)["spec"]["groups"]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return [rule for group in groups for rule in group["rules"]]


# -- a job run by `fedkube run`'s own runtime -------------------------------------------------


def start_run(workdir: Path, name: str, **spec: Any) -> LocalRun:
    """Start the small job (spec overrides) named ``name`` as `fedkube run` would; stop() it."""
    document = small_job_dict(**spec)
    document["metadata"]["name"] = name
    manifest = workdir / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(document))
    run = LocalRun(RunOptions(job_path=manifest, out_dir=workdir / "run"), ProcessLauncher())
    run.start()
    return run


def wait_service_targets(
    run: LocalRun, workers: list[str] | None = None, timeout: float = 180
) -> list[str]:
    """``host:port`` of the global aggregator's, every combiner's and the workers' /metrics.

    ``workers`` are client ids (default: every client). Each service writes
    its port file once it serves; a worker does so before it loads its data,
    so this returns before round 1 opens.
    """
    clients = workers if workers is not None else [c.id for c in run.job.clients()]
    # port file -> the runner's name for the process
    services = {"global": "global"}
    services |= {region: f"combiner-{region}" for region in run.job.region_names()}
    services |= {f"worker-{client}": f"worker-{client}" for client in clients}
    ports = run.out / "ports"

    def written() -> bool:
        for process in services.values():
            code = run.handles[process].poll()
            if code is not None:
                raise AssertionError(f"{process} exited with code {code}; see {run.out}/logs")
        return all((ports / name).exists() for name in services)

    wait_for(written, timeout, "every service's port file")
    return [f"127.0.0.1:{(ports / name).read_text().strip()}" for name in services]


def kill_run(run: LocalRun) -> None:
    """SIGKILL every service, then let the runner clean up (its redis-server).

    A test that is done with a job has no use for a graceful shutdown, which
    takes the global aggregator seconds; to Prometheus both look the same: the
    targets stop answering and their series go stale.
    """
    for handle in run.handles.values():
        if isinstance(handle, ProcessHandle) and handle.poll() is None:
            handle.process.kill()
    run.stop(grace_s=0)


def tenant_token(run: LocalRun, tenant: str) -> str:
    token: str = json.loads((run.out / "secrets" / "tokens.json").read_text())[tenant]
    return token


def combiner_url(run: LocalRun, region: str) -> str:
    return f"http://127.0.0.1:{(run.out / 'ports' / region).read_text().strip()}"


def send_update(
    run: LocalRun, client: str, round_no: int, body: bytes = b"", token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST an update to the client's combiner as its worker would; returns (status, reply)."""
    found = next(c for c in run.job.clients() if c.id == client)
    request = urllib.request.Request(
        combiner_url(run, found.region) + "/v1/update",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {token or tenant_token(run, found.tenant)}",
            H_TENANT: found.tenant,
            H_CLIENT: client,
            H_JOB: run.job.name,
            H_ROUND: str(round_no),
            H_WEIGHT: "1.0",
            H_CODEC: "safetensors",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def register(run: LocalRun, client: str) -> None:
    """Poll the combiner for a task once, as a worker's first request does (it registers)."""
    found = next(c for c in run.job.clients() if c.id == client)
    request = urllib.request.Request(
        combiner_url(run, found.region) + "/v1/tasks",
        data=json.dumps({"clients": [client], "wait": 0}).encode(),
        headers={
            "Authorization": f"Bearer {tenant_token(run, found.tenant)}",
            H_TENANT: found.tenant,
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200


def alerts_named(prometheus: PrometheusServer, name: str, state: str | None = None) -> list[dict]:
    """Active alerts called ``name`` (in ``state``: pending or firing, if given)."""
    return [
        alert
        for alert in prometheus.alerts()
        if alert["labels"]["alertname"] == name and state in (None, alert["state"])
    ]
