"""TLS between the tiers (spec.transport.tls), on a real ``fedkube run``.

The run mints its CA and a certificate per service and tenant; the test then
dials its combiner and its global tier as a worker, a combiner and a stranger
would: with the right certificate, another tenant's, none, one from another
CA, plain HTTP, and without trusting the run's CA.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path

import pytest

from fedkube.local.launcher import ProcessLauncher
from fedkube.local.runner import LocalRun, RunOptions
from fedkube.service import certificates
from fedkube.service.certificates import CA_FILE, CERT_FILE, KEY_FILE, identity
from fedkube.wire.protocol import H_JOB, H_REGION, H_TENANT
from tests.support import wait_for

pytestmark = pytest.mark.integration


def context(ca: Path | None, own: Path | None = None) -> ssl.SSLContext:
    """A client's TLS: trusting ``ca`` (None: the system's CAs), presenting ``own``'s."""
    made = ssl.create_default_context(cafile=str(ca) if ca else None)
    if own is not None:
        made.load_cert_chain(own / CERT_FILE, own / KEY_FILE)
    return made


def ask(
    port: int,
    tls: ssl.SSLContext | None,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, dict]:
    """One request to 127.0.0.1:``port`` (HTTPS with ``tls``); its status and JSON body."""
    if tls is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10
        )
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        answer = json.loads(data) if data.startswith(b"{") else {}
    except ValueError:
        answer = {}
    return response.status, answer


def test_a_mutual_tls_run_trains_and_each_tier_takes_only_its_callers_own_certificate(
    job_file, tmp_path
):
    # prepare: a run under mutual TLS, kept going while the test dials it
    manifest = job_file(rounds=500, transport={"tls": {"mode": "mutual"}})
    run = LocalRun(RunOptions(job_path=manifest, out_dir=tmp_path / "run"), ProcessLauncher())
    tls = tmp_path / "run" / "secrets" / "tls"
    secrets = tmp_path / "run" / "secrets"
    stranger = tmp_path / "stranger"  # a certificate for tenant a, from a CA of its own
    other_ca = certificates.mint_ca("small")
    certificates.write(
        stranger,
        other_ca.cert_pem,
        certificates.mint_leaf(other_ca, identity("small", "tenant", "a")),
    )
    try:
        run.start()
        wait_for(lambda: len(run.history()) >= 2, timeout=180, what="two rounds to close")
        tokens = json.loads((secrets / "tokens.json").read_text())
        region_tokens = json.loads((secrets / "region-tokens.json").read_text())
        eu = int((tmp_path / "run" / "ports" / "eu").read_text())
        top = int((tmp_path / "run" / "ports" / "global").read_text())
        ca = tls / "ca" / CA_FILE
        poll = json.dumps({"clients": ["a-0"], "after": 0, "wait": 0}).encode()
        as_a = {"Authorization": f"Bearer {tokens['a']}", H_JOB: "small", H_TENANT: "a"}

        def poll_eu(tls_context: ssl.SSLContext | None) -> tuple[int, dict]:
            return ask(eu, tls_context, "POST", "/v1/tasks", as_a, poll)

        # execute: a worker of tenant a, as the run's own workers dial
        own = poll_eu(context(ca, tls / "tenant" / "a"))
        # ... with tenant b's certificate, with none, with a foreign CA's, and in the clear
        borrowed = poll_eu(context(ca, tls / "tenant" / "b"))
        bare = poll_eu(context(ca))
        with pytest.raises(ssl.SSLError):
            poll_eu(context(stranger / CA_FILE, stranger))
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            poll_eu(None)
        # ... and a client that trusts only the system's CAs does not trust the combiner
        with pytest.raises(ssl.SSLCertVerificationError):
            poll_eu(context(None, tls / "tenant" / "a"))
        # probes and Prometheus need no client certificate
        health = ask(eu, context(ca), "GET", "/healthz", {})
        # the global tier: eu's token with eu's certificate, then with us's
        as_eu = {"Authorization": f"Bearer {region_tokens['eu']}", H_REGION: "eu"}
        status_own = ask(top, context(ca, tls / "region" / "eu"), "GET", "/v1/status", as_eu)
        status_other = ask(top, context(ca, tls / "region" / "us"), "GET", "/v1/status", as_eu)
    finally:
        run.stop(grace_s=0)  # the job has hundreds of rounds to go
    # assert: the run trained over TLS, and every caller but the certificate's owner is refused
    assert own[0] == 200 and own[1].get("status"), own
    assert borrowed == (403, borrowed[1]) and borrowed[1]["error"] == "bad_certificate", borrowed
    assert "fedkube://small/tenant/b" in borrowed[1]["detail"], borrowed
    assert bare[0] == 403 and "no client certificate" in bare[1]["detail"], bare
    assert health[0] == 200, health
    assert status_own[0] == 200 and status_own[1]["job"] == "small", status_own
    assert status_other[0] == 403 and status_other[1]["error"] == "bad_certificate", status_other
    combiner_argv = run.launches["combiner-eu"][0]
    assert combiner_argv[combiner_argv.index("--global-url") + 1].startswith("https://")
