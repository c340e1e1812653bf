"""ISOImage: install media imported from a URL into the storage pools of libvirt hosts."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from ..quantity import QUANTITY_PATTERN, parse_quantity
from .common import (
    OBJECT_NAME_PATTERN,
    ApiModel, Condition, ErrorStatus, LocalObjectReference, PrinterColumn, Resource, ResourceInfo,
    age_column, conditions_field, observed_generation_field, quantity_rules, ready_column, reason_column,
)
from .vm import HostSelector

CHECKSUM_PATTERN = r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$"


class ISOSource(ApiModel):
    """Where to download the image from."""

    url: str = Field(description="http:// or https:// URL of the image. Immutable.",
                     pattern=r"^https?://[^\s]+$", max_length=4096)
    ca_bundle_secret_ref: LocalObjectReference | None = Field(
        default=None, description="Secret (key ca.crt) with the CA bundle to trust for https.")
    auth_secret_ref: LocalObjectReference | None = Field(
        default=None, description="Secret (key authorization) with the HTTP Authorization header value.")


class ISOTargets(ApiModel):
    """Which hosts receive a copy."""

    host_names: list[Annotated[str, Field(max_length=253, pattern=OBJECT_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=64, description="Explicit LibvirtHost names (at most 64).")
    host_selector: HostSelector | None = Field(
        default=None, description="Hosts with these labels. Without names or selector: every Ready host.")


class ISOImageSpec(ApiModel):
    """Install media to import."""

    source: ISOSource = Field(description="Where to download the image from.")
    checksum: str | None = Field(default=None, pattern=CHECKSUM_PATTERN, max_length=135,
                                 description="sha256:<hex> or sha512:<hex> of the image. Immutable.")
    skip_checksum_verification: bool = Field(
        default=False, description="Explicit opt-out of checksum verification (not recommended).")
    targets: ISOTargets | None = Field(default=None, description="Target hosts; default: every Ready host.")
    pool: str | None = Field(default=None, max_length=253,
                             description="Storage pool on the hosts; default: each host's defaultPool.")
    max_size: str | None = Field(
        default=None, pattern=QUANTITY_PATTERN, max_length=32,
        description="Largest image accepted, as a quantity (e.g. 8Gi): a larger Content-Length is refused "
                    "before the download and the body is cut there. Can only lower the operator's limit "
                    "(--download-max-size, default 16Gi).")

    @field_validator("max_size")
    @classmethod
    def _positive_size(cls, value: str | None) -> str | None:
        if value is not None and parse_quantity(value) < 1:
            raise ValueError("maxSize must be at least 1 byte")
        return value


class Progress(ApiModel):
    """Download progress."""

    bytes_done: int = Field(ge=0, description="Bytes downloaded so far.")
    bytes_total: int | None = Field(default=None, ge=0, description="Total bytes, when the server says.")
    percent: int | None = Field(default=None, ge=0, le=100, description="Percent done.")


class HostImageStatus(ApiModel):
    """The image's state on one host."""

    host: str = Field(description="LibvirtHost name.")
    phase: Literal["Pending", "Uploading", "Ready", "Failed", "Deleting"] = Field(description="State on that host.")
    pool: str | None = Field(default=None, description="Storage pool.")
    volume: str | None = Field(default=None, description="Volume name in the pool.")
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the uploaded volume.")
    message: str | None = Field(default=None, description="Details, when not Ready.")


class RetryStatus(ApiModel):
    """Retry bookkeeping for failed imports."""

    count: int = Field(ge=0, description="Failed attempts so far.")
    next_retry_time: dt.datetime | None = Field(default=None, description="When the next attempt starts.")


class ISOImageStatus(ApiModel):
    """Observed state of the import."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    phase: Literal["Pending", "Downloading", "Uploading", "Ready", "Failed", "Deleting"] | None = Field(
        default=None, description="Overall phase, for humans.")
    progress: Progress | None = Field(default=None, description="Download progress.")
    size_bytes: int | None = Field(default=None, ge=0, description="Image size.")
    verified_checksum: str | None = Field(default=None, description="Checksum verified after download.")
    hosts: list[HostImageStatus] = Field(default_factory=list, description="Per-host state.")
    retry: RetryStatus | None = Field(default=None, description="Retries of a failing import.")
    error: ErrorStatus | None = Field(default=None, description="The last failure; cleared once healthy.")


class ISOImage(Resource):
    """Install media imported onto libvirt hosts."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="ISOImage", plural="isoimages", singular="isoimage", short_names=("iso",),
        namespaced=True, description="Install media downloaded, verified and uploaded to libvirt hosts.",
        printer_columns=(
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Progress", ".status.progress.percent", type="integer", description="Percent downloaded."),
            ready_column(),
            reason_column(),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = [
        {"rule": "has(self.checksum) || self.skipChecksumVerification",
         "message": "checksum is required (sha256:<hex> or sha512:<hex>) unless skipChecksumVerification is true"},
        {"rule": "self.source.url == oldSelf.source.url", "message": "source.url is immutable"},
        {"rule": "has(self.checksum) == has(oldSelf.checksum) && (!has(self.checksum) || self.checksum == oldSelf.checksum)",
         "message": "checksum is immutable"},
        *quantity_rules("maxSize", "1", "1Ei"),
    ]

    spec: ISOImageSpec = Field(description="Image source and targets.")
    status: ISOImageStatus | None = Field(default=None, description="Observed state of the import.")
