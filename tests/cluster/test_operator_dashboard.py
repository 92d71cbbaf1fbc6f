"""The operator dashboard's queries against a real Prometheus scraping a real operator.

The operator (``fedkube operator``, as its pod runs it) reconciles a job on the
loopback control plane; Prometheus scrapes its --metrics-port each second.
Every panel of charts/fedkube/dashboards/fedkube-operator.json must return
data: queries come from the JSON, never from a copy.
"""

from __future__ import annotations

from tests.cluster.jobs import apply, job_document
from tests.controlplane import ControlPlane
from tests.observability.support import (
    GRAFANA_VARIABLES,
    OPERATOR,
    load_dashboard,
    panel_queries,
    panels_without_data,
    substitute,
)
from tests.operator_process import OperatorProcess
from tests.prometheus import start_prometheus
from tests.support import wait_for


def test_every_operator_panel_returns_data_while_a_job_is_reconciled(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tmp_path
):
    target = f"127.0.0.1:{operator.metrics_port}"
    with start_prometheus(tmp_path / "prometheus", {"fedkube-operator": [target]}) as prometheus:
        prometheus.wait_targets_up()
        apply(control_plane, namespace, job_document())
        wait_for(
            lambda: prometheus.query("sum(fedkube_operator_writes_total) > 0"),
            60,
            "the job's children written, as Prometheus sees it",
        )

        queries = panel_queries(load_dashboard(OPERATOR))
        empty = panels_without_data(prometheus, queries, GRAFANA_VARIABLES, timeout=60)
        assert not empty, "panels without data:\n" + "\n".join(str(q) for q in empty)

        by_panel = {q.panel: substitute(q.expr, GRAFANA_VARIABLES) for q in queries}
        phases = {
            s["metric"]["phase"]: float(s["value"][1])
            for s in prometheus.query(by_panel["FederatedJobs by phase"])
        }
        assert sum(phases.values()) == 1, phases  # the one job, in whichever phase it is
        written = {
            (s["metric"]["action"], s["metric"]["kind"])
            for s in prometheus.query(by_panel["Child objects written"])
        }
        assert ("apply", "Pod") in written and ("apply", "Deployment") in written
        # Before any pass failed the errors panel says 0 (kind "none"), not "no data";
        # after one did, it shows only the real kinds.
        shown = {
            s["metric"]["kind"]: float(s["value"][1])
            for s in prometheus.query(by_panel["Reconcile errors by kind"])
        }
        raw = prometheus.query("fedkube_operator_reconcile_errors_total")
        failed = {s["metric"]["kind"] for s in raw}
        expected = {"none"} if not failed else failed
        assert set(shown) == expected, (shown, failed)
        assert failed or shown["none"] == 0
