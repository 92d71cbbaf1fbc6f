"""The central operator's allowlist: a job whose model or evaluation code it does not
allow is refused before any child exists, with the field named."""

from __future__ import annotations

from tests.cluster.jobs import apply, children, condition, get_json, job_document, status
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.support import wait_for


def test_a_job_with_a_disallowed_model_entrypoint_is_refused_and_gets_no_children(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
):
    document = job_document("evil")
    document["spec"]["model"]["entrypoint"] = "os:system"
    apply(control_plane, namespace, document)
    failed = wait_for(
        lambda: condition(control_plane, namespace, "evil", "Failed"), 60, "the Failed condition"
    )
    message = "spec.model.entrypoint 'os:system' is not allowed at this operator"
    assert failed["reason"] == "EntrypointNotAllowed" and message in failed["message"], failed
    assert status(control_plane, namespace, "evil")["phase"] == "Failed"
    events = wait_for(
        lambda: [
            e
            for e in get_json(control_plane, namespace, "events")["items"]
            if e.get("reason") == "EntrypointNotAllowed"
        ],
        30,
        "the EntrypointNotAllowed Event",
    )
    assert message in events[0]["message"]
    # A job that is allowed, in the same namespace at the same time, gets its children:
    # so the refused one's absence is not a slow operator.
    apply(control_plane, namespace, job_document("good"))
    wait_for(lambda: children(control_plane, namespace, "good"), 60, "the good job's children")
    assert children(control_plane, namespace, "evil") == []
    assert "os:system" in operator.log()
