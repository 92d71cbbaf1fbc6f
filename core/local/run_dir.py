"""The run directory: cleared for a fresh run, kept for ``--resume``; and the run's
credentials in ``secrets/`` (tokens and signing keys, mode 0600; the combiners
get only the digests and public keys that check them)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedkube.errors import FedkubeError
from fedkube.service.credentials import combiner_checks
from fedkube.spec import FederatedJob
from fedkube.wire import signing


def prepare_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "checkpoints").exists() and not (out / "redis").exists():
            raise FedkubeError(f"--resume: {out} holds no earlier run of this job")
        return
    for part in ("redis", "checkpoints", "clients", "logs", "ports", "pids", "secrets"):
        shutil.rmtree(out / part, ignore_errors=True)
    for name in ("history.jsonl", "history.csv", "plot.png", "summary.txt"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Credentials:
    """What the run's services authenticate with, kept in ``secrets/`` across --resume."""

    tokens: dict[str, str]  # tenant (and "__aggregator__") -> bearer token
    signing_keys: dict[str, str]  # tenant -> base64 Ed25519 private key (its workers only)


def write_private(path: Path, document: dict[str, str]) -> None:
    """A JSON file only this user can read (mode 0600 from its creation on)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(document))


def read_json(path: Path) -> dict[str, str]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def credentials_for(out: Path, job: FederatedJob) -> Credentials:
    """Per-tenant tokens and signing keys plus the aggregator's token, kept across --resume.

    Workers get their tenant's token and private key through their
    environment; combiners get only what checks them: the tokens' SHA-256
    digests (``tenant-digests.json``) and the public keys (``tenant-keys.json``).
    """
    folder = out / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = read_json(folder / "tokens.json")
    for name in [t.name for t in job.spec.tenants] + ["__aggregator__"]:
        tokens.setdefault(name, secrets.token_urlsafe(32))
    write_private(folder / "tokens.json", tokens)
    keys = read_json(folder / "signing-keys.json")
    for tenant in job.spec.tenants:
        keys.setdefault(tenant.name, signing.generate_key()[0])
    write_private(folder / "signing-keys.json", keys)
    checks = combiner_checks(
        [t.name for t in job.spec.tenants],
        tokens,
        keys,
        lambda tenant: f"{folder / 'signing-keys.json'}: tenant {tenant!r}",
    )
    (folder / "tenant-digests.json").write_text(json.dumps(checks.token_digests))
    (folder / "tenant-keys.json").write_text(json.dumps(checks.public_keys))
    return Credentials(tokens, keys)
