"""A real Prometheus server on 127.0.0.1 for tests and scripts.

The dashboards and alert rules are PromQL. Whether a query returns data, or a
rule parses, evaluates and fires, depends on Prometheus itself: its scraping,
staleness handling, ``rate`` extrapolation and rule engine. So the tests run
the real server (the Debian package, ``scripts/install-prometheus.sh``) as a
child process pointed at the fedkube services' ``/metrics``, rather than
checking PromQL strings against our own guess of its semantics.

From Python::

    with start_prometheus(tmp_path / "prom", {"fedkube": ["127.0.0.1:8000"]}) as prom:
        prom.wait_targets_up()
        prom.query('fedkube_round_current{job="small"}')

Every scrape config sets ``honor_labels: true``: fedkube's series carry their
own ``job`` label (the FederatedJob's name), which must win over the scrape
job's name, as it must in a ServiceMonitor or PodMonitor (``honorLabels``).

The child is started with ``PR_SET_PDEATHSIG`` (SIGKILLed when its parent
dies), so start it from a thread that outlives it (the main thread).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedkube.service.process import die_with_parent
from fedkube.state.redis_server import free_port
from tests.support import wait_for

INSTALL_HINT = "run scripts/install-prometheus.sh (Debian package prometheus)"
STOP_GRACE_S = 10.0


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or its HTTP API answered with an error."""


@dataclass
class PrometheusServer:
    """A running Prometheus; ``stop()`` it (or use it as a context manager)."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    targets: dict[str, list[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the HTTP API ------------------------------------------------------------------------

    def api(self, path: str, **params: str | float) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; an error reply raises PrometheusError.

        Prometheus answers a bad query with 400 and a JSON body naming the
        problem: that message is what a failing test needs to show.
        """
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise PrometheusError(f"GET {path} {params}: HTTP {error.code}: {detail}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (at ``at``, a Unix time, or now): the vector's samples.

        A scalar or string result comes back as one sample without labels, so
        callers can treat every result as a list of series.
        """
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query: one ``{"metric", "values": [[t, "v"], ...]}`` per series."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), as ``/api/v1/alerts`` lists them."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule of every group, each with its ``health`` and ``lastError``."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets

    def wait_targets_up(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped successfully."""
        expected = sum(len(addresses) for addresses in self.targets.values())

        def all_up() -> list[dict[str, Any]] | None:
            self._check_alive()
            active = self.active_targets()
            if len(active) == expected and all(t["health"] == "up" for t in active):
                return active
            return None

        try:
            up: list[dict[str, Any]] = wait_for(all_up, timeout, "every target up")
        except AssertionError:
            states = [
                f"{t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}".strip()
                for t in self.active_targets()
            ]
            raise AssertionError(
                f"not every target was up after {timeout}s:\n  " + "\n  ".join(states)
            ) from None
        return up

    # -- life ------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The end of Prometheus's log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if not self.alive():
            raise PrometheusError(
                f"prometheus exited with code {self.process.returncode}:\n{self.tail()}"
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL once the grace period has passed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def prometheus_binary() -> str:
    """The ``prometheus`` on PATH; its absence is a setup problem, never a skip."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError(f"prometheus is not installed: {INSTALL_HINT}")
    return binary


def write_config(
    path: Path,
    targets: Mapping[str, Sequence[str]],
    rule_files: Iterable[Path],
    scrape_interval: str,
    evaluation_interval: str,
    scrape_configs: Sequence[Mapping[str, Any]] = (),
) -> None:
    """prometheus.yml: one scrape job per entry of ``targets``, honouring the series' labels,
    then ``scrape_configs`` as they are (service discovery, for example)."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": name,
                "honor_labels": True,
                "static_configs": [{"targets": list(addresses)}],
            }
            for name, addresses in targets.items()
        ]
        + [dict(c) for c in scrape_configs],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_prometheus(
    workdir: Path,
    targets: Mapping[str, Sequence[str]],
    rule_files: Iterable[Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    timeout: float = 60,
    scrape_configs: Sequence[Mapping[str, Any]] = (),
) -> PrometheusServer:
    """Start Prometheus scraping ``targets`` (scrape job -> ``host:port`` list) and wait till ready.

    ``rule_files`` are loaded at start; a file Prometheus cannot parse makes
    it exit, and the error names the rule, so that too is a test failure.
    """
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    write_config(config, targets, rule_files, scrape_interval, evaluation_interval, scrape_configs)
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    server = PrometheusServer(
        workdir=workdir,
        port=port,
        process=process,
        log=log,
        targets={name: list(addresses) for name, addresses in targets.items()},
    )

    def ready() -> bool:
        server._check_alive()  # noqa: SLF001 - its own module
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:  # refused while starting, 503 while replaying its WAL
            return False

    try:
        wait_for(ready, timeout, f"prometheus ready on port {port}")
    except (AssertionError, PrometheusError):
        server.stop()
        raise
    return server


def sample_values(result: Iterable[Mapping[str, Any]]) -> list[float]:
    """The float value of every sample of an instant query's result."""
    return [float(series["value"][1]) for series in result]
