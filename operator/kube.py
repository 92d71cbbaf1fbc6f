"""The few Kubernetes API calls the operator makes, on the official client.

Writes are server-side apply (``application/apply-patch+yaml``) under one
field manager, so applying the same object twice is a no-op on the server
and a restarted operator simply re-applies. Paths are built from a small
table of the kinds a FederatedJob owns, which avoids API discovery on start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fedkube.operator.naming import FIELD_MANAGER


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def base(self, namespace: str) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


KINDS = {
    kind.kind: kind
    for kind in (
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "Secret", "secrets"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("v1", "Service", "services"),
        Kind("v1", "Pod", "pods"),
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    )
}
CHILD_KINDS = tuple(KINDS)
REQUEST_TIMEOUT_S = 30
JOB_KIND = Kind("fedkube.io/v1alpha1", "FederatedJob", "federatedjobs")


class Kube:
    """Synchronous, thread-safe calls; handlers run them in a worker thread."""

    def __init__(self, api: k8s.ApiClient):
        self.api = api

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request; a non-2xx answer raises ``ApiException`` with the server's message.

        Bodies skip the client's model layer. The REST layer JSON-encodes
        bodies of JSON requests itself; apply patches go out as JSON text, which
        is valid YAML for ``application/apply-patch+yaml``.
        """
        if body is not None and not content_type.endswith("json"):
            body = json.dumps(body)
        method, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=payload, _request_timeout=REQUEST_TIMEOUT_S
        )
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(
                status=response.status,
                reason=response.reason,
                body=data.decode(errors="replace") if data else None,
            )
        return json.loads(data) if data else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (create or update), taking ownership of its fields."""
        kind = KINDS[obj["kind"]]
        metadata = obj["metadata"]
        path = f"{kind.base(metadata['namespace'])}/{metadata['name']}"
        result: dict[str, Any] = self._call(
            "PATCH",
            path,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        return result

    def list(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._call(
            "GET", KINDS[kind].base(namespace), query=[("labelSelector", label_selector)]
        )["items"]
        for item in items:  # list items carry no kind
            item.setdefault("kind", kind)
        return items

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call("GET", f"{KINDS[kind].base(namespace)}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete a child, or the FederatedJob itself (ttlSecondsAfterFinished).

        Background propagation: children follow by garbage collection. ``uid``
        guards against deleting a newer namesake.
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        path = (JOB_KIND if kind == JOB_KIND.kind else KINDS[kind]).base(namespace)
        try:
            self._call("DELETE", f"{path}/{name}", body=body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True
