"""Where a VM disk's new volume takes its initial content from: an existing volume (a base image)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from .common import ApiModel

# Volumes the operator manages (VM disks and seeds: lvop-…, ISOImages: iso-…) are never a base: a VM
# must not read another VM's disk, nor an ISOImage of another namespace by its volume name.
_RESERVED_VOLUME_RULE = "!self.name.startsWith('lvop-') && !self.name.startsWith('iso-')"


class PoolVolumeReference(ApiModel):
    """An existing volume in a storage pool of the VM's host."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": _RESERVED_VOLUME_RULE,
         "message": "volumes named lvop-* (VM disks) or iso-* (ISOImages) are managed by the operator and "
                    "cannot be a disk's source"},
    ]})

    pool: str = Field(min_length=1, max_length=253, pattern=r"^[^/\s]+$", description=(
        "Storage pool holding the base volume (subject to the host's allowedPools)."))
    name: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
                      description="Name of the base volume in that pool. It is read, never modified.")


class DiskImageSource(ApiModel):
    """The base image a new volume starts from."""

    volume: PoolVolumeReference = Field(description="An existing volume on the VM's host.")


CloneMode = Literal["backing", "full"]
