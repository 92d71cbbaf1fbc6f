"""The dashboards and alert rules as files and rendered objects, without any server.

What Prometheus makes of their queries is checked against real data in
test_panels_and_alerts.py; here: every query names series that fedkube
exposes, the variables Grafana needs exist, and the chart ships the files
unchanged, with the sidecar's label, only where they are wanted.
"""

from __future__ import annotations

import json

import pytest

from tests.observability.support import (
    DASHBOARDS,
    JOB_OVERVIEW,
    OPERATOR,
    PROMETHEUS_RULE_API,
    helm_template,
    known_series,
    load_dashboard,
    metric_names,
    panel_queries,
    panels,
    prometheus_rule,
    set_values,
)

DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))


def test_the_chart_ships_the_two_dashboards():
    assert DASHBOARD_FILES == sorted([JOB_OVERVIEW, OPERATOR])


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_queries_only_series_that_fedkube_exposes(path):
    known = known_series()
    queries = panel_queries(load_dashboard(path))
    assert queries, "a dashboard without queries"
    for query in queries:
        named = metric_names(query.expr)
        assert named, f"{query}: names no fedkube_* series"
        unknown = named - known
        assert not unknown, f"{query}: unknown series {sorted(unknown)}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_has_a_title_a_description_and_uses_the_datasource_variable(path):
    dashboard = load_dashboard(path)
    assert 38 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["title"] and panel.get("description"), panel
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty query"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_job_overview_selects_one_job_and_every_job_query_is_scoped_to_it():
    dashboard = load_dashboard(JOB_OVERVIEW)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["query"]["query"] == "label_values(fedkube_round_current, job)"
    assert variables["job"]["datasource"]["uid"] == "${datasource}"
    assert not variables["job"]["multi"], 'queries use job="$job", not a regex'
    for query in panel_queries(dashboard):
        selectors = query.expr.count("fedkube_")
        assert query.expr.count('job="$job"') == selectors, f"{query}: a series not scoped to $job"


def test_the_job_overview_covers_what_the_design_promises():
    dashboard = load_dashboard(JOB_OVERVIEW)
    titles = " | ".join(p["title"].lower() for p in panels(dashboard))
    series = set().union(*(metric_names(q.expr) for q in panel_queries(dashboard)))
    for word in ["round", "participation", "bytes up", "bytes down", "rejected", "loss"]:
        assert word in titles, word
    for name in [
        "fedkube_round_current",
        "fedkube_round_duration_seconds_bucket",
        "fedkube_participation_ratio",
        "fedkube_updates_accepted_total",
        "fedkube_bytes_up_total",
        "fedkube_bytes_down_total",
        "fedkube_updates_rejected_total",
        "fedkube_model_loss",
        "fedkube_model_accuracy",
        "fedkube_eval_metric",
        "fedkube_aggregation_seconds_bucket",
        "fedkube_dp_epsilon",
    ]:
        assert name in series, name


# -- the chart's objects ------------------------------------------------------------------------


def dashboard_maps(*args: str) -> list[dict]:
    return [
        doc
        for doc in helm_template(*args)
        if doc["kind"] == "ConfigMap" and "dashboard" in doc["metadata"]["name"]
    ]


def test_each_dashboard_becomes_one_configmap_with_the_grafana_sidecar_label():
    maps = dashboard_maps()
    assert len(maps) == len(DASHBOARD_FILES)
    shipped = {}
    for config_map in maps:
        assert config_map["metadata"]["name"].startswith("fedkube-dashboard-")
        assert config_map["metadata"]["namespace"] == "fedkube"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == "fedkube"
        shipped.update(config_map["data"])
    assert set(shipped) == {p.name for p in DASHBOARD_FILES}
    for path in DASHBOARD_FILES:
        assert json.loads(shipped[path.name]) == json.loads(path.read_text()), path.name


def test_dashboards_follow_the_label_and_namespace_values_and_can_be_turned_off():
    maps = dashboard_maps(
        *set_values(
            {
                "dashboards.label": "grafana_dash",
                "dashboards.labelValue": "yes",
                "dashboards.namespace": "monitoring",
            }
        )
    )
    assert maps and all(m["metadata"]["namespace"] == "monitoring" for m in maps)
    assert all(m["metadata"]["labels"]["grafana_dash"] == "yes" for m in maps)
    assert dashboard_maps("--set", "dashboards.enabled=false") == []


def test_the_prometheus_rule_needs_its_crd_and_alerts_enabled():
    kinds = [doc["kind"] for doc in helm_template()]
    assert "PrometheusRule" not in kinds, "rendered on a cluster without the CRD"
    off = helm_template("--api-versions", PROMETHEUS_RULE_API, "--set", "alerts.enabled=false")
    assert "PrometheusRule" not in [doc["kind"] for doc in off]


def test_the_prometheus_rule_carries_the_four_alerts_and_follows_the_values():
    rule = prometheus_rule(
        {
            "alerts.roundStalledAfter": "7m",
            "alerts.participationBelow": 0.3,
            "alerts.for": "2m",
            "alerts.labels": {"release": "kube-prometheus-stack"},
        }
    )
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "FedkubeRoundStalled",
        "FedkubeParticipationLow",
        "FedkubeUpdatesRejected",
        "FedkubeOperatorReconcileErrors",
    }
    assert "[7m]" in alerts["FedkubeRoundStalled"]["expr"]
    assert "offset 7m" in alerts["FedkubeRoundStalled"]["expr"]
    assert alerts["FedkubeParticipationLow"]["expr"].strip().endswith("< 0.3")
    assert alerts["FedkubeParticipationLow"]["for"] == "2m"
    assert "[2m]" in alerts["FedkubeUpdatesRejected"]["expr"]
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert "{{ $labels." in alert["annotations"]["summary"], name
        assert alert["annotations"]["description"], name
