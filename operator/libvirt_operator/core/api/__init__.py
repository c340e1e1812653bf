"""API types: the single source of truth for the CRDs in crds/ (see core.crdgen)."""

from .common import GROUP, VERSION, API_VERSION, Condition, ErrorStatus, RemediationLink
from .host import LibvirtHost, LibvirtHostSpec, LibvirtHostStatus
from .iso import ISOImage, ISOImageSpec, ISOImageStatus
from .migration import VirtualMachineMigration
from .snapshot import VirtualMachineRestore, VirtualMachineSnapshot
from .vm import VirtualMachine, VirtualMachineSpec, VirtualMachineStatus

RESOURCES = (LibvirtHost, VirtualMachine, ISOImage, VirtualMachineSnapshot, VirtualMachineRestore,
             VirtualMachineMigration)

__all__ = [
    "GROUP", "VERSION", "API_VERSION", "Condition", "ErrorStatus", "RemediationLink",
    "LibvirtHost", "LibvirtHostSpec", "LibvirtHostStatus",
    "ISOImage", "ISOImageSpec", "ISOImageStatus",
    "VirtualMachine", "VirtualMachineSpec", "VirtualMachineStatus", "RESOURCES",
    "VirtualMachineSnapshot", "VirtualMachineRestore", "VirtualMachineMigration",
]
