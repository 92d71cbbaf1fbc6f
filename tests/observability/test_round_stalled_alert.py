"""FedkubeRoundStalled, rendered from the chart, fires on a real stalled job and resolves.

A job runs as ``fedkube run`` runs it (``LocalRun``); one client registers and
then never reports, so its round can only close at a deadline far away. A
real Prometheus scrapes the services and evaluates the chart's rules with a
5 s stall window.
"""

from __future__ import annotations

import signal

import pytest

from tests.observability.support import (
    alerts_named,
    kill_run,
    register,
    start_run,
    wait_service_targets,
    write_rule_file,
)
from tests.prometheus import start_prometheus
from tests.support import wait_for

pytestmark = pytest.mark.integration


def test_a_round_left_open_by_a_vanished_client_fires_round_stalled_until_the_job_is_gone(
    tmp_path,
):
    # Every selected client must report (minFraction 1) and the deadline is far away.
    participation = {"minFraction": 1.0, "roundTimeoutSeconds": 600}
    run = start_run(tmp_path, "stalled", rounds=3, participation=participation)
    try:
        # Client d-0's worker dies before it ever polls its combiner ...
        run.handles["worker-d-0"].process.send_signal(signal.SIGKILL)
        targets = wait_service_targets(run, workers=["a-0", "b-0", "c-0"])
        write_rule_file(
            tmp_path / "alerts.yml", {"alerts.roundStalledAfter": "5s", "alerts.for": "10s"}
        )
        with start_prometheus(
            tmp_path / "prometheus", {"fedkube": targets}, rule_files=[tmp_path / "alerts.yml"]
        ) as prometheus:
            prometheus.wait_targets_up()
            # ... so round 1 opens only once d-0 is registered (by its one poll, made
            # here), and then waits for an update that never comes.
            register(run, "d-0")
            wait_for(
                lambda: prometheus.query('fedkube_round_current{job="stalled",tier="global"} == 1'),
                180,
                "round 1 open",
            )
            firing = wait_for(
                lambda: alerts_named(prometheus, "FedkubeRoundStalled", "firing"),
                60,
                "FedkubeRoundStalled firing",
            )
            assert [a["labels"]["job"] for a in firing] == ["stalled"]
            assert float(firing[0]["value"]) == 1  # the open round
            assert "round 1 open for more than 5s" in firing[0]["annotations"]["summary"]
            # the other three clients did report: it is this round, not the whole job
            assert prometheus.query(
                'sum(fedkube_updates_accepted_total{job="stalled",tier="combiner"}) == 3'
            )

            # Once the job's services are gone their series go stale and the alert
            # resolves: a job that is over does not fire forever.
            kill_run(run)
            wait_for(
                lambda: not alerts_named(prometheus, "FedkubeRoundStalled"),
                30,
                "FedkubeRoundStalled resolved",
            )
    finally:
        kill_run(run)
