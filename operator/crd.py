"""The FederatedJob CRD, derived from the typed spec and status models.

One source of truth: ``fedkube.spec.JobSpec`` (what ``fedkube run`` reads)
and ``fedkube.operator.status.JobStatus`` are turned into a structural
OpenAPI v3 schema here; ``crds/federatedjob.yaml`` is this module's output
(``python -m fedkube.operator.crd > crds/federatedjob.yaml``) and a test fails
when the file drifts from the models.

The pydantic schema (JSON Schema 2020-12) differs from what the API server
takes in a few mechanical ways, all handled in :func:`structural`: ``$ref``
is inlined, ``anyOf [X, null]`` becomes ``X``, ``const`` becomes a one-value
``enum``, numeric ``exclusiveMinimum`` becomes the boolean form, free-form
maps keep their unknown fields, and lists of named items become list-maps
keyed by ``name`` (the API server then rejects duplicate names itself).
The cross-field rules of ``fedkube.spec._cross_field_problems`` are stated
again in CEL (:data:`SPEC_RULES`); tests apply the same invalid manifests to
both and expect the same field to be named.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from fedkube.operator.status import JobStatus
from fedkube.spec import (
    API_VERSION,
    INFLIGHT_BELOW_UPDATE,
    KIND,
    MAX_JOB_NAME,
    MAX_WORKERS_PER_TENANT,
    JobSpec,
    Simulation,
    Transport,
)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "federatedjobs"
SINGULAR = "federatedjob"
SHORT_NAMES = ["fedjob", "fedjobs"]
CRD_NAME = f"{PLURAL}.{GROUP}"

# Lists whose items are identified by their name: the API server enforces
# uniqueness, and server-side apply merges them by name.
LIST_MAP_FIELDS = {"regions", "tenants"}

SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "!has(self.task) || has(self.task.entrypoint) != has(self.task.script)",
        "message": "set exactly one of spec.task.entrypoint and spec.task.script",
        "fieldPath": ".task",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.task) || !has(self.task.script) || has(self.model)",
        "message": "spec.model is required with spec.task.script: the global tier builds the model",
        "fieldPath": ".model",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "!has(self.task) || !has(self.task.script) || !has(self.simulation)",
        "message": "a script hosts one client: spec.simulation cannot be set",
        "fieldPath": ".task.script",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "has(self.task) || has(self.model)",
        "message": "spec.model is required unless spec.task names a task that builds the model",
        "fieldPath": ".model",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "has(self.task) || (has(self.data) && has(self.data.entrypoint))",
        "message": "spec.data.entrypoint is required unless spec.task names a task that loads "
        "the data",
        "fieldPath": ".data.entrypoint",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "self.tenants.all(t, self.regions.exists(r, r.name == t.region))",
        "message": "every tenant's region must be one of spec.regions",
        "fieldPath": ".tenants",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.participation) || !has(self.participation.minClients) || "
        "self.participation.minClients <= "
        "self.tenants.map(t, has(t.replicas) ? t.replicas : 1).sum()",
        "message": "participation.minClients exceeds the clients that the tenants' replicas "
        "provide",
        "fieldPath": ".participation.minClients",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.strategy) || !has(self.strategy.name) || "
        "self.strategy.name != 'scaffold' || !has(self.training) || "
        "!has(self.training.optimizer) || self.training.optimizer == 'sgd'",
        "message": "scaffold corrects SGD steps: training.optimizer must be sgd",
        "fieldPath": ".training.optimizer",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.compression) || !has(self.compression.down) || "
        "!has(self.compression.down.scheme) || self.compression.down.scheme != 'topk'",
        "message": "topk sparsifies updates; the model travels as none, fp16 or int8",
        "fieldPath": ".compression.down.scheme",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.privacy) || !has(self.privacy.dp) || "
        "has(self.privacy.dp.noiseMultiplier) != has(self.privacy.dp.epsilon)",
        "message": "set exactly one of noiseMultiplier and epsilon",
        "fieldPath": ".privacy.dp",
        "reason": "FieldValueInvalid",
    },
    *(
        {
            "rule": f"!has(self.transport) || !has(self.transport.{field}) || "
            f"self.transport.{field} >= (has(self.transport.maxUpdateBytes) ? "
            f"self.transport.maxUpdateBytes : {Transport().max_update_bytes})",
            "message": INFLIGHT_BELOW_UPDATE,
            "fieldPath": f".transport.{field}",
            "reason": "FieldValueInvalid",
        }
        for field in ("maxInflightBytes", "maxInflightBytesPerTenant")
    ),
    {
        "rule": "has(self.simulation) || self.tenants.all(t, !has(t.replicas) || "
        f"t.replicas <= {MAX_WORKERS_PER_TENANT})",
        "message": f"a tenant runs at most {MAX_WORKERS_PER_TENANT} worker pods: set "
        "spec.simulation to host more replicas as virtual clients",
        "fieldPath": ".tenants",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.simulation) || self.tenants.all(t, "
        "((has(t.replicas) ? t.replicas : 1) + _cpw - 1) / _cpw <= "
        f"{MAX_WORKERS_PER_TENANT})".replace(
            "_cpw",
            "(has(self.simulation.clientsPerWorker) ? self.simulation.clientsPerWorker : "
            f"{Simulation().clients_per_worker})",
        ),
        "message": f"a tenant runs at most {MAX_WORKERS_PER_TENANT} worker processes: "
        "raise clientsPerWorker",
        "fieldPath": ".simulation.clientsPerWorker",
        "reason": "FieldValueInvalid",
    },
]
# Not in CEL: krum's per-region client count (spec.strategy.robust.byzantine). A
# per-region sum over the tenants is over the API server's cost budget at 1000
# tenants; the operator refuses such a job at admission (fedkube.spec) instead.

ROOT_RULES: list[dict[str, str]] = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_JOB_NAME}",
        "message": f"metadata.name must be at most {MAX_JOB_NAME} characters (children are "
        "named <job>-combiner-<region> and must stay DNS labels)",
        "reason": "FieldValueInvalid",
    }
]

PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].type"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Participation", "type": "string", "jsonPath": ".status.participation"},
    {"name": "Metric", "type": "string", "jsonPath": ".status.metric"},
    {"name": "Epsilon", "type": "number", "jsonPath": ".status.epsilon"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Strategy", "type": "string", "jsonPath": ".status.strategy", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]

_DROP = {"title", "discriminator"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema turned into a structural schema for the API server."""
    definitions = schema.get("$defs", {})

    def convert(node: dict[str, Any], name: str = "") -> dict[str, Any]:
        if "$ref" in node:
            target = definitions[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return convert(merged, name)
        if "anyOf" in node:
            options = [option for option in node["anyOf"] if option.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"field {name!r}: a union of several types has no CRD schema")
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
            converted = convert({**options[0], **rest}, name)
            if converted.get("type") == "object" and len(options) < len(node["anyOf"]):
                converted[_OPTIONAL] = True  # X | None: absent means None, not {}
            return converted
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP or key == "$defs":
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "exclusiveMinimum":
                out["minimum"] = value
                out["exclusiveMinimum"] = True
            elif key == "exclusiveMaximum":
                out["maximum"] = value
                out["exclusiveMaximum"] = True
            elif key == "properties":
                out["properties"] = {
                    prop: convert(sub, prop) for prop, sub in sorted(value.items())
                }
            elif key == "items":
                out["items"] = convert(value, name)
            elif key == "additionalProperties":
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif value is not False:
                    out["additionalProperties"] = convert(value, name)
            else:
                out[key] = value
        if out.get("type") == "object" and "properties" not in out:
            if "additionalProperties" not in out:
                out["x-kubernetes-preserve-unknown-fields"] = True
        if out.get("type") == "array" and name in LIST_MAP_FIELDS:
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = ["name"]
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        if out.get("type") == "object" and "properties" in out:
            _default_nested_objects(out)
        return out

    return convert(schema)


# Marks, while converting, an object field that may be None (``X | None``):
# it gets no ``default: {}``; removed again before the schema is returned.
_OPTIONAL = "x-fedkube-optional"


def _default_nested_objects(node: dict[str, Any]) -> None:
    """Give optional object fields ``default: {}`` so their own defaults apply.

    pydantic emits no default for ``default_factory`` fields; without an
    empty-object default the API server would leave ``training`` absent
    instead of filling in ``epochs: 1`` and friends.
    """
    required = set(node.get("required", []))
    for prop, sub in node["properties"].items():
        if sub.pop(_OPTIONAL, False):
            continue  # e.g. training.peft: filling it in would switch LoRA on
        if (
            prop not in required
            and sub.get("type") == "object"
            and "properties" in sub
            and not sub.get("required")
        ):
            sub.setdefault("default", {})


def spec_schema() -> dict[str, Any]:
    schema = structural(JobSpec.model_json_schema(by_alias=True, mode="validation"))
    schema["x-kubernetes-validations"] = SPEC_RULES
    return schema


def status_schema() -> dict[str, Any]:
    return structural(JobStatus.model_json_schema(by_alias=True, mode="serialization"))


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest, as ``kubectl apply -f crds/`` takes it."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "fedkube", "app.kubernetes.io/part-of": "fedkube"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "fedkube"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A federated learning job: tenants train one model "
                            "together while their data stays with them.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": ROOT_RULES,
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m fedkube.operator.crd` from fedkube.spec.JobSpec and\n"
    "# fedkube.operator.status.JobStatus. Do not edit: change the models and regenerate\n"
    "# (tests/unit/test_crd.py fails when this file drifts).\n"
)


def render() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
