"""Whole jobs on one machine: real redis-server, one OS process per service.

These tests drive ``fedkube run`` (the CLI) or the same ``LocalRun`` it uses,
and kill services on purpose to check that rounds still close, dropouts are
counted and a restarted aggregator resumes without losing a round.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedkube.local.launcher import ProcessLauncher
from fedkube.local.runner import LocalRun, RunOptions
from fedkube.wire import signing
from tests.support import fedkube_cli, wait_for

pytestmark = pytest.mark.integration


def scrape(port_file: Path) -> str:
    port = int(port_file.read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_fedkube_run_trains_over_several_rounds_and_writes_its_outputs(job_file, tmp_path):
    manifest = job_file(rounds=3)
    out = tmp_path / "run"
    done = fedkube_cli("run", str(manifest), "--out", str(out), "--history-format", "jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"round\s+3/3\s+clients 4/4", done.stdout)
    assert "succeeded" in done.stdout
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [
        json.loads(line)
        for line in (out / "logs" / "global.log").read_text().splitlines()
        if line.startswith("{")
    ]
    closed = [e for e in log if e["msg"].startswith("round closed")]
    assert [e["round"] for e in closed] == [1, 2, 3] and all(e["job"] == "small" for e in closed)
    # the embedded Redis is stopped and no service is left running
    assert not subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout


def test_an_invalid_manifest_fails_fast_and_names_the_field(job_file, tmp_path):
    manifest = job_file(tenants=[{"name": "a", "region": "mars"}])
    done = fedkube_cli("run", str(manifest), timeout=60)
    assert done.returncode == 2
    assert "spec.tenants[0].region" in done.stderr and "mars" in done.stderr


def test_every_service_serves_fedkube_metrics_with_labels(job_file, tmp_path):
    run = LocalRun(
        RunOptions(job_path=job_file(rounds=2), out_dir=tmp_path / "run"), ProcessLauncher()
    )
    try:
        run.start()
        wait_for(lambda: run.history(), timeout=120, what="round 1 to close")
        ports = run.out / "ports"
        wait_for(lambda: (ports / "worker-a-0").exists(), what="worker metrics port")
        global_metrics = scrape(ports / "global")
        eu = scrape(ports / "eu")
        worker = scrape(ports / "worker-a-0")
    finally:
        run.follow(lambda _record: None)
        run.stop()
    for series in [
        "fedkube_round_current",
        "fedkube_round_duration_seconds",
        "fedkube_participation_ratio",
        "fedkube_clients_selected",
        "fedkube_clients_reported",
        "fedkube_clients_dropped_total",
        "fedkube_model_accuracy",
        "fedkube_model_loss",
        "fedkube_aggregation_seconds",
        "fedkube_bytes_up_total",
        "fedkube_bytes_down_total",
    ]:
        assert re.search(
            rf'^{series}(_count|_bucket)?\{{[^}}]*job="small"', global_metrics, re.M
        ), series
    assert re.search(
        r'fedkube_updates_accepted_total\{job="small",region="eu",'
        r'tenant="a",tier="combiner"\} [1-9]',
        eu,
    )
    assert re.search(
        r'fedkube_bytes_up_total\{job="small",region="eu",tenant="b",'
        r'tier="combiner"\} [1-9]',
        eu,
    )
    assert re.search(
        r'fedkube_bytes_down_total\{job="small",region="eu",tenant="a",'
        r'tier="combiner"\} [1-9]',
        eu,
    )
    assert re.search(r'fedkube_round_current\{job="small",region="eu",tier="combiner"\}', eu)
    assert re.search(
        r'fedkube_worker_rounds_total\{job="small",region="eu",tenant="a"\} [1-9]', worker
    )
    assert re.search(
        r'fedkube_worker_train_seconds_count\{job="small",region="eu",tenant="a"\}', worker
    )


def test_a_worker_killed_mid_run_is_restarted_and_rejoins_and_the_round_it_missed_closes_on_quorum(
    job_file, tmp_path
):
    # prepare: rounds close on 2 of 4 at a short deadline
    manifest = job_file(rounds=6, participation={"minFraction": 0.5, "roundTimeoutSeconds": 3})
    run = LocalRun(RunOptions(job_path=manifest, out_dir=tmp_path / "run"), ProcessLauncher())
    try:
        run.start()
        wait_for(lambda: run.history(), timeout=120, what="round 1 to close")
        # execute: kill one worker; the runner's supervision starts it again
        victim = run.handles["worker-d-0"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        status, message = run.follow(lambda _record: None)
        records = run.history()
    finally:
        run.stop()
    # assert: the job went on without it, then with it again
    assert status == "succeeded", message
    assert run.restarts == {"worker-d-0": 1}
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sum(r["dropped"] for r in records) >= 1
    assert records[-1]["reported"] == 4 and records[-1]["regions"]["us"]["reported"] == 2


def test_a_killed_aggregator_is_restarted_and_resumes_the_same_round_losing_none(
    job_file, tmp_path
):
    # prepare
    manifest = job_file(rounds=5, participation={"minFraction": 0.5, "roundTimeoutSeconds": 20})
    run = LocalRun(RunOptions(job_path=manifest, out_dir=tmp_path / "run"), ProcessLauncher())
    try:
        run.start()
        wait_for(lambda: len(run.history()) >= 2, timeout=120, what="two closed rounds")
        port = (run.out / "ports" / "global").read_text()
        # execute: SIGKILL the global aggregator; the runner restarts it with --resume
        run.handles["global"].process.send_signal(signal.SIGKILL)
        run.handles["global"].process.wait()
        closed_before = len(run.history())
        status, message = run.follow(lambda _record: None)
        records = run.history()
    finally:
        run.stop()
    # assert
    assert status == "succeeded", message
    assert run.restarts == {"global": 1}
    assert (run.out / "ports" / "global").read_text() == port  # the combiners' URL holds
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    log = (run.out / "logs" / "global.log").read_text()
    resumed = re.search(r"resuming after round (\d+)", log)
    assert resumed and int(resumed.group(1)) == closed_before
    assert all(r["reported"] >= 2 for r in records)


def test_fedkube_run_resume_continues_a_killed_run(job_file, tmp_path):
    manifest = job_file(rounds=5)
    out = tmp_path / "run"
    args = ["run", str(manifest), "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "fedkube.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = out / "checkpoints" / "latest.json"
    wait_for(
        lambda: latest.exists() and json.loads(latest.read_text())["round"] >= 2,
        timeout=180,
        what="two checkpoints",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The services die with the runner: nothing of the first run keeps going.
    wait_for(
        lambda: (
            not subprocess.run(
                ["pgrep", "-f", f"--checkpoint-dir {out}"], capture_output=True
            ).stdout
        ),
        timeout=30,
        what="the killed run's services to exit",
    )
    killed_at = json.loads(latest.read_text())["round"]
    keys_before = json.loads((out / "secrets" / "signing-keys.json").read_text())
    second = fedkube_cli(*args, "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert killed_at < 5
    assert os.path.exists(out / "plot.png")
    # the resumed workers signed with the same keys: private ones readable by the user only,
    # the combiners' file holding only their public halves
    private = out / "secrets" / "signing-keys.json"
    assert json.loads(private.read_text()) == keys_before and set(keys_before) == set("abcd")
    assert private.stat().st_mode & 0o777 == 0o600
    public = json.loads((out / "secrets" / "tenant-keys.json").read_text())
    assert public == {t: signing.public_key_of(k, t) for t, k in keys_before.items()}


def test_a_worker_without_a_valid_signing_key_stops_naming_the_variable_and_tenant(job_file):
    # prepare
    manifest = str(job_file())
    args = ["worker", "--job", manifest, "--client", "b-0", "--combiner-url", "http://127.0.0.1:9"]
    env = {**os.environ, "FEDKUBE_TOKEN": "t"}
    env.pop("FEDKUBE_SIGNING_KEY", None)
    # execute
    missing = fedkube_cli(*args, timeout=120, env=env)
    malformed = fedkube_cli(*args, timeout=120, env={**env, "FEDKUBE_SIGNING_KEY": "secret!"})
    # assert: exit 2, the variable and the tenant named, the bad value never echoed
    assert missing.returncode == 2, missing.stderr
    assert "FEDKUBE_SIGNING_KEY (tenant 'b'): no private key" in missing.stderr
    assert malformed.returncode == 2, malformed.stderr
    assert "FEDKUBE_SIGNING_KEY (tenant 'b'): the private key is not base64" in malformed.stderr
    assert "secret!" not in malformed.stderr


def combiner_argv(job: Path, checks: Path, public_keys: dict[str, str]) -> list[str]:
    """``fedkube combiner`` for region eu (tenants a and b) with these public keys."""
    (checks / "digests.json").write_text(json.dumps({"a": "0" * 64, "b": "1" * 64}))
    (checks / "keys.json").write_text(json.dumps(public_keys))
    return [
        "combiner",
        "--job",
        str(job),
        "--region",
        "eu",
        "--redis-url",
        "redis://127.0.0.1:9/0",
        "--global-url",
        "http://127.0.0.1:9",
        "--tenant-tokens",
        str(checks / "digests.json"),
        "--tenant-keys",
        str(checks / "keys.json"),
    ]


def test_a_combiner_missing_a_tenants_public_key_stops_naming_the_tenant(job_file, tmp_path):
    # prepare: region eu serves tenants a and b; the keys file has a's only
    args = combiner_argv(job_file(), tmp_path, {"a": signing.generate_key()[1]})
    region_key = signing.generate_key()[0]
    env = {**os.environ, "FEDKUBE_AGGREGATOR_TOKEN": "t", "FEDKUBE_SIGNING_KEY": region_key}
    # execute
    done = fedkube_cli(*args, timeout=60, env=env)
    # assert
    assert done.returncode == 2, done.stderr
    assert "tenant 'b': no public key (--tenant-keys) to check its updates in region eu" in (
        done.stderr
    )


def test_a_combiner_without_its_regions_signing_key_stops_naming_the_variable(job_file, tmp_path):
    # prepare: the tenants' checks are fine; the region's own key is not set
    keys = {t: signing.generate_key()[1] for t in ("a", "b")}
    args = combiner_argv(job_file(), tmp_path, keys)
    env = {k: v for k, v in os.environ.items() if k != "FEDKUBE_SIGNING_KEY"}
    env["FEDKUBE_AGGREGATOR_TOKEN"] = "t"
    # execute
    done = fedkube_cli(*args, timeout=60, env=env)
    # assert: exit 2, naming the variable, before anything is served
    assert done.returncode == 2, done.stderr
    assert "$FEDKUBE_SIGNING_KEY: no private key" in done.stderr
