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
    NAMESPACE_NOT_ALLOWED = "NAMESPACE_NOT_ALLOWED"
    POOL_NOT_ALLOWED = "POOL_NOT_ALLOWED"
    NETWORK_NOT_ALLOWED = "NETWORK_NOT_ALLOWED"
    SNAPSHOT_UNSUPPORTED = "SNAPSHOT_UNSUPPORTED"
    SNAPSHOT_SOURCE_NOT_FOUND = "SNAPSHOT_SOURCE_NOT_FOUND"
    SNAPSHOT_NOT_FOUND = "SNAPSHOT_NOT_FOUND"
    RESTORE_TARGET_RUNNING = "RESTORE_TARGET_RUNNING"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    VOLUME_SHRINK_REFUSED = "VOLUME_SHRINK_REFUSED"
    HOST_OUT_OF_SERVICE = "HOST_OUT_OF_SERVICE"
    MIGRATION_FAILED = "MIGRATION_FAILED"


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
    # Tenancy (LibvirtHost allowedNamespaces/namespaceSelector/allowedPools/allowedNetworks/allowedBridges):
    # not retried on a timer; re-checked as soon as the host or the namespace changes.
    ErrorCode.NAMESPACE_NOT_ALLOWED: CodeInfo(
        "NamespaceNotAllowed", False, "The LibvirtHost does not admit resources of this namespace."),
    ErrorCode.POOL_NOT_ALLOWED: CodeInfo(
        "PoolNotAllowed", False, "The LibvirtHost does not expose the requested storage pool to VMs and images."),
    ErrorCode.NETWORK_NOT_ALLOWED: CodeInfo(
        "NetworkNotAllowed", False, "The LibvirtHost does not expose the requested network or bridge to VMs."),
    # VirtualMachineSnapshot / VirtualMachineRestore (handlers/snapshot.py, handlers/restore.py).
    ErrorCode.SNAPSHOT_UNSUPPORTED: CodeInfo(
        "SnapshotUnsupported", False, "A disk of the VM (or the VM's state) cannot be snapshotted."),
    ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND: CodeInfo(
        "SourceNotFound", True, "The VirtualMachine a snapshot names does not exist, is not on a host yet, or is gone."),
    ErrorCode.SNAPSHOT_NOT_FOUND: CodeInfo(
        "SnapshotNotFound", True, "The VirtualMachineSnapshot a restore names does not exist, is not ready, or its "
                                  "data is gone from the host."),
    ErrorCode.RESTORE_TARGET_RUNNING: CodeInfo(
        "TargetRunning", True, "A restore waits for its VirtualMachine to be stopped (runStrategy Halted)."),
    # Disks from images (VirtualMachine spec.disks[].volume.source).
    ErrorCode.IMAGE_NOT_FOUND: CodeInfo(
        "ImageNotFound", True, "The base volume a disk is cloned from does not exist on the VM's host."),
    ErrorCode.VOLUME_SHRINK_REFUSED: CodeInfo(
        "VolumeShrinkRefused", False, "A disk's size is smaller than its base image: volumes are never shrunk."),
    ErrorCode.HOST_OUT_OF_SERVICE: CodeInfo(
        "HostOutOfService", True,
        "The VM's host is declared out of service and the VM stays placed there (hostFailurePolicy Wait, or "
        "disks that cannot follow it to another host)."),
    ErrorCode.MIGRATION_FAILED: CodeInfo(
        "MigrationFailed", False,
        "A live migration was refused or failed; it was rolled back and the VM keeps running on its host."),
}

# Keys whose values must never reach status, events or logs.
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|key|auth|credential|cookie)", re.IGNORECASE)
# Quantifiers are bounded: redact() runs on arbitrary (possibly huge) error text and must stay linear.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]{0,31}://)[^/@\s]{1,1024}@", re.IGNORECASE)
# PEM private keys (RSA, EC, OpenSSH, PKCS#8, encrypted), also when cut off before their END line.
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL)
# JSON Web Tokens (Kubernetes ServiceAccount tokens among them): header.payload.signature.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")  # linear: no overlap
# Authorization: Bearer x / Basic x / token x, and a bare "Bearer x" anywhere.
_AUTH_HEADER = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization\s*[:=]\s*)(?P<quote>[\"']?)(?P<scheme>(?:bearer|basic|token|digest|negotiate)\s+)?"
    r"[^\s\"',;]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(?P<scheme>bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# A query parameter whose name says it carries a secret: ?password=, &access_token=, sig=, X-Amz-Signature=…
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][A-Za-z0-9_.-]{0,64}?(?:pass(?:word|wd)?|pwd|secret|token|sig(?:nature)?|key|auth|credential"
    r"|session)[A-Za-z0-9_.-]{0,64}=)[^&#\s\"'<>]*", re.IGNORECASE)
# The same in free text ("password=x", "token: x", "client_secret = x", '"password": "x"').
_TEXT_SECRET = re.compile(
    r"(?P<name>\b(?:[A-Za-z0-9_-]{0,32}[_-])?(?:password|passwd|pwd|secret|token|api[_-]?key|passphrase)[\"']?\s*[:=]\s*)"
    r"(?:\"[^\"]*\"|'[^']*'|(?!\*\*\*)[^\s\"',;&]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Scrub credentials from free text before it reaches status, conditions, Events or logs: URL
    userinfo (user:password@), secret-looking query parameters (?password=, access_token=, sig=),
    Authorization headers and bearer tokens, key=value secrets, JWTs and PEM private keys."""
    text = _PEM_PRIVATE_KEY.sub(r"-----BEGIN \1PRIVATE KEY-----***-----END \1PRIVATE KEY-----", text)
    text = _JWT.sub("***", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['name']}{m['quote']}{m['scheme'] or ''}***", text)
    text = _BEARER.sub(r"\g<scheme> ***", text)
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    text = _QUERY_SECRET.sub(r"\g<name>***", text)
    return _TEXT_SECRET.sub(r"\g<name>***", text)


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
