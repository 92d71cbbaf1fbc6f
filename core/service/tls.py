"""TLS between the tiers: the contexts a service serves and dials with, and whose
certificate a caller presented (``spec.transport.tls``).

A service reads three files from one directory, the keys of a
``kubernetes.io/tls`` Secret (cert-manager's too): ``ca.crt`` (the job's
CA, the only one it trusts), ``tls.crt`` and ``tls.key`` (its own
certificate, see :mod:`fedkube.service.certificates`).

``server``: every connection is TLS and clients verify the server's
certificate and name; callers are still known by their bearer tokens.
``mutual``: callers present their certificate too, and each request that
acts for a tenant or a region must come with that tenant's or region's
certificate, beside its token: a stolen token alone no longer posts an
update. The handshake asks for a client certificate without requiring one
(``CERT_OPTIONAL``), so that ``/healthz`` and ``/metrics`` stay open to a
kubelet's probe and to Prometheus; the routes that act for someone refuse a
missing or foreign certificate by name (403 ``bad_certificate``).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from fedkube.errors import UpdateRejected
from fedkube.service.certificates import CA_FILE, CERT_FILE, KEY_FILE
from fedkube.spec import TlsMode
from fedkube.wire.protocol import Reason

TLS_DIR_ENV = "FEDKUBE_TLS_DIR"


class TlsError(ValueError):
    """The TLS files are missing or unusable (the message names the file)."""


@dataclass(frozen=True)
class Tls:
    """A service's TLS files and whether callers must present certificates."""

    directory: Path
    mutual: bool

    def _file(self, name: str) -> str:
        path = self.directory / name
        if not path.is_file():
            raise TlsError(
                f"{path}: missing (--tls-dir or ${TLS_DIR_ENV} holds ca.crt, tls.crt, tls.key)"
            )
        return str(path)

    def server_context(self) -> ssl.SSLContext:
        """What a service serves with: its certificate; under ``mutual``, asks for the caller's."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self._file(CA_FILE))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_own(context)
        context.verify_mode = ssl.CERT_OPTIONAL if self.mutual else ssl.CERT_NONE
        return context

    def client_context(self) -> ssl.SSLContext:
        """What a service dials with: the job's CA only, names checked; under ``mutual``,
        its own certificate too."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self._file(CA_FILE))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.mutual:
            self._load_own(context)
        return context

    def _load_own(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self._file(CERT_FILE), self._file(KEY_FILE))
        except ssl.SSLError as exc:
            raise TlsError(
                f"{self.directory}: {CERT_FILE} and {KEY_FILE} do not load: {exc}"
            ) from None


def configured(mode: TlsMode, directory: str | None) -> Tls | None:
    """The service's :class:`Tls` for the job's mode (None when disabled), its files checked.

    ``directory`` is ``--tls-dir``, else ``$FEDKUBE_TLS_DIR``.
    """
    if mode is TlsMode.disabled:
        return None
    folder = directory or os.environ.get(TLS_DIR_ENV)
    if not folder:
        raise TlsError(
            f"spec.transport.tls.mode is {mode.value}: give the certificates' folder "
            f"(--tls-dir or ${TLS_DIR_ENV})"
        )
    tls = Tls(Path(folder), mutual=mode is TlsMode.mutual)
    tls.server_context()  # fails now, naming the file, rather than at the first connection
    return tls


def describe(tls: Tls | None) -> str:
    """How a service is reached, for its start-up log line."""
    if tls is None:
        return "plain HTTP"
    return "mutual TLS" if tls.mutual else "TLS"


def client_ssl(tls: Tls | None) -> ssl.SSLContext | bool:
    """What an aiohttp connector dials with: the job's CA (and certificate), else the default."""
    return tls.client_context() if tls is not None else True


def peer_identities(request: web.Request) -> list[str]:
    """The URIs in the verified certificate the caller presented (none: no certificate)."""
    transport = request.transport
    ssl_object: Any = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return []
    certificate = ssl_object.getpeercert() or {}
    return [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]


def require_peer(request: web.Request, tls: Tls | None, expected: str) -> None:
    """Under mutual TLS, refuse a request that did not come with ``expected``'s certificate."""
    if tls is None or not tls.mutual:
        return
    presented = peer_identities(request)
    if expected not in presented:
        shown = ", ".join(presented) if presented else "no client certificate"
        raise UpdateRejected(
            Reason.bad_certificate.value,
            f"this request needs the certificate of {expected}, not {shown}",
            403,
        )
