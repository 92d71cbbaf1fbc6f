"""What a combiner checks its tenants with, derived from what their workers hold.

A worker holds its tenant's token and private signing key. A combiner must
never hold either (it could then pose as the tenant or sign for it), so it
gets only their images: the tokens' SHA-256 digests and the public keys.
The local runner writes them to files and the operator to a Secret; both
derive them here, so the two can never disagree about what a combiner sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fedkube.service.web import digest
from fedkube.wire import signing


@dataclass(frozen=True)
class CombinerChecks:
    """Per tenant: the digest of its token and its public key (base64, as files carry them)."""

    token_digests: dict[str, str]
    public_keys: dict[str, str]


def combiner_checks(
    tenants: Iterable[str],
    tokens: Mapping[str, str],
    signing_keys: Mapping[str, str],
    where: Callable[[str], str],
) -> CombinerChecks:
    """The checks for ``tenants``; ``where(tenant)`` names a bad private key's source in errors."""
    names = sorted(tenants)
    return CombinerChecks(
        token_digests={name: digest(tokens[name]) for name in names},
        public_keys={
            name: signing.public_key_of(signing_keys[name], where(name)) for name in names
        },
    )
