"""The error catalog and AppError: every failure the operator reports carries a stable code.

The catalog is the contract with SREs and runbooks (rag/ front matter lists these codes):
codes never change meaning, only new ones are added.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from typing import Any


class ErrorCode(str, enum.Enum):
    VM_NOT_FOUND = "VM_NOT_FOUND"
    ISO_NOT_FOUND = "ISO_NOT_FOUND"
    DATABASE_ERROR = "DATABASE_ERROR"
    LIBVIRT_ERROR = "LIBVIRT_ERROR"
    HOST_NOT_FOUND = "HOST_NOT_FOUND"
    HOST_UNREACHABLE = "HOST_UNREACHABLE"
    HOST_AUTH_FAILED = "HOST_AUTH_FAILED"
    NO_SCHEDULABLE_HOST = "NO_SCHEDULABLE_HOST"
    INSUFFICIENT_RESOURCES = "INSUFFICIENT_RESOURCES"
    STORAGE_POOL_NOT_FOUND = "STORAGE_POOL_NOT_FOUND"
    STORAGE_FULL = "STORAGE_FULL"
    STORAGE_PERMISSION_DENIED = "STORAGE_PERMISSION_DENIED"
    NETWORK_NOT_FOUND = "NETWORK_NOT_FOUND"
    ISO_DOWNLOAD_FAILED = "ISO_DOWNLOAD_FAILED"
    ISO_CHECKSUM_MISMATCH = "ISO_CHECKSUM_MISMATCH"
    ISO_IN_USE = "ISO_IN_USE"
    INVALID_SPEC = "INVALID_SPEC"
    HYPERVISOR_UNSUPPORTED = "HYPERVISOR_UNSUPPORTED"
    LIBVIRT_TIMEOUT = "LIBVIRT_TIMEOUT"
    DOMAIN_CRASHED = "DOMAIN_CRASHED"
    KUBERNETES_API_ERROR = "KUBERNETES_API_ERROR"
    CREDENTIALS_NOT_FOUND = "CREDENTIALS_NOT_FOUND"


@dataclasses.dataclass(frozen=True)
class CodeInfo:
    reason: str  # CamelCase condition reason
    retryable: bool
    summary: str


CATALOG: Mapping[ErrorCode, CodeInfo] = {
    ErrorCode.VM_NOT_FOUND: CodeInfo(
        "VMNotFound", True, "The libvirt domain backing this VirtualMachine does not exist on its host."),
    ErrorCode.ISO_NOT_FOUND: CodeInfo(
        "ISONotFound", True, "A referenced ISOImage does not exist or has no volume on the chosen host."),
    ErrorCode.DATABASE_ERROR: CodeInfo(
        "DatabaseError", True, "A store the operator depends on (the knowledge base) is unavailable."),
    ErrorCode.LIBVIRT_ERROR: CodeInfo(
        "LibvirtError", True, "libvirt reported a failure the operator could not classify further."),
    ErrorCode.HOST_NOT_FOUND: CodeInfo(
        "HostNotFound", True, "The referenced LibvirtHost does not exist."),
    ErrorCode.HOST_UNREACHABLE: CodeInfo(
        "HostUnreachable", True, "The libvirt host cannot be reached at its URI."),
    ErrorCode.HOST_AUTH_FAILED: CodeInfo(
        "HostAuthFailed", False, "The libvirt host rejected the operator's credentials."),
    ErrorCode.NO_SCHEDULABLE_HOST: CodeInfo(
        "NoSchedulableHost", True, "No Ready LibvirtHost matches the placement rules."),
    ErrorCode.INSUFFICIENT_RESOURCES: CodeInfo(
        "InsufficientResources", True, "No matching host has enough free CPU or memory."),
    ErrorCode.STORAGE_POOL_NOT_FOUND: CodeInfo(
        "StoragePoolNotFound", True, "The storage pool does not exist or is not active on the host."),
    ErrorCode.STORAGE_FULL: CodeInfo(
        "StorageFull", True, "The storage pool has no room for the volume."),
    ErrorCode.STORAGE_PERMISSION_DENIED: CodeInfo(
        "StoragePermissionDenied", False, "The host refused access to a storage path."),
    ErrorCode.NETWORK_NOT_FOUND: CodeInfo(
        "NetworkNotFound", True, "A libvirt network or bridge named by an interface does not exist."),
    ErrorCode.ISO_DOWNLOAD_FAILED: CodeInfo(
        "ISODownloadFailed", True, "The install media could not be downloaded from its URL."),
    ErrorCode.ISO_CHECKSUM_MISMATCH: CodeInfo(
        "ChecksumMismatch", False, "The downloaded media does not match the declared checksum."),
    ErrorCode.ISO_IN_USE: CodeInfo(
        "DeletionBlocked", True, "The ISOImage is still used by a VirtualMachine."),
    ErrorCode.INVALID_SPEC: CodeInfo(
        "InvalidSpec", False, "The resource spec is invalid in a way the schema could not catch."),
    ErrorCode.HYPERVISOR_UNSUPPORTED: CodeInfo(
        "HypervisorUnsupported", False, "The host does not offer the requested domain type or feature."),
    ErrorCode.LIBVIRT_TIMEOUT: CodeInfo(
        "LibvirtTimeout", True, "A libvirt call did not finish in time."),
    ErrorCode.DOMAIN_CRASHED: CodeInfo(
        "DomainCrashed", True, "The guest stopped unexpectedly (QEMU crashed or was killed)."),
    ErrorCode.KUBERNETES_API_ERROR: CodeInfo(
        "KubernetesAPIError", True, "A Kubernetes API call failed."),
    ErrorCode.CREDENTIALS_NOT_FOUND: CodeInfo(
        "CredentialsNotFound", True, "The Secret holding the host's credentials is missing or incomplete."),
}

# Keys whose values must never reach status, events or logs.
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|key|auth|credential|cookie)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """Strip user:password@ from any URL inside text."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def safe_context(context: Mapping[str, Any]) -> dict[str, str]:
    """Context fit for status: string values, secrets dropped, URLs without credentials.
    Keys ending in `Ref` name an object (e.g. secretRef: ns/name), never its content, and stay."""
    return {
        str(k): redact(str(v))[:256]
        for k, v in context.items()
        if v is not None and (str(k).endswith("Ref") or not _SECRET_KEY.search(str(k)))
    }


class AppError(Exception):
    """A classified failure. `code` picks the catalog entry; `message` is for humans."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        context: Mapping[str, Any] | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = redact(message)
        self.context = safe_context(context or {})
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    @property
    def info(self) -> CodeInfo:
        return CATALOG[self.code]

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def retryable(self) -> bool:
        return self.info.retryable

    def __repr__(self) -> str:
        return f"AppError({self.code.value}, {self.message!r})"


class OperationAborted(Exception):
    """A long transfer stopped on request (the resource is being deleted, the operator is exiting)."""
