"""The job's CA and the certificates it issues (fedkube.service.certificates), and the TLS
contexts a service builds from them (fedkube.service.tls), checked by a real handshake."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedkube.service import certificates
from fedkube.service.certificates import identity
from fedkube.service.tls import Tls, TlsError, configured
from fedkube.spec import TlsMode


def test_a_leaf_names_its_identity_and_hosts_and_chains_to_the_jobs_ca_only():
    # prepare
    ca = certificates.mint_ca("mnist")
    other = certificates.mint_ca("mnist")
    uri = identity("mnist", "region", "eu")
    # execute
    leaf = certificates.mint_leaf(ca, uri, ["mnist-combiner-eu.team-a.svc", "10.0.0.7"])
    # assert
    cert = leaf.certificate()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert names.get_values_for_type(x509.DNSName) == ["mnist-combiner-eu.team-a.svc"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    cert.verify_directly_issued_by(ca.certificate())
    with pytest.raises(InvalidSignature):  # same name, another key
        cert.verify_directly_issued_by(other.certificate())
    assert uri == "fedkube://mnist/region/eu"


def test_a_certificate_read_back_stays_only_while_its_ca_names_and_lifetime_hold():
    ca = certificates.mint_ca("mnist")
    uri = identity("mnist", "tenant", "a")
    leaf = certificates.mint_leaf(ca, uri, ["a.example"])
    assert certificates.still_good(ca, leaf.cert_pem, uri, ["a.example"])
    # another CA's, other names, another identity, near its end, or not a certificate
    assert not certificates.still_good(
        certificates.mint_ca("mnist"), leaf.cert_pem, uri, ["a.example"]
    )
    assert not certificates.still_good(ca, leaf.cert_pem, uri, ["b.example"])
    assert not certificates.still_good(
        ca, leaf.cert_pem, identity("mnist", "tenant", "b"), ["a.example"]
    )
    short = certificates.mint_leaf(ca, uri, ["a.example"], days=10)
    assert not certificates.still_good(ca, short.cert_pem, uri, ["a.example"])
    assert not certificates.still_good(ca, b"not a certificate", uri, ["a.example"])


def tls_dir(folder: Path, ca: certificates.Issued, uri: str, hosts: list[str]) -> Path:
    return certificates.write(folder, ca.cert_pem, certificates.mint_leaf(ca, uri, hosts))


async def handshake(server: Tls, client: ssl.SSLContext) -> list[str]:
    """Serve once with ``server``'s context; the URIs the server saw the client present."""
    seen: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        seen.extend(v for k, v in peer.get("subjectAltName", ()) if k == "URI")
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server.server_context())
    port = listening.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        assert await reader.read() == b"ok"
        writer.close()
    finally:
        listening.close()
        await listening.wait_closed()
    return seen


async def test_mutual_tls_shows_the_server_the_callers_identity_and_server_tls_does_not(tmp_path):
    # prepare: a combiner's and a tenant's folders, under one CA
    ca = certificates.mint_ca("mnist")
    served = tls_dir(tmp_path / "eu", ca, identity("mnist", "region", "eu"), ["localhost"])
    tenant = tls_dir(tmp_path / "a", ca, identity("mnist", "tenant", "a"), [])
    # execute
    mutual = await handshake(Tls(served, mutual=True), Tls(tenant, mutual=True).client_context())
    server_only = await handshake(
        Tls(served, mutual=False), Tls(tenant, mutual=False).client_context()
    )
    # assert
    assert mutual == ["fedkube://mnist/tenant/a"]
    assert server_only == []


async def test_a_client_refuses_a_server_of_another_ca_or_another_name(tmp_path):
    ca, stranger = certificates.mint_ca("mnist"), certificates.mint_ca("mnist")
    own = tls_dir(tmp_path / "own", ca, identity("mnist", "tenant", "a"), [])
    foreign = tls_dir(
        tmp_path / "foreign", stranger, identity("mnist", "region", "eu"), ["localhost"]
    )
    misnamed = tls_dir(tmp_path / "misnamed", ca, identity("mnist", "region", "eu"), ["elsewhere"])
    for server in (foreign, misnamed):
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(Tls(server, mutual=False), Tls(own, mutual=False).client_context())


def test_a_service_under_tls_without_its_files_stops_naming_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDKUBE_TLS_DIR", raising=False)
    assert configured(TlsMode.disabled, None) is None
    with pytest.raises(TlsError, match="give the certificates' folder"):
        configured(TlsMode.server, None)
    with pytest.raises(TlsError, match=r"ca\.crt: missing"):
        configured(TlsMode.mutual, str(tmp_path))
    ca = certificates.mint_ca("mnist")
    folder = tls_dir(tmp_path / "x", ca, identity("mnist", "global"), ["localhost"])
    (folder / "tls.key").write_bytes(certificates.mint_ca("mnist").key_pem)  # not the cert's key
    with pytest.raises(TlsError, match="do not load"):
        configured(TlsMode.server, str(folder))
