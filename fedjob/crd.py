"""The FederatedJob CustomResourceDefinition, generated from the spec model (one source of truth).

pydantic's JSON schema is turned into a Kubernetes *structural* schema: refs
inlined, `anyOf [X, null]` made `nullable`, numeric bounds in OpenAPI 3.0 form,
free-form maps marked `x-kubernetes-preserve-unknown-fields`. Rules that span
fields and have a structural form are added here (unique silo names as a list
map, exactly-one-of as `oneOf`); the rest are checked by the operator with the
same pydantic model and reported as a condition.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fedjob.silo_spec import SILO_KIND, FederatedSilo
from fedjob.spec import API_VERSION, KIND, FederatedJob

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "federatedjobs"
SILO_PLURAL = "federatedsilos"

# Structural forms of cross-field rules, by model name.
EXTRA_RULES: dict[str, dict[str, Any]] = {
    "ModelSpec": {"oneOf": [{"required": ["path"]}, {"required": ["config"]}]},
    "VolumeSpec": {"oneOf": [{"required": ["persistentVolumeClaim"]}, {"required": ["hostPath"]}]},
}
LIST_MAP_KEYS = {"silos": ["name"]}


def _structural(node: dict[str, Any], defs: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    if "$ref" in node:
        ref = node["$ref"].split("/")[-1]
        inlined = _structural(defs[ref], defs, ref)
        if "description" in node:
            inlined["description"] = node["description"]
        return inlined
    any_of = node.get("anyOf")
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        nullable = _structural(options[0], defs)
        nullable["nullable"] = True
        if "description" in node:
            nullable["description"] = node["description"]
        return nullable
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "additionalProperties", "properties", "items", "const"):
            continue
        if key == "default" and not isinstance(value, bool | int | float | str):
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {}
        for prop, sub in node["properties"].items():
            schema = _structural(sub, defs)
            if prop in LIST_MAP_KEYS and schema.get("type") == "array":
                schema["x-kubernetes-list-type"] = "map"
                schema["x-kubernetes-list-map-keys"] = LIST_MAP_KEYS[prop]
            out["properties"][prop] = schema
    elif node.get("type") == "object":
        extra = node.get("additionalProperties", True)
        if extra is True or extra == {}:
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["additionalProperties"] = _structural(extra, defs)
    if "items" in node:
        out["items"] = _structural(node["items"], defs)
    if name in EXTRA_RULES:
        out.update(EXTRA_RULES[name])
    return out


def openapi_schema(model: type[BaseModel] = FederatedJob) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})
    spec = _structural(raw["properties"]["spec"], defs)
    name_rule = raw["$defs"]["ObjectMeta"]["properties"]["name"]
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only metadata.name may be constrained in a CRD.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": name_rule["maxLength"],
                        "pattern": name_rule["pattern"],
                    }
                },
            },
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


def _crd(
    kind: str, plural: str, short: str, columns: list[dict[str, Any]], schema: dict[str, Any]
) -> dict[str, Any]:
    """A namespaced CRD of the fedjob.io group with one served, stored version and a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "listKind": f"{kind}List",
                "categories": ["fedjob"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_manifest() -> dict[str, Any]:
    columns: list[dict[str, Any]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
        {
            "name": "Silos",
            "type": "string",
            "jsonPath": ".status.silosReady",
            "description": "silos training / silos in the job",
        },
        {
            "name": "Eval",
            "type": "number",
            "jsonPath": ".status.federatedEval.loss",
            "description": "the silos' sample-weighted held-out loss of the latest model",
            "priority": 1,
        },
        {
            "name": "Epsilon",
            "type": "number",
            "jsonPath": ".status.privacy.epsilon",
            "description": "differential privacy spent so far (at status.privacy.delta)",
            "priority": 1,
        },
    ]
    return _crd(KIND, PLURAL, "fj", columns, openapi_schema())


def silo_crd_manifest() -> dict[str, Any]:
    """FederatedSilo: an external silo's side, in its own cluster (fedjob/silo_spec.py)."""
    columns: list[dict[str, Any]] = [
        {"name": "Job", "type": "string", "jsonPath": ".spec.job"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {
            "name": "Certificate",
            "type": "string",
            "jsonPath": ".status.certificateExpires",
            "description": "until when this silo's certificate is valid",
            "priority": 1,
        },
    ]
    return _crd(SILO_KIND, SILO_PLURAL, "fs", columns, openapi_schema(FederatedSilo))
