"""The dashboards' queries and the alert rules against a real Prometheus and a real job.

A job runs as ``fedkube run`` runs it (``LocalRun``: redis-server, the global
aggregator, a combiner per region and a worker per client, each its own
process); a real Prometheus scrapes every service's /metrics each second and
evaluates the chart's rendered alert rules. The panel queries and rules come
from the dashboard JSON and the rendered PrometheusRule, never from a copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fedkube.local.runner import LocalRun
from tests.observability.support import (
    GRAFANA_VARIABLES,
    JOB_OVERVIEW,
    alerts_named,
    kill_run,
    load_dashboard,
    panel_queries,
    panels_without_data,
    send_update,
    start_run,
    substitute,
    wait_service_targets,
    write_rule_file,
)
from tests.prometheus import PrometheusServer, start_prometheus
from tests.support import wait_for

pytestmark = pytest.mark.integration

# Short windows, so that what the rules detect happens within a test.
TEST_ALERT_VALUES = {"alerts.roundStalledAfter": "5s", "alerts.for": "10s"}


@dataclass
class ObservedJob:
    name: str
    run: LocalRun
    prometheus: PrometheusServer
    rules: list[dict[str, Any]]


def wait_rules_evaluated(prometheus: PrometheusServer, names: set[str]) -> dict[str, dict]:
    """Wait until every rule has been evaluated once; a rule that errs fails at once."""

    def evaluated() -> dict[str, dict] | None:
        loaded = {rule["name"]: rule for rule in prometheus.rules()}
        broken = {n: r["lastError"] for n, r in loaded.items() if r["health"] == "err"}
        assert not broken, f"rules failed to evaluate: {broken}"
        if set(loaded) == names and all(r["health"] == "ok" for r in loaded.values()):
            return loaded
        return None

    found: dict[str, dict] = wait_for(evaluated, 30, "every rule evaluated")
    return found


@pytest.fixture(scope="module")
def observed_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedJob]:
    """A job well into its rounds, scraped and alerted on; one tenant replays an old update.

    Enough rounds that it is still running when the tests are done (they stop
    it). The replay is rejected as ``late`` twice, a scrape apart, so that the
    rejected-updates panel has a rate to show in a run without faults.
    """
    workdir = tmp_path_factory.mktemp("observed")
    # fedavgm: a strategy with server state, differential privacy (its noise
    # negligible here) and evaluation at the sites, so that their panels have a
    # series to show.
    run = start_run(
        workdir,
        "observed",
        rounds=5000,
        strategy={"name": "fedavgm"},
        privacy={"dp": {"clipNorm": 100.0, "noiseMultiplier": 0.01}},
        # Every site evaluates every model too: the per-metric panel's per-tenant lines.
        evaluation={"sites": "all"},
    )
    try:
        targets = wait_service_targets(run)
        rules = write_rule_file(workdir / "alerts.yml", TEST_ALERT_VALUES)
        with start_prometheus(
            workdir / "prometheus", {"fedkube": targets}, rule_files=[workdir / "alerts.yml"]
        ) as prometheus:
            prometheus.wait_targets_up()
            wait_for(
                lambda: prometheus.query('fedkube_rounds_completed_total{job="observed"} >= 2'),
                180,
                "two rounds closed, as Prometheus sees them",
            )
            for replay in range(2):
                status, reply = send_update(run, "a-0", round_no=1)
                assert (status, reply["error"]) == (410, "late"), reply
                wait_for(
                    lambda n=replay + 1: prometheus.query(
                        f'fedkube_updates_rejected_total{{job="observed",reason="late"}} >= {n}'
                    ),
                    30,
                    f"replay {replay + 1} scraped",
                )
            yield ObservedJob("observed", run, prometheus, rules)
    finally:
        kill_run(run)


def test_every_job_overview_panel_returns_data_for_a_running_job(observed_job):
    prometheus = observed_job.prometheus
    # The repeated per-metric panel, as Grafana draws it for the headline metric.
    variables = {"job": observed_job.name, "metric": "accuracy", **GRAFANA_VARIABLES}
    queries = panel_queries(load_dashboard(JOB_OVERVIEW))
    empty = panels_without_data(prometheus, queries, variables, timeout=60)
    assert not empty, "panels without data:\n" + "\n".join(str(q) for q in empty)

    # Grafana's job picker, label_values(fedkube_round_current, job), offers the job.
    jobs = [s["metric"]["job"] for s in prometheus.query("group by (job) (fedkube_round_current)")]
    assert observed_job.name in jobs
    by_target = {(q.panel, q.ref_id): q for q in queries}

    def series_of(title: str, ref_id: str = "A") -> dict[str, float]:
        result = prometheus.query(substitute(by_target[title, ref_id].expr, variables))
        return {",".join(s["metric"].values()): float(s["value"][1]) for s in result}

    # Per-tenant panels show every tenant; the replayed update shows under its reason.
    assert set(series_of("Bytes down (models)")) == {"a", "b", "c", "d"}
    assert set(series_of("Bytes up (updates and partials)", "B")) == {"eu", "us"}
    assert set(series_of("Updates accepted per round, by tenant")) == {"a", "b", "c", "d"}
    assert series_of("Rejected updates by reason").get("late", 0) > 0
    assert set(series_of("Participation per region")) == {"eu", "us"}
    assert {tuple(sorted(k.split(","))) for k in series_of("Strategy server state")} == {
        ("fedavgm", "momentum_norm")
    }
    assert list(series_of("Privacy spent (ε)").values())[0] > 0
    # The headline metric: central, the sites overall, and each tenant's own validation data.
    assert set(series_of("$metric")) == {"central", "site", "site,a", "site,b", "site,c", "site,d"}


def test_every_alert_rule_loads_and_evaluates_without_error(observed_job):
    names = {rule["alert"] for rule in observed_job.rules}
    loaded = wait_rules_evaluated(observed_job.prometheus, names)
    assert all(rule["type"] == "alerting" for rule in loaded.values())


def test_a_progressing_job_trips_neither_round_stalled_nor_participation_low(observed_job):
    prometheus = observed_job.prometheus
    wait_rules_evaluated(prometheus, {rule["alert"] for rule in observed_job.rules})
    # rounds keep closing within the 5 s stall window ...
    assert prometheus.query('increase(fedkube_rounds_completed_total{job="observed"}[5s]) > 0')
    # ... so neither alert is even pending
    assert alerts_named(prometheus, "FedkubeRoundStalled") == []
    assert alerts_named(prometheus, "FedkubeParticipationLow") == []


def test_a_forged_update_fires_updates_rejected_and_late_replays_do_not(observed_job):
    prometheus = observed_job.prometheus
    status, reply = send_update(observed_job.run, "c-0", round_no=1, token="forged")
    assert (status, reply["error"]) == (401, "unauthenticated"), reply

    firing = wait_for(
        lambda: alerts_named(prometheus, "FedkubeUpdatesRejected", "firing"),
        30,
        "FedkubeUpdatesRejected firing",
    )
    assert [(a["labels"]["job"], a["labels"]["region"], a["labels"]["reason"]) for a in firing] == [
        ("observed", "us", "unauthenticated")
    ]
    assert float(firing[0]["value"]) == 1
