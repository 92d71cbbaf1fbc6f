"""A job's certificate authority and the certificates it issues (``cryptography``).

``fedkube run`` and the operator mint one CA per job and a certificate per
identity: the global tier, each region's combiner, each tenant's workers.
An identity is a URI in the certificate's subjectAltName
(``fedkube://JOB/region/eu``, the form SPIFFE uses for workloads), so a
service can tell which tenant or region presented a client certificate
without parsing names. Every leaf is good for both ends of a connection (a
combiner serves its workers and is a client of the global tier).

Keys are ECDSA P-256: a handshake costs a fraction of what RSA-2048's does,
and every TLS stack in use verifies it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedkube.spec import FederatedJob

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# Minted certificates start this early, so that a clock a little behind still accepts them.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("expected an EC private key")
        return key


def identity(job: str, kind: str, name: str = "") -> str:
    """The URI that names a job's ``global`` tier, a ``region``'s combiner or a ``tenant``."""
    return f"fedkube://{job}/{kind}/{name}" if name else f"fedkube://{job}/{kind}"


def identities(job: FederatedJob) -> dict[str, tuple[str, bool]]:
    """Who gets a certificate: ``global``, ``region/<r>``, ``tenant/<t>`` -> its URI, and
    whether it serves (the tier's certificates name the hosts it is reached at)."""
    found = {"global": (identity(job.name, "global"), True)}
    for region in job.region_names():
        found[f"region/{region}"] = (identity(job.name, "region", region), True)
    for tenant in job.spec.tenants:
        found[f"tenant/{tenant.name}"] = (identity(job.name, "tenant", tenant.name), False)
    return found


def _key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedkube"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def mint_ca(job: str, days: int = 365) -> Issued:
    """A self-signed CA for ``job``: it signs the job's certificates and nothing else."""
    key, key_pem = _key()
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"fedkube {job} CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def mint_leaf(ca: Issued, uri: str, hosts: Sequence[str] = (), days: int = 365) -> Issued:
    """A certificate for ``uri`` (see :func:`identity`), signed by ``ca``.

    ``hosts`` are the DNS names and IP addresses it is reached by (a worker
    checks the combiner's against the URL it dials); clients need none.
    """
    ca_cert = ca.certificate()
    key, key_pem = _key()
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [_general_name(host) for host in dict.fromkeys(hosts)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(uri))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key().public_key()),
            critical=False,
        )
        .sign(ca.private_key(), hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def still_good(
    ca: Issued, leaf_pem: bytes, uri: str, hosts: Sequence[str], renew_within_days: int = 30
) -> bool:
    """Whether a certificate read back can stay: issued by ``ca``, for ``uri`` and exactly
    ``hosts``, and not within ``renew_within_days`` of expiring (then a new one is minted
    ahead of time)."""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        leaf.verify_directly_issued_by(ca.certificate())
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    wanted = {x509.UniformResourceIdentifier(uri), *(_general_name(h) for h in hosts)}
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=renew_within_days)
    return set(names) == wanted and leaf.not_valid_after_utc > soon


def files(ca_pem: bytes, leaf: Issued) -> dict[str, bytes]:
    """The three files a service reads, by the names a ``kubernetes.io/tls`` Secret uses."""
    return {CA_FILE: ca_pem, CERT_FILE: leaf.cert_pem, KEY_FILE: leaf.key_pem}


def write(directory: Path, ca_pem: bytes, leaf: Issued) -> Path:
    """Write :func:`files` into ``directory`` (the key readable by its owner only)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files(ca_pem, leaf).items():
        path = directory / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600 if name == KEY_FILE else 0o644)
        tmp.replace(path)
    return directory
