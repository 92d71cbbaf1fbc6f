"""Telling the central side that a site refuses a tenant.

A site has no Redis and no API access to the central cluster: all it holds
is the tenant's token (copied from the central cluster) and the central
combiners' address. So the site operator posts the refusal to the tenant's
combiner (``POST /v1/refusal``, authenticated as the tenant), which records
it in the job's round state; the global aggregator then stops waiting on
the tenant and the central operator shows it in the job's status.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from fedkube.errors import RefusalNotDelivered
from fedkube.wire.protocol import H_TENANT

TIMEOUT_S = 5.0


def report_refusal(combiner_url: str, tenant: str, token: str, message: str) -> None:
    """POST the refusal to the tenant's combiner; raises RefusalNotDelivered on failure."""
    request = urllib.request.Request(
        combiner_url.rstrip("/") + "/v1/refusal",
        data=json.dumps({"message": message}).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            H_TENANT: tenant,
            "Content-Type": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as exc:
        raise RefusalNotDelivered(f"{combiner_url}: {exc}") from None
