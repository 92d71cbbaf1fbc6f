"""kopf handlers: validate, build, apply, patch status. Nothing else lives here.

The handlers are registered on a registry built per operator instance
(:func:`build_registry`), so the configuration is captured explicitly
instead of living in module globals. One pass (:func:`fedkube.operator.
reconcile.reconcile`) serves create, update, resume and the periodic status
timer; a per-job lock keeps two passes from minting credentials twice.

A little over 400 lines on purpose: every handler kopf registers for a job is
here, so that what the operator reacts to reads in one file; the decisions they
call are pure and live in their own modules.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from redis.exceptions import RedisError
from urllib3.exceptions import HTTPError as TransportError

from fedkube.errors import RefusalNotDelivered, SpecError
from fedkube.operator import naming
from fedkube.operator.builders import TOKEN_KEY, Target, combiner_url
from fedkube.operator.config import OperatorConfig
from fedkube.operator.crd import GROUP, PLURAL, VERSION
from fedkube.operator.kube import Kube
from fedkube.operator.metrics import OperatorMetrics
from fedkube.operator.reconcile import NotReady, Outcome, reconcile
from fedkube.operator.redisstate import job_redis_url, read_round_facts
from fedkube.operator.refusal import report_refusal
from fedkube.operator.status import (
    FINISHED,
    JobStatus,
    Observation,
    PodFacts,
    RoundFacts,
    next_status,
    parse_time,
    refused_status,
)
from fedkube.policy import check_central, refused_tenants
from fedkube.service.logs import fields
from fedkube.spec import FederatedJob, parse_job
from fedkube.state.roundstate import RoundStore

log = logging.getLogger("fedkube.operator")

FINALIZER = "fedkube.io/redis-keys"
RETRY_DELAY_S = 5.0
# Give up on Redis cleanup after this many tries so that a Redis that is gone
# for good cannot block deleting the job forever (the keys expire anyway).
CLEANUP_RETRIES = 12


@dataclass
class State:
    """What the operator keeps between handler calls (kopf's ``memo``)."""

    config: OperatorConfig
    kube: Kube
    metrics: OperatorMetrics
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # (job uid, tenant, message) refusals the central combiner has recorded
    delivered: set[tuple[str, str, str]] = field(default_factory=set)

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())


def validate(body: Mapping[str, Any]) -> FederatedJob:
    """The manifest as the typed model; an invalid one fails for good, naming the field."""
    try:
        return parse_job(
            {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": dict(body["metadata"]),
                "spec": dict(body.get("spec") or {}),
            }
        )
    except SpecError as exc:
        raise kopf.PermanentError(str(exc)) from None


def not_allowed(job: FederatedJob, config: OperatorConfig) -> str | None:
    """Why the central allowlist refuses the job (checked before any child exists), or None."""
    if not config.central:
        return None
    refusals = check_central(job, config.allow_entrypoints)
    if not refusals:
        return None
    return "; ".join(r.describe() for r in refusals)


async def _deliver_refusals(
    state: State, job: FederatedJob, body: Mapping[str, Any], outcome: Outcome
) -> None:
    """Site mode: tell the central side, through the tenant's combiner, who is refused.

    It needs the tenant's token (the Secret copied from the central
    cluster); until that exists, or while the combiner cannot be reached,
    the refusal is only local and the next pass tries again.
    """
    uid = body["metadata"]["uid"]
    namespace = body["metadata"]["namespace"]
    target = Target(job=job, namespace=namespace, uid=uid, config=state.config)
    regions = {t.name: t.region for t in job.spec.tenants}
    for tenant, message in refused_tenants(outcome.refusals).items():
        key = (uid, tenant, message)
        if key in state.delivered:
            continue
        secret = await asyncio.to_thread(
            state.kube.get, "Secret", namespace, naming.tenant_name(job.name, tenant)
        )
        data = (secret or {}).get("data") or {}
        if TOKEN_KEY not in data:
            continue
        token = base64.b64decode(data[TOKEN_KEY]).decode()
        url = combiner_url(target, regions[tenant])
        try:
            await asyncio.to_thread(report_refusal, url, tenant, token, message)
        except RefusalNotDelivered as exc:
            log.warning(
                "cannot tell the central side: %s", exc, extra=fields(job=job.name, tenant=tenant)
            )
            continue
        state.delivered.add(key)
        log.info(
            "told the central side: refused here: %s",
            message,
            extra=fields(job=job.name, tenant=tenant),
        )


async def run_pass(state: State, job: FederatedJob, body: kopf.Body, trigger: str) -> Outcome:
    """One reconcile pass in a worker thread, timed and counted."""
    uid = body["metadata"]["uid"]
    started = time.perf_counter()
    async with state.lock(uid):
        try:
            outcome = await asyncio.to_thread(reconcile, state.kube, job, body, state.config)
        except NotReady as exc:
            state.metrics.reconcile_errors.labels("temporary").inc()
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from None
        except ApiException as exc:
            state.metrics.reconcile_errors.labels("api").inc()
            raise kopf.TemporaryError(
                f"API server: {exc.status} {exc.reason}: {exc.body!r}", delay=RETRY_DELAY_S
            ) from None
        except TransportError as exc:
            # No answer at all (API server restarting, connection refused or
            # reset): as temporary as a 5xx. Left to kopf, this is an arbitrary
            # exception retried after its default 60 s, so a status timer that
            # failed during a short API outage kept the job's status stale for a
            # minute after the API was back (tests/chaos/test_operator_faults.py).
            state.metrics.reconcile_errors.labels("api").inc()
            raise kopf.TemporaryError(
                f"API server unreachable: {exc}", delay=RETRY_DELAY_S
            ) from None
    state.metrics.reconcile_seconds.labels(trigger).observe(time.perf_counter() - started)
    for kind, _ in outcome.applied:
        state.metrics.writes.labels("apply", kind).inc()
    for kind, _ in outcome.deleted:
        state.metrics.writes.labels("delete", kind).inc()
    for (kind, name), paths in outcome.drifted.items():
        state.metrics.drift_corrections.labels(kind).inc()
        where = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        message = f"{kind} {name} was changed outside the operator ({where}); applied it again"
        log.warning(message, extra=fields(job=job.name))
        kopf.warn(body, reason="ChildEdited", message=message)
    if outcome.refusals:
        await _deliver_refusals(state, job, body, outcome)
    if outcome.applied or outcome.deleted:
        log.info(
            "applied %d, deleted %d of %d children",
            len(outcome.applied),
            len(outcome.deleted),
            outcome.children,
            extra=fields(job=job.name),
        )
    return outcome


async def _round_facts(
    state: State, job: FederatedJob, namespace: str, before: JobStatus
) -> RoundFacts | None:
    """The round state; None while there is no Redis to read (not configured yet).

    Redis configured but not answering gives the last round seen, marked
    ``unreachable``: the status says so instead of going quiet.

    It also tells the global aggregator about ``spec.suspend`` (the one field
    the operator writes): a paused aggregator keeps its round open instead
    of failing it for want of the workers that were stopped on purpose.
    """
    try:
        url = await asyncio.to_thread(job_redis_url, state.kube, job, namespace, state.config)
    except NotReady:
        return None
    store = RoundStore.connect(url, job.name)
    try:
        facts = await read_round_facts(store)
        if facts.paused != job.spec.suspend:
            await store.set_paused(job.spec.suspend)
        return facts
    except (RedisError, OSError) as exc:
        log.warning("cannot read round state: %s", exc, extra=fields(job=job.name))
        return RoundFacts(
            current_round=before.round, closed_rounds=before.closed_rounds, unreachable=str(exc)
        )
    finally:
        await store.close()


def _events(body: kopf.Body, before: JobStatus, after: JobStatus) -> None:
    """Kubernetes Events for round milestones and phase changes."""
    closed_before = int(before.progress.split("/")[0] or 0) if before.progress else 0
    closed_after = int(after.progress.split("/")[0] or 0) if after.progress else 0
    if closed_after > closed_before:
        metric = f", {after.metric}" if after.metric else ""
        kopf.info(
            body,
            reason="RoundClosed",
            message=f"round {closed_after}/{after.rounds} closed: "
            f"{after.participation} clients reported{metric}",
        )
        for client, failure in (after.task_failures or {}).items():
            kopf.warn(
                body,
                reason="TaskFailed",
                message=f"round {closed_after}: client {client}: {failure}",
            )
    if after.phase != before.phase:
        emit = kopf.warn if after.phase.value == "Failed" else kopf.info
        emit(body, reason=after.phase.value, message=after.message)
    unschedulable = next((c for c in after.conditions if c.type.value == "Unschedulable"), None)
    was = next((c for c in before.conditions if c.type.value == "Unschedulable"), None)
    if (
        unschedulable is not None
        and unschedulable.status == "True"
        and (was is None or was.message != unschedulable.message)
    ):
        kopf.warn(body, reason="Unschedulable", message=unschedulable.message)
    refused = next((c for c in after.conditions if c.type.value == "Refused"), None)
    had = next((c for c in before.conditions if c.type.value == "Refused"), None)
    if refused is not None and (had is None or had.message != refused.message):
        kopf.warn(body, reason="PolicyRefused", message=refused.message)


def _refuse(body: kopf.Body, patch: kopf.Patch, message: str) -> None:
    """The status of a job the central allowlist refuses: Failed, naming the field."""
    before = JobStatus.model_validate(dict(body.get("status") or {}))
    after = refused_status(before, message, datetime.now(timezone.utc))
    if after != before:
        patch.status.update(after.wire())
        kopf.warn(body, reason="EntrypointNotAllowed", message=message)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """Every handler of the operator, on a registry of its own."""
    registry = kopf.OperatorRegistry()
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The status schema is structural: kopf's own bookkeeping goes into
        # annotations, never into .status where the API server would prune it.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedkube.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="fedkube.io", key="last-handled-configuration"
        )
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.batching.error_delays = [1, 2, 5, 10, 30]
        # A deletion waits for the status timer to exit. When the timer is
        # mid-pass (or is the one deleting, for ttlSecondsAfterFinished), kopf
        # re-checks after cancellation_polling: 60 s by default, which held
        # finished jobs in Terminating for a minute.
        settings.background.instant_exit_timeout = 0.1
        settings.background.cancellation_polling = 1

    @kopf.on.resume(**resource)
    @kopf.on.create(**resource)
    @kopf.on.update(**resource)
    async def converge(
        body: kopf.Body, memo: State, reason: str, patch: kopf.Patch, **_: Any
    ) -> None:
        job = validate(body)
        refused = not_allowed(job, memo.config)
        if refused is not None:
            _refuse(body, patch, refused)
            raise kopf.PermanentError(refused)
        await run_pass(memo, job, body, str(reason))
        patch.status["observedGeneration"] = body["metadata"].get("generation", 0)

    @kopf.timer(**resource, interval=config.status_interval_s, initial_delay=0.5)
    async def watch_rounds(body: kopf.Body, memo: State, patch: kopf.Patch, **_: Any) -> None:
        try:
            job = validate(body)
        except kopf.PermanentError:
            return  # the change handler already reported it
        refused = not_allowed(job, memo.config)
        if refused is not None:
            _refuse(body, patch, refused)
            return
        namespace = body["metadata"]["namespace"]
        outcome = await run_pass(memo, job, body, "timer")
        before = JobStatus.model_validate(dict(body.get("status") or {}))
        facts = await _round_facts(memo, job, namespace, before)
        if facts is None:
            facts = RoundFacts(current_round=before.round, closed_rounds=before.closed_rounds)
        seen = Observation(
            generation=int(body["metadata"].get("generation", 0)),
            rounds=job.spec.rounds,
            clients=len(job.clients()),
            suspend=job.spec.suspend,
            active_deadline_seconds=job.spec.active_deadline_seconds,
            backoff_limit=job.spec.backoff_limit,
            now=datetime.now(timezone.utc),
            rounds_facts=facts,
            pods=PodFacts(
                unschedulable=outcome.unschedulable,
                new_failures=outcome.new_failures,
                restarts=outcome.restarts,
            ),
            refused=refused_tenants(outcome.refusals),
            evaluation=job.spec.evaluation,
        )
        after = next_status(before, seen)
        memo.metrics.job_phase(body["metadata"]["uid"], after.phase.value)
        if after != before:
            patch.status.update(after.wire())
            _events(body, before, after)
        if after.phase in FINISHED:
            await _expire_finished(memo, job, body, after)

    @kopf.on.delete(**resource, retries=CLEANUP_RETRIES)
    async def remove_round_state(body: kopf.Body, memo: State, retry: int, **_: Any) -> None:
        """Redis keys are ours to delete, once the pods that write them are gone."""
        memo.metrics.job_phase(body["metadata"]["uid"], None)
        memo.locks.pop(body["metadata"]["uid"], None)
        try:
            job = validate(body)
        except kopf.PermanentError:
            return  # never valid, never ran
        namespace = body["metadata"]["namespace"]
        try:
            url = await asyncio.to_thread(job_redis_url, memo.kube, job, namespace, memo.config)
        except NotReady as exc:
            log.warning("no Redis to clean up: %s", exc, extra=fields(job=job.name))
            return
        try:
            running = await asyncio.to_thread(
                _stop_round_state_writers, memo.kube, namespace, job.name
            )
        except (ApiException, TransportError) as exc:
            raise kopf.TemporaryError(f"API server: {exc}", delay=RETRY_DELAY_S) from None
        if running and retry + 1 < CLEANUP_RETRIES:
            raise kopf.TemporaryError(
                f"waiting for {running} pod(s) of the job to stop before deleting its Redis keys",
                delay=RETRY_DELAY_S,
            )
        store = RoundStore.connect(url, job.name)
        try:
            removed = await store.delete_all()
        except (RedisError, OSError) as exc:
            if retry + 1 >= CLEANUP_RETRIES:
                log.error(
                    "giving up on deleting Redis keys (they expire after keyTtlSeconds): %s",
                    exc,
                    extra=fields(job=job.name),
                )
                return
            raise kopf.TemporaryError(f"Redis: {exc}", delay=RETRY_DELAY_S) from None
        finally:
            await store.close()
        log.info("deleted %d Redis keys", removed, extra=fields(job=job.name))

    return registry


def _stop_round_state_writers(kube: Kube, namespace: str, job: str) -> int:
    """Delete the job's Deployments and pods now; return how many of its pods are left.

    Kubernetes deletes a job's children only once its finalizers are done, and until then
    its combiners and aggregator keep renewing their leases in Redis: keys deleted while
    they run would be written back (seen on a real node: two ``lease:combiner-*`` keys
    outlived ``kubectl delete``). So the finalizer stops the writers first.
    """
    selector = f"{naming.LABEL_JOB}={job}"
    for kind in ("Deployment", "Pod"):
        for item in kube.list(kind, namespace, selector):
            meta = item["metadata"]
            if not meta.get("deletionTimestamp"):
                kube.delete(kind, namespace, meta["name"], meta["uid"])
    return len(kube.list("Pod", namespace, selector))


async def _expire_finished(
    state: State, job: FederatedJob, body: Mapping[str, Any], status: JobStatus
) -> None:
    """``spec.ttlSecondsAfterFinished``: delete the job once it is old enough."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None or status.completion_time is None:
        return
    age = (datetime.now(timezone.utc) - parse_time(status.completion_time)).total_seconds()
    if age < ttl:
        return
    log.info("deleting the job %ss after it finished", ttl, extra=fields(job=job.name))
    await asyncio.to_thread(
        state.kube.delete,
        "FederatedJob",
        body["metadata"]["namespace"],
        job.name,
        body["metadata"]["uid"],
    )
