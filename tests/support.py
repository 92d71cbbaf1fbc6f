"""Helpers for the tests: small manifests and waiting on conditions."""

from __future__ import annotations

import base64
import copy
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedkube.service.web import digest
from fedkube.wire import signing

ROOT = Path(__file__).resolve().parents[1]

SMALL_JOB: dict[str, Any] = {
    "apiVersion": "fedkube.io/v1alpha1",
    "kind": "FederatedJob",
    "metadata": {"name": "small"},
    "spec": {
        "rounds": 3,
        "seed": 3,
        "model": {"entrypoint": "fedkube.examples.digits:make_model", "kwargs": {"hidden": 16}},
        "data": {"entrypoint": "fedkube.examples.digits:make_data", "partition": {"scheme": "iid"}},
        "regions": [{"name": "eu"}, {"name": "us"}],
        "tenants": [
            {"name": "a", "region": "eu"},
            {"name": "b", "region": "eu"},
            {"name": "c", "region": "us"},
            {"name": "d", "region": "us"},
        ],
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.1},
        "participation": {"minFraction": 0.5, "roundTimeoutSeconds": 30},
    },
}


def small_job_dict(**spec_overrides: Any) -> dict[str, Any]:
    """A deep copy of the small job with ``spec`` keys replaced."""
    document = copy.deepcopy(SMALL_JOB)
    document["spec"].update(copy.deepcopy(spec_overrides))
    return document


def tenant_signing_key(tenant: str) -> str:
    """A fixed Ed25519 private key (base64) per tenant name, for tests that play workers."""
    seed = hashlib.sha256(f"fedkube-test-signing-key:{tenant}".encode()).digest()
    return base64.b64encode(seed).decode()


def tenant_verify_keys(tenants: Iterable[str]) -> dict[str, signing.VerifyKey]:
    """The public halves of :func:`tenant_signing_key`, as a combiner is configured."""
    return {
        tenant: signing.load_verify_key(
            signing.public_key_of(tenant_signing_key(tenant), tenant), tenant
        )
        for tenant in tenants
    }


def region_token(region: str) -> str:
    """A fixed token per region: what its combiner presents to the global tier."""
    return f"combiner-token-{region}"


def region_signing_key(region: str) -> str:
    """A fixed Ed25519 private key (base64) per region: its combiner signs partials with it."""
    seed = hashlib.sha256(f"fedkube-test-region-key:{region}".encode()).digest()
    return base64.b64encode(seed).decode()


def region_checks(regions: Iterable[str]) -> dict[str, Any]:
    """What a test's global aggregator checks its combiners with (GlobalConfig's keywords)."""
    names = list(regions)
    return {
        "region_digests": {r: digest(region_token(r)) for r in names},
        "region_keys": {
            r: signing.load_verify_key(signing.public_key_of(region_signing_key(r), r), r)
            for r in names
        },
    }


def region_credential(region: str) -> dict[str, Any]:
    """A test's combiner's own credential (CombinerConfig's keywords)."""
    return {
        "aggregator_token": region_token(region),
        "signing_key": signing.load_signing_key(region_signing_key(region), region),
    }


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def fedkube_cli(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``python -m fedkube.cli ARGS`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "fedkube.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
