"""Two sites, one job: the central site's operator and a data-owning site's operator.

Each site is a namespace standing for its own cluster, with its own operator
and its own pod runner. The central site runs the aggregator tier and the
tenants without a ``site``; the site ``hospital-c`` runs only tenant c's
worker, which trains on its side and reports to the central combiner through
``--central-address``. The site has no Redis and its operator never sees the
round state, as across a real site boundary; only the tenant's Secret (its
token and signing key) is copied over, as the README tells a site admin to.

The site's operator runs with a site policy (``--policy``): one that accepts
the job and binds tenant c's data to a file only the site knows, and one
that refuses the job's data entrypoint, where the site runs nothing, says
why (condition, Event) and tells the central side through the combiner, whose
job then goes on without tenant c or fails on quorum naming it.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import numpy as np
import yaml
from sklearn.datasets import load_digits

from tests.cluster.jobs import apply, condition, get_json, job_document, status
from tests.cluster.test_end_to_end import finished
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.podrunner import PodRunner
from tests.support import wait_for

SITE = "hospital-c"


def copy_tenant_secret(cp: ControlPlane, central: str, site: str, name: str) -> None:
    """What a site admin does with the tenant's credentials from the central site: copy
    its token and its signing key (the README's site mode)."""
    secret = wait_for(
        lambda: next(
            (s for s in get_json(cp, central, "secrets")["items"] if s["metadata"]["name"] == name),
            None,
        ),
        30,
        f"Secret {name} at the central site",
    )
    literals = [
        f"--from-literal={key}={base64.b64decode(secret['data'][key]).decode()}"
        for key in ("token", "signing-key")
    ]
    cp.kubectl("create", "secret", "generic", "-n", site, name, *literals)


def site_job(min_fraction: float) -> dict[str, Any]:
    document = job_document()
    document["spec"]["rounds"] = 2
    document["spec"]["participation"] = {"minFraction": min_fraction, "roundTimeoutSeconds": 30}
    document["spec"]["tenants"][2]["site"] = SITE  # tenant c, region us
    return document


@contextlib.contextmanager
def two_sites(
    control_plane: ControlPlane,
    central: str,
    site_namespace: str,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
    policy: dict[str, Any],
) -> Iterator[tuple[PodRunner, PodRunner, OperatorProcess]]:
    """Both sites' pod runners and the site's operator, running with ``policy``."""
    (tmp_path / "site").mkdir()
    policy_file = tmp_path / "site-policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy))
    with (
        PodRunner(api_client, central, tmp_path / "central-pods") as central_pods,
        PodRunner(
            api_client, site_namespace, tmp_path / "site-pods", peers=[central_pods]
        ) as site_pods,
    ):
        # The site operator reaches the central combiners by their Service names.
        hosts = {
            f"mnist-combiner-{region}.{central}.svc": central_pods.reserve_service_ip(
                f"mnist-combiner-{region}"
            )
            for region in ("eu", "us")
        }
        site_operator = OperatorProcess(
            control_plane,
            site_namespace,
            None,  # no Redis at the site
            tmp_path / "site",
            "--site",
            SITE,
            "--central-address",
            f"http://{{job}}-combiner-{{region}}.{central}.svc:8080",
            "--policy",
            str(policy_file),
            hosts=hosts,
        ).start()
        try:
            site_operator.wait_serving()
            yield central_pods, site_pods, site_operator
        finally:
            site_operator.stop()
            print(f"--- site operator log ---\n{site_operator.log()[-4000:]}")


def test_a_tenant_at_its_own_site_trains_with_the_central_site_to_success(
    control_plane: ControlPlane,
    namespace: str,
    site_namespace: str,
    operator: OperatorProcess,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    central = namespace
    document = site_job(min_fraction=1.0)
    # The site accepts the example model and binds tenant c's data to a file
    # that only the site knows: the central manifest names neither.
    data_file = tmp_path / "hospital-c-data" / "c.npz"
    data_file.parent.mkdir()
    digits = load_digits()
    np.savez(data_file, x=(digits.data[:400] / 16.0).astype(np.float32), y=digits.target[:400])
    policy = {
        "entrypoints": ["fedkube.examples.digits:"],
        "dataBindings": {
            "c": {"entrypoint": "fedkube.datasets:load_npz", "kwargs": {"path": str(data_file)}}
        },
    }
    with two_sites(control_plane, central, site_namespace, api_client, tmp_path, policy) as (
        central_pods,
        site_pods,
        _,
    ):
        apply(control_plane, central, document)
        apply(control_plane, site_namespace, document)
        copy_tenant_secret(control_plane, central, site_namespace, "mnist-tenant-c")
        final = wait_for(lambda: finished(control_plane, central, "mnist"), 300, "the job")
        wait_for(
            lambda: site_pods.exit_codes("mnist-c-0") == [0], 60, "the site's worker to exit 0"
        )
        site_log = site_pods.log("mnist-c-0")
        central_pod_names = {
            p["metadata"]["name"] for p in get_json(control_plane, central, "pods")["items"]
        }
        site_pod_names = {
            p["metadata"]["name"] for p in get_json(control_plane, site_namespace, "pods")["items"]
        }
        site_pod = get_json(control_plane, site_namespace, "pod", "mnist-c-0")
        central_objects = json.dumps(
            get_json(control_plane, central, "configmaps,secrets,pods,federatedjobs")
        )
        assert not central_pods.errors and not site_pods.errors, (
            central_pods.errors,
            site_pods.errors,
        )
    assert final["phase"] == "Succeeded", (final, operator.log()[-3000:])
    assert final["progress"] == "2/2"
    assert final["participation"] == "3/3"  # tenant c reported from its own site
    # Tenant c's worker ran at its site only; the aggregator tier at the central site only.
    assert site_pod_names == {"mnist-c-0"}
    assert "mnist-c-0" not in central_pod_names
    assert {"mnist-a-0", "mnist-b-0"} <= central_pod_names
    # It sent an update in every round and heard from the central combiner that it is over.
    for number in (1, 2):
        assert f'"round": {number}, "tenant": "c"' in site_log, site_log[-2000:]
    assert "job finished: succeeded" in site_log, site_log[-2000:]
    # The site cannot see the round state; that alone must not fail its copy of the job.
    assert status(control_plane, site_namespace, "mnist").get("phase") != "Failed"
    # It trained on the site's own binding; the central side never saw the path.
    assert "--data-binding" in site_pod["spec"]["containers"][0]["args"]
    assert str(data_file) not in central_objects
    assert "refusedTenants" not in final


REFUSING = {"entrypoints": ["fedkube.examples.digits:make_model"]}
REFUSAL = (
    "tenant c: spec.data.entrypoint 'fedkube.examples.digits:make_data' is not allowed at "
    f"site {SITE}"
)


def site_refusal(control_plane: ControlPlane, site_namespace: str) -> dict[str, Any]:
    """What the site says: a Refused condition naming tenant, field and rule, and an Event."""
    refused = wait_for(
        lambda: condition(control_plane, site_namespace, "mnist", "Refused"),
        60,
        "the Refused condition at the site",
    )
    events = wait_for(
        lambda: [
            e
            for e in get_json(control_plane, site_namespace, "events")["items"]
            if e.get("reason") == "PolicyRefused"
        ],
        30,
        "the PolicyRefused Event at the site",
    )
    assert events[0]["type"] == "Warning" and REFUSAL in events[0]["message"], events
    assert events[0]["involvedObject"]["name"] == "mnist"
    return refused


def test_a_site_that_refuses_the_data_entrypoint_runs_nothing_and_the_job_goes_on_without_it(
    control_plane: ControlPlane,
    namespace: str,
    site_namespace: str,
    operator: OperatorProcess,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    central = namespace
    document = site_job(min_fraction=0.5)  # 3 selected, quorum 2: a and b suffice
    with two_sites(control_plane, central, site_namespace, api_client, tmp_path, REFUSING) as (
        central_pods,
        site_pods,
        _,
    ):
        apply(control_plane, central, document)
        apply(control_plane, site_namespace, document)
        copy_tenant_secret(control_plane, central, site_namespace, "mnist-tenant-c")
        refused = site_refusal(control_plane, site_namespace)
        final = wait_for(lambda: finished(control_plane, central, "mnist"), 300, "the job")
        site_pod_names = [
            p["metadata"]["name"] for p in get_json(control_plane, site_namespace, "pods")["items"]
        ]
        central_refused = condition(control_plane, central, "mnist", "Refused")
        assert not central_pods.errors and not site_pods.errors
    assert refused["status"] == "True" and refused["reason"] == "PolicyRefused"
    assert refused["message"].startswith(REFUSAL), refused
    assert site_pod_names == []  # no worker pod at the site
    assert final["phase"] == "Succeeded", (final, operator.log()[-3000:])
    assert final["progress"] == "2/2"
    assert final["refusedTenants"] == ["c"]
    assert central_refused is not None and central_refused["message"].startswith(REFUSAL)


def test_a_refused_tenant_that_the_quorum_needs_fails_the_job_naming_it(
    control_plane: ControlPlane,
    namespace: str,
    site_namespace: str,
    operator: OperatorProcess,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    central = namespace
    document = site_job(min_fraction=1.0)  # every selected client is needed
    with two_sites(control_plane, central, site_namespace, api_client, tmp_path, REFUSING) as (
        central_pods,
        site_pods,
        _,
    ):
        apply(control_plane, central, document)
        apply(control_plane, site_namespace, document)
        copy_tenant_secret(control_plane, central, site_namespace, "mnist-tenant-c")
        site_refusal(control_plane, site_namespace)
        final = wait_for(lambda: finished(control_plane, central, "mnist"), 120, "the job")
        assert not central_pods.errors and not site_pods.errors
    assert final["phase"] == "Failed", final
    assert "refused at their site" in final["message"] and REFUSAL in final["message"], final
    assert final["closedRounds"] == 0
