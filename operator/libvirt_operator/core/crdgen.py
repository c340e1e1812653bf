"""Generate CustomResourceDefinitions from the pydantic API types.

The models are the single source of truth: crds/ is this module's output, and a test fails when
the committed files drift from it. The generator also refuses fields without a description, so
`kubectl explain` always has something to teach, and refuses unbounded user input: every string in
`spec` needs a maxLength (or an enum), every list a maxItems, every map a maxProperties and every
integer a minimum and a maximum. Bounds keep hostile manifests small and let the apiserver estimate
the cost of CEL rules.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .api import RESOURCES
from .api.common import CATEGORY, GROUP, VERSION, Resource

_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "pattern", "format", "default",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "additionalProperties",
    "nullable", "maxProperties", "minProperties",
}
_BOUNDED_FORMATS = {"date-time", "date", "duration"}  # the apiserver knows their maximum length


class SchemaError(ValueError):
    pass


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        target.update(siblings)  # a field's own description wins over the type's docstring
        return _resolve(target, defs)
    if "anyOf" in schema:
        # Optional[X] is anyOf [X, null]: structural schemas express optionality by `required`.
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"unions are not structural: {schema}")
        merged = _resolve(options[0], defs)
        merged.update({k: v for k, v in schema.items() if k not in ("anyOf", "default")})
        if schema.get("default") is not None:
            merged["default"] = schema["default"]
        return _resolve(merged, defs)
    return schema


def _check_bounds(out: dict[str, Any], path: str) -> None:
    """User input (spec) must be bounded: refuse the schema otherwise, naming the field."""
    for name, sub in (out.get("properties") or {}).items():
        _check_bounds(sub, f"{path}.{name}")
    if isinstance(out.get("items"), dict):
        _check_bounds(out["items"], f"{path}[]")
    if isinstance(out.get("additionalProperties"), dict):
        _check_bounds(out["additionalProperties"], f"{path}{{}}")
    kind = out.get("type")
    if kind == "string" and "maxLength" not in out and "enum" not in out \
            and out.get("format") not in _BOUNDED_FORMATS:
        raise SchemaError(f"{path} is a string without maxLength (or enum)")
    if kind == "array" and "maxItems" not in out:
        raise SchemaError(f"{path} is a list without maxItems")
    if kind == "object" and "additionalProperties" in out and "maxProperties" not in out:
        raise SchemaError(f"{path} is a map without maxProperties")
    if kind == "integer" and ("minimum" not in out or "maximum" not in out):
        raise SchemaError(f"{path} is an integer without minimum and maximum")


def _key_rule(schema: dict[str, Any]) -> dict[str, str] | None:
    """Structural schemas have no propertyNames: a map's key length becomes a CEL rule."""
    limit = (schema.get("propertyNames") or {}).get("maxLength")
    if limit is None:
        return None
    return {"rule": f"self.all(k, k.size() <= {int(limit)})", "message": f"keys must be at most {int(limit)} characters"}


def _structural(schema: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    schema = _resolve(schema, defs)
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in _KEEP or k.startswith("x-kubernetes-")}
    if out.get("default", "") is None:
        del out["default"]
    key_rule = _key_rule(schema)
    if key_rule is not None:
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), key_rule]
    if "properties" in schema:
        out["type"] = "object"
        props = {}
        for name, sub in schema["properties"].items():
            child = _structural(sub, defs, f"{path}.{name}")
            if not child.get("description"):
                raise SchemaError(f"{path}.{name} has no description")
            props[name] = child
        out["properties"] = props
        # Fields with defaults are filled in by the apiserver: not required of the user.
        required = [n for n in schema.get("required", []) if n in props]
        if required:
            out["required"] = required
        else:
            out.pop("required", None)
    if "items" in schema:
        out["items"] = _structural(schema["items"], defs, f"{path}[]")
        out["items"].pop("description", None) if out["items"].get("description") == out.get("description") else None
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(schema["additionalProperties"], defs, f"{path}{{}}")
    if "type" not in out:
        raise SchemaError(f"{path} has no type: {schema}")
    return out


def openapi_schema(resource: type[Resource]) -> dict[str, Any]:
    raw = resource.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    spec = _structural(raw["properties"]["spec"], defs, "spec")
    _check_bounds(spec, "spec")
    status = _structural(raw["properties"]["status"], defs, "status")
    validations = getattr(resource, "spec_validations", None)
    if validations:
        spec["x-kubernetes-validations"] = validations
    return {
        "type": "object",
        "description": resource.info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(resource: type[Resource]) -> dict[str, Any]:
    info = resource.info
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": info.crd_name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced" if info.namespaced else "Cluster",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {k: v for k, v in {
                        "name": c.name, "type": c.type, "jsonPath": c.json_path,
                        "description": c.description or None, "priority": c.priority or None,
                    }.items() if v is not None}
                    for c in info.printer_columns
                ],
                "schema": {"openAPIV3Schema": openapi_schema(resource)},
            }],
        },
    }


def render_all() -> dict[str, str]:
    """File name → YAML text for every CRD (what crds/ must contain)."""
    header = "# Generated by `libvirt-operator crds --write crds/` from the pydantic API types. Do not edit.\n"
    return {
        f"{r.info.crd_name}.yaml": header + yaml.safe_dump(crd(r), sort_keys=False, width=100)
        for r in RESOURCES
    }
