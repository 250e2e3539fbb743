"""The CRD in crds/ is generated from the spec model: one source of truth for both validators."""

from __future__ import annotations

import pytest
import yaml

from fedjob.crd import crd_manifest, silo_crd_manifest
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("file", "generate"), [("federatedjob.yaml", crd_manifest), ("federatedsilo.yaml", silo_crd_manifest)]
)
def test_the_committed_crds_are_the_generated_ones(file: str, generate: object) -> None:
    assert callable(generate)
    committed = yaml.safe_load((REPO / "crds" / file).read_text())
    assert committed == generate(), f"crds/{file} drifted from the spec models: run `make crds`"


def test_the_schema_is_structural() -> None:
    """No $ref, no untyped nodes, no properties next to additionalProperties (API server rules)."""

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node, path
            assert not ("properties" in node and "additionalProperties" in node), path
            if "properties" in node or "items" in node:
                assert "type" in node, path
            for k, v in node.items():
                if k not in ("oneOf", "anyOf", "enum", "default"):
                    walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(silo_crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walk(schema, "")
    silos = schema["properties"]["spec"]["properties"]["silos"]
    assert silos["x-kubernetes-list-type"] == "map" and silos["x-kubernetes-list-map-keys"] == ["name"]


def test_printer_columns_and_short_name() -> None:
    version = crd_manifest()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Round",
        "Silos",
        "Eval",
        "Epsilon",
        "Age",
    ]
    assert crd_manifest()["spec"]["names"]["shortNames"] == ["fj"]
    assert version["subresources"] == {"status": {}}
