"""The run directory: cleared for a fresh run, kept for ``--resume``; and the run's
credentials in ``secrets/`` (tokens and signing keys, mode 0600; the combiners
and the global aggregator get only the digests and public keys that check them)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedkube.errors import FedkubeError
from fedkube.service import certificates
from fedkube.service.certificates import Issued
from fedkube.service.credentials import credential_checks
from fedkube.spec import FederatedJob, TlsMode
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

    tokens: dict[str, str]  # tenant -> bearer token
    signing_keys: dict[str, str]  # tenant -> base64 Ed25519 private key (its workers only)
    region_tokens: dict[str, str]  # region -> its combiner's token to the global tier
    region_keys: dict[str, str]  # region -> its combiner's private key (signs partials)


def write_private(path: Path, document: dict[str, str]) -> None:
    """A JSON file only this user can read (mode 0600 from its creation on)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(document))


def read_json(path: Path) -> dict[str, str]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def credentials_for(out: Path, job: FederatedJob) -> Credentials:
    """Per-tenant and per-region tokens and signing keys, kept across --resume.

    Workers get their tenant's token and private key through their
    environment, each combiner its region's; a combiner gets only what checks
    its tenants (the tokens' SHA-256 digests, ``tenant-digests.json``, and the
    public keys, ``tenant-keys.json``), the global aggregator only what checks
    the combiners (``region-digests.json``, ``region-keys.json``).
    """
    folder = out / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tenants, regions = [t.name for t in job.spec.tenants], job.region_names()
    tokens = _kept(folder / "tokens.json", tenants, lambda: secrets.token_urlsafe(32))
    keys = _kept(folder / "signing-keys.json", tenants, lambda: signing.generate_key()[0])
    region_tokens = _kept(folder / "region-tokens.json", regions, lambda: secrets.token_urlsafe(32))
    region_keys = _kept(
        folder / "region-signing-keys.json", regions, lambda: signing.generate_key()[0]
    )
    for prefix, names, held, private, source in (
        ("tenant", tenants, tokens, keys, folder / "signing-keys.json"),
        ("region", regions, region_tokens, region_keys, folder / "region-signing-keys.json"),
    ):
        checks = credential_checks(
            names, held, private, lambda name, s=source, p=prefix: f"{s}: {p} {name!r}"
        )
        (folder / f"{prefix}-digests.json").write_text(json.dumps(checks.token_digests))
        (folder / f"{prefix}-keys.json").write_text(json.dumps(checks.public_keys))
    return Credentials(tokens, keys, region_tokens, region_keys)


def _kept(path: Path, names: list[str], mint: Callable[[], str]) -> dict[str, str]:
    """``{name: secret}`` from ``path``, with one minted for each name it lacks (written back)."""
    held = read_json(path)
    for name in names:
        held.setdefault(name, mint())
    write_private(path, held)
    return held


def tls_for(out: Path, job: FederatedJob, hosts: list[str]) -> dict[str, Path]:
    """Under ``spec.transport.tls``, each service's and tenant's TLS folder (else none).

    ``global``, ``region/<r>`` and ``tenant/<t>`` map to folders under
    ``secrets/tls`` holding ``ca.crt``, ``tls.crt`` and ``tls.key``. The run's
    CA is minted once and kept across --resume (its key stays in
    ``secrets/tls/ca``, mode 0600); the services' certificates are minted
    again at every start, for the ``hosts`` they are reached at this time.
    """
    settings = job.spec.transport.tls
    if settings.mode is TlsMode.disabled:
        return {}
    folder = out / "secrets" / "tls"
    ca_dir = folder / "ca"
    try:
        ca = Issued((ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes())
    except FileNotFoundError:
        ca = certificates.mint_ca(job.name)
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (ca_dir / "ca.crt").write_bytes(ca.cert_pem)
        descriptor = os.open(ca_dir / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(ca.key_pem)
    served = [*hosts, *settings.server_names]
    return {
        who: certificates.write(
            folder / who, ca.cert_pem, certificates.mint_leaf(ca, uri, served if serves else [])
        )
        for who, (uri, serves) in certificates.identities(job).items()
    }
