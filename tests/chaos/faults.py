"""Fault injection for a running ``fedkube run`` job: the chaos suite's one helper.

``ChaosRun`` starts a job with the runner's own supervision following it in
a thread (as ``fedkube run`` does), and gives a test what it needs to hurt
it at a chosen moment: the round state in Redis to wait on (a round opened,
k updates reported, a region's partial delivered), and SIGKILL / SIGSTOP /
SIGCONT for a named component (``global``, ``combiner-<region>``,
``worker-<client>``, ``redis``). Faults that must land at an exact step
inside a process use ``fedkube.service.faults`` (an environment variable that only
tests set), passed through ``faults=``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from fedkube.local.launcher import ProcessLauncher
from fedkube.local.runner import LocalRun, RunOptions
from fedkube.service.faults import FAULTS_DIR_ENV, FAULTS_ENV
from fedkube.state import checkpoint
from fedkube.state.roundstate import job_prefix
from tests.support import wait_for


@dataclass
class Finished:
    status: str
    message: str
    history: list[dict[str, Any]]
    restarts: dict[str, int]
    events: list[str]
    out: Path
    job: str

    def final_weights(self) -> dict[str, np.ndarray]:
        saved = checkpoint.load_latest(self.out / "checkpoints", self.job)
        assert saved is not None, "no checkpoint"
        return saved.weights


@dataclass
class ChaosRun:
    run: LocalRun
    events: list[str] = field(default_factory=list)
    _result: tuple[str, str] | None = None
    _history: list[dict[str, Any]] = field(default_factory=list)
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(
            self.run.redis_url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
        )
        self.prefix = job_prefix(self.run.job.name)

    # -- what the test waits on ---------------------------------------------
    def _read(self, read: Callable[[], Any], default: Any) -> Any:
        """Redis may be the component under test: unreachable reads as ``default``."""
        try:
            return read()
        except redis.RedisError:
            return default

    def current_round(self) -> int:
        return int(self._read(lambda: self.redis.hget(self.prefix + "job", "round"), 0) or 0)

    def state(self, number: int) -> str | None:
        return self._read(lambda: self.redis.hget(f"{self.prefix}round:{number}", "state"), None)

    def reported(self, number: int) -> set[str]:
        return set(
            self._read(lambda: self.redis.hkeys(f"{self.prefix}round:{number}:reported"), [])
        )

    def partials(self, number: int) -> set[str]:
        return set(
            self._read(lambda: self.redis.hkeys(f"{self.prefix}round:{number}:partials"), [])
        )

    def closed(self) -> int:
        return int(self._read(lambda: self.redis.llen(self.prefix + "history"), 0))

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
        def ready() -> Any:
            if self._error is not None:
                raise AssertionError(f"the run failed while waiting for {what}") from self._error
            if self._result is not None:
                raise AssertionError(f"the job ended ({self._result}) before {what}")
            return condition()

        return wait_for(ready, timeout=timeout, what=what)

    # -- faults -------------------------------------------------------------
    def pid(self, component: str) -> int:
        if component == "redis":
            server = self.run.redis_server
            assert server is not None and server.process is not None
            return int(server.process.pid)
        return int((self.run.out / "pids" / component).read_text())

    def kill(self, component: str) -> int:
        """SIGKILL: no clean-up, as a node failure or the OOM killer does it."""
        pid = self.pid(component)
        os.kill(pid, signal.SIGKILL)
        self.wait(lambda: not _alive(pid), f"{component} ({pid}) to die", timeout=10)
        return pid

    def freeze(self, component: str) -> None:
        """SIGSTOP: alive but silent, as a partitioned or hung process."""
        os.kill(self.pid(component), signal.SIGSTOP)

    def thaw(self, component: str) -> None:
        os.kill(self.pid(component), signal.SIGCONT)

    def restarted(self, component: str, old_pid: int) -> bool:
        path = self.run.out / "pids" / component
        return component == "redis" or (path.exists() and int(path.read_text()) != old_pid)

    # -- the run itself ------------------------------------------------------
    def _follow(self) -> None:
        try:
            result = self.run.follow(lambda _record: None, self.events.append)
            # Read here: what the runner restarted belongs to this thread, and
            # dies with it (die_with_parent), a restarted redis-server included.
            self._history = self.run.history()
            self._result = result
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, not hidden
            self._error = exc

    def finish(self, timeout: float = 300) -> Finished:
        wait_for(
            lambda: self._result is not None or self._error is not None,
            timeout=timeout,
            what="the job to end",
        )
        if self._error is not None:
            raise self._error
        assert self._result is not None
        status, message = self._result
        return Finished(
            status,
            message,
            self._history,
            dict(self.run.restarts),
            self.events,
            self.run.out,
            self.run.job.name,
        )


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie awaiting its parent's wait counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def chaos_run(
    job_path: Path, out: Path, faults: str = "", env: dict[str, str] | None = None
) -> Iterator[ChaosRun]:
    """Start ``job_path`` under the runner's supervision; stop everything on exit."""
    extra = dict(env or {})
    if faults:
        (out / "fired").mkdir(parents=True, exist_ok=True)
        extra |= {FAULTS_ENV: faults, FAULTS_DIR_ENV: str(out / "fired")}
    run = LocalRun(
        RunOptions(job_path=job_path, out_dir=out / "run", quiet=True, extra_env=extra),
        ProcessLauncher(),
    )
    thread: threading.Thread | None = None
    try:
        run.start()
        chaos = ChaosRun(run)
        thread = threading.Thread(target=chaos._follow, name="follow", daemon=True)
        thread.start()
        yield chaos
    finally:
        run.stopping = True  # follow() returns instead of restarting what stop() ends
        if thread is not None:
            thread.join(timeout=30)
        run.stop(grace_s=0)
