"""Two sites, one job: the central site's operator and a data-owning site's operator.

Each site is a namespace standing for its own cluster, with its own operator
and its own pod runner. The central site runs the aggregator tier and the
tenants without a ``site``; the site ``hospital-c`` runs only tenant c's
worker, which trains on its side and reports to the central combiner through
``--central-address``. The site has no Redis and its operator never sees the
round state, as across a real site boundary; only the tenant's token is copied
over, as the README tells a site admin to.
"""

from __future__ import annotations

import base64
from pathlib import Path

import kubernetes.client

from tests.cluster.jobs import apply, get_json, job_document, status
from tests.cluster.test_end_to_end import finished
from tests.controlplane import ControlPlane
from tests.operator_process import OperatorProcess
from tests.podrunner import PodRunner
from tests.support import wait_for

SITE = "hospital-c"


def copy_tenant_secret(cp: ControlPlane, central: str, site: str, name: str) -> None:
    """What a site admin does with the tenant's credentials from the central site."""
    secret = wait_for(
        lambda: next(
            (s for s in get_json(cp, central, "secrets")["items"] if s["metadata"]["name"] == name),
            None,
        ),
        30,
        f"Secret {name} at the central site",
    )
    token = base64.b64decode(secret["data"]["token"]).decode()
    cp.kubectl("create", "secret", "generic", "-n", site, name, f"--from-literal=token={token}")


def test_a_tenant_at_its_own_site_trains_with_the_central_site_to_success(
    control_plane: ControlPlane,
    namespace: str,
    site_namespace: str,
    operator: OperatorProcess,
    api_client: kubernetes.client.ApiClient,
    tmp_path: Path,
):
    central = namespace
    document = job_document()
    document["spec"]["rounds"] = 2
    document["spec"]["participation"] = {"minFraction": 1.0, "roundTimeoutSeconds": 120}
    document["spec"]["tenants"][2]["site"] = SITE  # tenant c, region us
    (tmp_path / "site").mkdir()
    site_operator = OperatorProcess(
        control_plane,
        site_namespace,
        None,  # no Redis at the site
        tmp_path / "site",
        "--site",
        SITE,
        "--central-address",
        f"http://{{job}}-combiner-{{region}}.{central}.svc:8080",
    ).start()
    try:
        site_operator.wait_serving()
        with (
            PodRunner(api_client, central, tmp_path / "central-pods") as central_pods,
            PodRunner(
                api_client, site_namespace, tmp_path / "site-pods", peers=[central_pods]
            ) as site_pods,
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
                p["metadata"]["name"]
                for p in get_json(control_plane, site_namespace, "pods")["items"]
            }
            assert not central_pods.errors and not site_pods.errors, (
                central_pods.errors,
                site_pods.errors,
            )
    finally:
        site_operator.stop()
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
