"""Types shared by every resource: base model, conditions, error status, resource descriptors."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "virt.libvirt-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The aggregated API the operator serves itself (the console: handlers/console_api.py).
SUBRESOURCES_GROUP = f"subresources.{GROUP}"
SUBRESOURCES_GROUP_VERSION = f"{SUBRESOURCES_GROUP}/v1alpha1"
CATEGORY = "libvirt"
# A Kubernetes object name (DNS-1123 subdomain) and a namespace name (DNS-1123 label).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
FINALIZER = f"{GROUP}/finalizer"
FORCE_RELEASE_ANNOTATION = f"{GROUP}/force-release"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields ignored (the schema prunes them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition), so kstatus, Argo CD and Flux read health."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Ready, Reconciling, Stalled.",
                      max_length=316)
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    reason: str = Field(
        description="Programmatic identifier of the last transition, CamelCase (e.g. HostUnreachable).",
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", description="Human-readable details of the transition.",
                         max_length=32768)
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was set for.")
    last_transition_time: dt.datetime = Field(
        description="Last time the condition's status changed.")


CONDITIONS_EXTRA = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


def conditions_field() -> Any:
    return Field(default_factory=list, description=(
        "Standard conditions. Ready: the resource is in its desired state. Reconciling: the "
        "operator is working towards it. Stalled: it cannot progress without a change."),
        json_schema_extra=CONDITIONS_EXTRA)


def observed_generation_field() -> Any:
    return Field(default=None, ge=0,
                 description="The .metadata.generation the operator last acted on.")


class RemediationLink(ApiModel):
    """A runbook that explains the error and how to fix it."""

    title: str = Field(description="Runbook title.")
    url: str = Field(description="Link to the runbook.")
    score: float = Field(description="Relevance to this error, higher is better.")


class ErrorStatus(ApiModel):
    """The last failure, with a stable code and where to read about it. Cleared once healthy."""

    code: str = Field(description="Stable error code, e.g. HOST_UNREACHABLE (see the runbooks).")
    message: str = Field(description="What went wrong, in one human sentence.")
    context: dict[str, str] = Field(default_factory=dict,
                                    description="Safe details (host, operation, …); never secrets.")
    since: dt.datetime = Field(description="When this error was first seen.")
    remediation: list[RemediationLink] = Field(
        default_factory=list, description="Runbooks most relevant to this error, best first.")


def quantity_rules(field: str, minimum: str, maximum: str) -> list[dict[str, str]]:
    """CEL rules (Kubernetes' quantity library) bounding a quantity-valued field of the object they sit on.
    A malformed quantity is left to the field's pattern, which reports it."""
    value = f"quantity(self.{field})"
    guard = f"!has(self.{field}) || !isQuantity(self.{field}) || "
    return [
        {"rule": f"{guard}{value}.compareTo(quantity('{minimum}')) >= 0",
         "message": f"{field} must be at least {minimum}", "fieldPath": f".{field}"},
        {"rule": f"{guard}{value}.compareTo(quantity('{maximum}')) <= 0",
         "message": f"{field} must be at most {maximum}", "fieldPath": f".{field}"},
    ]


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(description="Name of the referenced object.", min_length=1, max_length=253,
                      pattern=OBJECT_NAME_PATTERN)


class SecretReference(ApiModel):
    """A reference to a Secret in a given namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN)
    namespace: str = Field(description="Namespace of the Secret.", min_length=1, max_length=63,
                           pattern=NAMESPACE_PATTERN)


@dataclasses.dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    priority: int = 0
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ResourceInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    namespaced: bool
    description: str
    printer_columns: tuple[PrinterColumn, ...]

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def ready_column() -> PrinterColumn:
    return PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status',
                         description="Whether the resource is Ready.")


def reason_column() -> PrinterColumn:
    return PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1,
                         description="Why it is (not) Ready.")


def age_column() -> PrinterColumn:
    return PrinterColumn("Age", ".metadata.creationTimestamp", type="date")


class Resource(ApiModel):
    """A custom resource: subclasses set `info` and declare spec/status."""

    info: ClassVar[ResourceInfo]
