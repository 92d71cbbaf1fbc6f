"""What checks a credential, derived from the credential itself.

Two kinds of sender hold a bearer token and an Ed25519 signing key: a
tenant's workers (checked by their region's combiner) and a region's combiner
(checked by the global aggregator). The checker must never hold either (it
could then pose as the sender or sign for it), so it gets only their images:
the tokens' SHA-256 digests and the public keys. The local runner writes them
to files and the operator to Secrets; both derive them here, so the two can
never disagree about what a checker sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fedkube.service.web import digest
from fedkube.wire import signing


@dataclass(frozen=True)
class CredentialChecks:
    """Per sender: the digest of its token and its public key (base64, as files carry them)."""

    token_digests: dict[str, str]
    public_keys: dict[str, str]


def credential_checks(
    names: Iterable[str],
    tokens: Mapping[str, str],
    signing_keys: Mapping[str, str],
    where: Callable[[str], str],
) -> CredentialChecks:
    """The checks for the senders ``names``; ``where(name)`` names a bad private key's source."""
    ordered = sorted(names)
    return CredentialChecks(
        token_digests={name: digest(tokens[name]) for name in ordered},
        public_keys={
            name: signing.public_key_of(signing_keys[name], where(name)) for name in ordered
        },
    )
