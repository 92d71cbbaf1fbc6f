"""The CRD is derived from the spec model and never drifts from it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from fedkube.operator.crd import build_crd, render, spec_schema
from tests.support import ROOT

CRD_FILE = ROOT / "crds" / "federatedjob.yaml"


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_the_crd_file_is_what_the_models_generate():
    assert CRD_FILE.read_text() == render(), (
        "crds/federatedjob.yaml drifted from the spec model: "
        "run `python -m fedkube.operator.crd > crds/federatedjob.yaml`"
    )


def test_the_schema_is_structural():
    for path, node in walk(schema()):
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
            assert forbidden not in node, f"{path} has {forbidden}"
        if node.get("type") == "object":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
                or path == ".properties.metadata"
            ), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_defaults_and_limits_come_from_the_model():
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["training"]["default"] == {}
    assert spec["training"]["properties"]["epochs"]["default"] == 1
    assert spec["rounds"]["minimum"] == 1
    assert spec["tenants"]["minItems"] == 1
    assert spec["tenants"]["x-kubernetes-list-type"] == "map"
    assert spec["tenants"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["tenants"]["items"]["properties"]["resources"]["properties"]["gpu"]["minimum"] == 0
    assert spec["model"]["properties"]["entrypoint"]["pattern"].startswith("^")
    assert spec["model"]["properties"]["kwargs"]["x-kubernetes-preserve-unknown-fields"] is True
    assert set(spec) >= {"suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished"}
    assert spec["backoffLimit"]["default"] == 6


def test_the_crd_has_a_status_subresource_short_name_and_printer_columns():
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert "fedjob" in crd["spec"]["names"]["shortNames"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["State"] == ".status.conditions[-1:].type"
    assert {"Phase", "Round", "Participation", "Age"} <= set(columns)


def test_an_optional_object_gets_no_empty_default_that_would_switch_it_on():
    # training.peft absent means "train the whole model"; an API-server default of {}
    # would turn LoRA on for every job
    training = spec_schema()["properties"]["training"]
    assert "default" not in training["properties"]["peft"]
    assert training["default"] == {}
