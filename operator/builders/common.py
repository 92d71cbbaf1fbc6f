"""What every builder shares: the paths and keys in the pods, the run mode, :class:`Target`
(what only the cluster knows), owner references and the spec hash."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import yaml

from fedkube.operator import naming
from fedkube.operator.config import OperatorConfig
from fedkube.policy import DataBinding
from fedkube.service.certificates import Issued
from fedkube.spec import API_VERSION, KIND, FederatedJob, Tenant, TlsMode

CONFIG_DIR = "/etc/fedkube/config"
DATA_BINDING_DIR = "/etc/fedkube/data-binding"
DATA_BINDING_KEY = "binding.json"
SITE_DATA_VOLUME = "site-data"  # a site's own storage, from its policy
ANNOTATION_DATA_BINDING = "fedkube.io/data-binding-hash"
TOKENS_DIR = "/etc/fedkube/tokens"
CHECKPOINT_DIR = "/var/lib/fedkube/checkpoints"
JOB_FILE = f"{CONFIG_DIR}/job.yaml"
TOKENS_FILE = f"{TOKENS_DIR}/tokens.json"
KEYS_FILE = f"{TOKENS_DIR}/keys.json"  # name -> public key (a combiner's tenants, the regions)
TOKEN_KEY = "token"
# The tenant Secret's Ed25519 private key, next to its token (fedkube.wire.signing).
SIGNING_KEY_KEY = "signing-key"
REDIS_PASSWORD_KEY = "password"
# spec.transport.tls: a service's or tenant's ca.crt, tls.crt and tls.key, from its Secret.
TLS_DIR = "/etc/fedkube/tls"
CA_KEY_KEY = "ca.key"  # the CA's private key, in the job's tls-ca Secret only

# libyaml's emitter when present: the ConfigMap is rebuilt on every pass, and
# the pure-Python emitter took most of a no-op pass for a 100-tenant job.
YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class RunMode(str, Enum):
    """What the job's pods should be doing."""

    active = "active"  # everything runs
    # spec.suspend: no worker pod; the aggregator tier stays (paused through
    # Redis) so that resuming continues the same round with what it holds.
    suspended = "suspended"
    # Succeeded/Failed, workers still finishing: the aggregator stops, the
    # combiners stay to tell the last workers that the job is over.
    finishing = "finishing"
    finished = "finished"  # every Deployment at 0, no worker pod created again


@dataclass(frozen=True)
class Target:
    """Everything the builders need that is not in the manifest itself."""

    job: FederatedJob
    namespace: str
    uid: str
    config: OperatorConfig
    mode: RunMode = RunMode.active
    # Each region's combiner: its token to the global tier and the base64 Ed25519
    # private key that signs its partials; the global tier gets their images.
    region_tokens: Mapping[str, str] = field(default_factory=dict)
    region_signing_keys: Mapping[str, str] = field(default_factory=dict)
    tenant_tokens: Mapping[str, str] = field(default_factory=dict)
    # Each tenant's base64 Ed25519 private key; combiners get the public halves.
    tenant_signing_keys: Mapping[str, str] = field(default_factory=dict)
    # Tenants this site's policy refuses: nothing of theirs is built here.
    refused: frozenset[str] = frozenset()
    # spec.transport.tls (central mode): the job's CA, and the certificate of each
    # identity that fedkube.service.certificates names (global, region/<r>, tenant/<t>).
    tls_ca: Issued | None = None
    tls_leaves: Mapping[str, Issued] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.job.spec.transport.tls.mode is not TlsMode.disabled

    @property
    def name(self) -> str:
        return self.job.name

    def redis_url(self) -> str:
        url = self.job.spec.state.redis_url or self.config.redis_url
        if not url:
            raise ValueError("no Redis: set spec.state.redisUrl or the operator's --redis-url")
        return url

    def local_tenants(self) -> list[Tenant]:
        """The tenants whose workers this operator runs (its site's, or the unassigned),
        less those its policy refuses."""
        return [
            t
            for t in self.job.spec.tenants
            if t.site == self.config.site and t.name not in self.refused
        ]

    def data_binding(self, tenant: str) -> DataBinding | None:
        return self.config.policy.data_bindings.get(tenant)


def owner_reference(job: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_hash(obj: Mapping[str, Any]) -> str:
    """A short digest of a manifest without its own hash annotation."""
    metadata = dict(obj.get("metadata", {}))
    annotations = {
        k: v for k, v in metadata.get("annotations", {}).items() if k != naming.ANNOTATION_HASH
    }
    metadata["annotations"] = annotations
    canonical = json.dumps({**obj, "metadata": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` annotated with its :func:`spec_hash`."""
    metadata = dict(obj["metadata"])
    metadata["annotations"] = {
        **metadata.get("annotations", {}),
        naming.ANNOTATION_HASH: spec_hash(obj),
    }
    return {**obj, "metadata": metadata}


def object_metadata(target: Target, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(target.name, target.uid)],
    }


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
