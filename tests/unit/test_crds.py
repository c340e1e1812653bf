"""The CRDs in crds/ are generated from the pydantic API types and must never drift from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from libvirt_operator.core import crdgen
from libvirt_operator.core.api import RESOURCES

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_match_the_models() -> None:
    rendered = crdgen.render_all()
    committed = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert set(committed) == set(rendered), "crds/ has missing or extra files"
    for name, text in rendered.items():
        assert committed[name] == text, (
            f"crds/{name} drifted from the models: run `libvirt-operator crds --write crds/`")


def _walk(schema: dict, path: str):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.info.kind)
def test_every_field_is_described_for_kubectl_explain(resource) -> None:
    schema = crdgen.openapi_schema(resource)
    for section in ("spec", "status"):
        for path, sub in _walk(schema["properties"][section], section):
            if path.endswith("[]"):
                continue
            assert sub.get("description"), f"{resource.info.kind} {path} has no description"


def test_short_names_do_not_collide_with_kubevirt() -> None:
    kubevirt = {"vm", "vms", "vmi", "vmis", "dv", "dvs"}
    for resource in RESOURCES:
        assert not kubevirt & set(resource.info.short_names)
        doc = yaml.safe_load(crdgen.render_all()[f"{resource.info.crd_name}.yaml"])
        assert doc["spec"]["names"]["categories"] == ["libvirt"]
        assert doc["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_generator_refuses_undescribed_fields() -> None:
    from pydantic import Field

    from libvirt_operator.core.api.common import ApiModel, Resource

    class Spec(ApiModel):
        size: int = 1  # no description

    class Bad(Resource):
        info = RESOURCES[0].info
        spec: Spec = Field(description="spec")
        status: Spec | None = Field(default=None, description="status")

    with pytest.raises(crdgen.SchemaError, match="spec.size has no description"):
        crdgen.openapi_schema(Bad)


@pytest.mark.parametrize(("annotation", "message"), [
    ("str", "spec.field is a string without maxLength"),
    ("list[bool]", "spec.field is a list without maxItems"),
    ("dict[str, bool]", "spec.field is a map without maxProperties"),
    ("int", "spec.field is an integer without minimum and maximum"),
])
def test_generator_refuses_unbounded_user_input(annotation: str, message: str) -> None:
    """Every string, list, map and integer in a spec is bounded, so no field of user input is unbounded
    (hostile manifests stay small; the apiserver can estimate the cost of CEL rules)."""
    from pydantic import Field, create_model

    from libvirt_operator.core.api.common import ApiModel, Resource

    SpecModel = create_model("SpecModel", __base__=ApiModel,  # noqa: N806
                             field=(eval(annotation), Field(description="unbounded")))  # noqa: S307 - test literal

    class Bad(Resource):
        info = RESOURCES[0].info
        spec: SpecModel = Field(description="spec")  # type: ignore[valid-type]

    with pytest.raises(crdgen.SchemaError, match=message):
        crdgen.openapi_schema(Bad)


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.info.kind)
def test_every_spec_field_is_bounded(resource) -> None:
    schema = crdgen.openapi_schema(resource)
    for path, sub in _walk(schema["properties"]["spec"], "spec"):
        kind = sub.get("type")
        if kind == "string":
            assert "maxLength" in sub or "enum" in sub, path
        elif kind == "array":
            assert "maxItems" in sub, path
        elif kind == "integer":
            assert "minimum" in sub and "maximum" in sub, path
