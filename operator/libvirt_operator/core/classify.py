"""Classify raw error text (libvirt, QEMU, HTTP, Kubernetes, OS) into a catalog ErrorCode.

Pure text rules, no I/O and no libvirt import. Two entry points:

* ``classify_text(text)``: for any raw message (``libvirt-operator explain``, wrapped exceptions).
  A text that names its code — a bare code (``ISO_CHECKSUM_MISMATCH``), a condition reason
  (``HostUnreachable``) or a status message copied from ``describe`` (``[CODE] message``) — gets
  that code (``explicit_code``).
* ``classify_libvirt(error_name, text)``: for the libvirt adapter. It maps the symbolic libvirt
  error number first (``VIR_ERR_NO_DOMAIN`` -> VM_NOT_FOUND ...) and uses the text rules only for
  numbers that are ambiguous (``VIR_ERR_INTERNAL_ERROR``, ``VIR_ERR_SYSTEM_ERROR`` ...). The adapter
  turns libvirt's number into a name with ``libvirt_error_names(libvirt)`` once at import time.

Rules are ordered: the first match wins, so specific phrases come before generic ones (an SSH
"Permission denied (publickey)" is an auth failure, not a storage permission problem; a QEMU
"process exited while connecting to monitor: ... Cannot allocate memory" is a resource problem,
not a crash).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from libvirt_operator.core.errors import CATALOG, ErrorCode

__all__ = [
    "LIBVIRT_AMBIGUOUS",
    "LIBVIRT_DEFINITIVE",
    "RULES",
    "Rule",
    "classify_libvirt",
    "classify_text",
    "explicit_code",
    "is_generic",
    "libvirt_error_names",
    "looks_like_http",
    "looks_like_kubernetes",
    "looks_like_libvirt",
    "match_rule",
]

_FLAGS = re.IGNORECASE | re.MULTILINE


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    code: ErrorCode
    pattern: re.Pattern[str]


def _rule(name: str, code: ErrorCode, *alternatives: str) -> Rule:
    return Rule(name, code, re.compile("|".join(f"(?:{a})" for a in alternatives), _FLAGS))


E = ErrorCode

# Ordered: first match wins.
RULES: tuple[Rule, ...] = (
    # --- operator / Kubernetes object level: unambiguous phrases --------------------------------
    _rule("knowledge-base", E.DATABASE_ERROR,
          r"\blance(db)?\s*error\b|\blancedb\b|\bLanceError\b",
          r"\bknowledge base\b[^\n]*\b(unavailable|missing|error|failed|not found)",
          r"\brag-db\b",
          r"\bTable '[^']+' was not found",
          r"\bdatabase is locked\b|\bsqlite3?\.\w*Error\b"),
    _rule("iso-checksum", E.ISO_CHECKSUM_MISMATCH,
          r"\b(checksum|digest|hash)\s+mismatch",
          r"\b(sha(1|224|256|384|512)|md5)(sum)?\s+mismatch",
          r"computed checksums? did not match",
          r"\.iso:\s*FAILED\b",
          r"\bdownloaded image's (sha\d+|md5) is\b",
          r"\bthe spec declares\b",
          r"checksum\b.*\bdoes not match"),
    _rule("iso-in-use", E.ISO_IN_USE,
          r"\bISOImage\b.*\b(in use|used|referenced)\s+by\b",
          r"\b(in use|still used|still referenced)\s+by\s+(\d+\s+)?VirtualMachine",
          r"\bDeletionBlocked\b"),
    # LibvirtHost tenancy (reconcile.plan host_denial/image_denial): the operator's own sentences.
    _rule("namespace-not-allowed", E.NAMESPACE_NOT_ALLOWED,
          r"\bdoes not admit namespace\b",
          r"\bNamespaceNotAllowed\b",
          r"\bnamespace \S+ is not (allowed|admitted) (on|by)\b"),
    _rule("pool-not-allowed", E.POOL_NOT_ALLOWED,
          r"\bdoes not expose storage pool\b",
          r"\bPoolNotAllowed\b",
          r"\bstorage pool \S+ is not (allowed|exposed)\b"),
    _rule("network-not-allowed", E.NETWORK_NOT_ALLOWED,
          r"\bdoes not expose (network|bridge)\b",
          r"\bNetworkNotAllowed\b",
          r"\b(network|bridge) \S+ is not (allowed|exposed)\b"),
    # VM snapshots (reconcile.snapshot, handlers.snapshot) and libvirt's own snapshot refusals.
    _rule("snapshot-unsupported", E.SNAPSHOT_UNSUPPORTED,
          r"\bonly qcow2 file disks can be snapshotted\b",
          r"\bno qcow2 disk to snapshot\b",
          r"\bcannot have internal snapshots\b",
          r"\binternal snapshots? (of|for) (a VM with pflash|disk \S+ unsupported)",
          r"\brequire external disk snapshots\b",
          r"\binternal snapshot of a running VM must include the memory state\b",
          r"\bSnapshotUnsupported\b"),
    _rule("restore-target-running", E.RESTORE_TARGET_RUNNING,
          r"\bthe restore runs once it is stopped\b",
          r"\ba restore needs it stopped\b",
          r"\bwould start it during the restore\b",
          r"\bgave up \(targetReadinessPolicy\b"),
    _rule("snapshot-missing", E.SNAPSHOT_NOT_FOUND,
          r"\bno domain snapshot with matching name\b",
          r"\bDomain snapshot not found\b",
          r"\bVirtualMachineSnapshot \S+ (does not exist|is not ready to use|failed|is being deleted)",
          r"\bthe snapshot went with the old VM's disks\b",
          r"\bsnapshot lvop-snap-\S+ no longer exists\b"),
    _rule("snapshot-source-missing", E.SNAPSHOT_SOURCE_NOT_FOUND,
          r"\bthis snapshot inside them\b",
          r"\bVirtualMachine \S+ is not on a host yet\b",
          r"\bVirtualMachine \S+ was recreated while the snapshot\b",
          r"\bVirtualMachine \S+'s domain is gone from\b",
          r"\bVirtualMachine \S+ has no domain on \S+ yet\b"),
    # Disks from images (reconcile/vm_volumes.py via adapters/libvirt/clone.py): the operator's own sentences.
    _rule("image-not-found", E.IMAGE_NOT_FOUND,
          r"\bbase (volume|image) \S+ (of|for) disk\b[^\n]*\b(does not exist|not found|missing)",
          r"\bImageNotFound\b"),
    # Live migration (handlers/migration.py, adapters/libvirt/migrate_vm.py): the operator's own sentences.
    _rule("migration-failed", E.MIGRATION_FAILED,
          r"\bthe VM keeps running on its host\b",
          r"\bmigration out: canceled\b",
          r"\btarget LibvirtHost \S+ (is not Ready|does not exist|refuses the VM)",
          r"\bMigrationFailed\b",
          r"\b(live )?migration\b[^\n]*\b(failed|refused|aborted|not supported)"),
    # Host failure policy (reconcile/vm_failover.py): the operator's own sentences.
    _rule("host-out-of-service", E.HOST_OUT_OF_SERVICE,
          r"\bis (declared )?out of service\b",
          r"\bcannot follow (it|the VM)\b",
          r"\bHostOutOfService\b",
          r"\bspec\.outOfService\b"),
    _rule("volume-shrink", E.VOLUME_SHRINK_REFUSED,
          r"\bvolumes are never shrunk\b",
          r"\bsmaller than (its|the) base (volume|image)\b",
          r"\bVolumeShrinkRefused\b",
          r"\bshrinking (the )?(volume|image|disk)\b[^\n]*\b(refused|not supported|not allowed)"),
    _rule("credentials-missing", E.CREDENTIALS_NOT_FOUND,
          r"\bsecrets?\s+\\?\"[^\"\\]+\\?\"\s+not\s+found",
          r"\bsecret\s+\S+\s+(has no|is missing|lacks)\s+(the\s+)?(key|data|field)",
          r"\bsecret\b[^\n]*\b(not found|does not exist|is missing)",
          r"credentialsSecretRef\b[^\n]*\b(not found|missing|names no|does not exist|empty)",
          r"\bno credentials (found|configured)"),
    _rule("host-object-missing", E.HOST_NOT_FOUND,
          r"\blibvirthosts?(\.virt\.libvirt-operator\.io)?\s+\\?\"[^\"\\]+\\?\"\s+not\s+found",
          r"\bLibvirtHost\s+\\?\"?[\w.-]+\\?\"?\s+(not found|does not exist)",
          r"\bLibvirtHost \S+ (named by|named in|the VM is placed on)\b[^\n]*\bdoes not exist",
          r"\bLibvirtHost \S+ is gone\b",
          r"^host \S+ was removed\b",
          r"\bno such LibvirtHost\b"),
    _rule("iso-object-missing", E.ISO_NOT_FOUND,
          r"\bisoimages?(\.virt\.libvirt-operator\.io)?\s+\\?\"[^\"\\]+\\?\"\s+not\s+found",
          r"\bISOImage\s+\S+\s+(not found|does not exist|is not ready|has no volume)",
          r"\bISOImage\s+\S+\s+for disk\s+\S+\s+(does not exist|is not Ready)",
          r"\bvolume \S+ of ISOImage\b[^\n]*\bmissing",
          r"no storage vol with matching (name|path|key) '[^']*\.iso'"),
    _rule("spec-rejected-by-apiserver", E.INVALID_SPEC,
          r"\bis invalid:\s*(spec|metadata)\.",
          r"\bInvalid value:\s",
          r"\bUnsupported value:\s",
          r"\bRequired value\b"),
    _rule("spec-rejected-by-operator", E.INVALID_SPEC,
          r"\binvalid (\w+ )?spec\b",
          r"\bchecksum must be\b",
          r"\bspec\.\S+ is required\b",
          r"does not hold a valid PEM",
          r"\bunsafe volume name\b",
          r"\bnot a quantity\b"),
    _rule("download-cache", E.ISO_DOWNLOAD_FAILED,
          r"\bdownload cache file\b",
          r"\brefusing to download from\b",
          r"\bserver answered HTTP \d{3}",
          r"^TLS verification failed\b"),
    _rule("no-schedulable-host", E.NO_SCHEDULABLE_HOST,
          r"\bno schedulable hosts?\b",
          r"\bno (ready |matching )?LibvirtHosts?\s+(matches|match|is available|are available)",
          r"\b0/\d+\s+(LibvirtHosts|hosts)\s+(are\s+)?available",
          r"\b0 hosts? available\b",
          r"\bno LibvirtHost is Ready\b",
          r"^LibvirtHost \S+ is not Ready\b",
          r"\bunschedulable\b"),
    # --- Kubernetes API ------------------------------------------------------------------------
    _rule("kubernetes-api", E.KUBERNETES_API_ERROR,
          r"\(\d{3}\)\s*\n?\s*Reason:",
          r"\betcdserver:",
          r"the object has been modified; please apply your changes",
          r"\bkubernetes\.default(\.svc)?\b",
          r"\bsystem:serviceaccount:",
          r"\bcannot (get|list|watch|create|update|patch|delete) resource\b",
          r"the server could not find the requested resource",
          r"\bfailed calling webhook\b",
          r"\badmission webhook\b",
          r"\bAPI(Forbidden|Conflict|NotFound|Unauthorized)?Error\b",
          r"\bapiserver\b",
          r"\bCannot connect to host \S+:(443|6443) ssl:",
          r"^(reading|listing|patching|creating|deleting|watching|getting|updating)\b[^\n]*:\s+(HTTP \d{3}\b|not found$)"),
    # --- libvirt connection: auth before reachability ------------------------------------------
    _rule("host-auth", E.HOST_AUTH_FAILED,
          r"\bauthentication (failed|unavailable|cancell?ed|required)",
          r"Permission denied \((publickey|password|keyboard-interactive|gssapi)",
          r"Host key verification failed",
          r"\bpolkit\b",
          r"\bSASL\(",
          r"\bno worthy mechs\b",
          r"verify (the )?(TLS )?peer|peer's certificate|peer did not send any certificate",
          r"\b(client|server) certificate\b[^\n]*\b(expired|not yet active|not trusted|invalid|revoked|failed)",
          r"\btls_allowed_dn_list\b",
          r"\boperation forbidden\b",
          r"\bread only access prevents\b",
          r"\baccess denied\b[^\n]*\b(virConnect|virDomain|polkit|libvirt)",
          r"\bUnable to read TLS confirmation\b"),
    _rule("host-unreachable", E.HOST_UNREACHABLE,
          r"unable to connect to server at '",
          r"Failed to connect socket to '",
          r"\bCannot (recv|write) data\b",
          r"End of file while reading data",
          r"keepalive timeout",
          r"client socket is closed",
          r"\bssh: (connect to host|Could not resolve hostname)",
          r"Unable to resolve address '[^']+' service '",
          r"qemu\+(ssh|tcp|tls)://\S*[^\n]*(Connection refused|No route to host|timed out|Name or service not known|Network is unreachable)",
          r"\bcannot (connect|reach)\b[^\n]*\blibvirt\b",
          r"\bhost \S+ is unreachable\b",
          r"\bno connection to LibvirtHost\b",
          r"\bDisconnected from \S+ due to\b"),
    # --- host capabilities (before storage permission / crash: kvm + Permission denied) ---------
    _rule("hypervisor", E.HYPERVISOR_UNSUPPORTED,
          r"could not find capabilities for",
          r"Domain requires KVM",
          r"KVM kernel module",
          r"failed to initialize kvm",
          r"/dev/kvm\b",
          r"CPU is incompatible with host CPU",
          r"does not provide required features",
          r"guest CPU doesn't match specification",
          r"Unable to find '\w+' firmware",
          r"does not support (virt type|machine type|domain type|virtualization type)",
          r"this QEMU (binary )?does not support",
          r"\bhost (doesn't|does not) support\b",
          r"not supported by the connection driver",
          r"\bhypervisor does not support\b",
          r"\boffers no usable KVM\b",
          r"\bnot supported by (the )?hypervisor\b"),
    # --- a QEMU killed by the kernel is a crash, even though memory was short --------------------
    _rule("oom-killed", E.DOMAIN_CRASHED,
          r"Killed process \d+ \(qemu",
          r"qemu\S* invoked oom-killer"),
    _rule("resources", E.INSUFFICIENT_RESOURCES,
          r"Cannot allocate memory",
          r"cannot set up guest memory",
          r"unable to map backing store for guest RAM",
          r"\binsufficient (resources|memory|cpu|capacity|hugepages)",
          r"\bnot enough (free )?(memory|cpus?|vcpus|hugepages)",
          r"\bhave enough free (memory|cpu)",
          r"\bhas \d+\s*\S*\s+free memory\b",
          r"\bhas \d+ CPUs and \d+ MiB free\b",
          r"\bout of memory\b(?![^\n]*Killed process)"),
    # --- storage ------------------------------------------------------------------------------
    _rule("storage-full", E.STORAGE_FULL,
          r"No space left on device",
          r"\bENOSPC\b|\benospc\b",
          r"\[Errno 28\]",
          r"\bnot enough space\b",
          r"\bDisk quota exceeded\b",
          r"\bpool \S+ (is full|has not enough space)"),
    _rule("storage-pool", E.STORAGE_POOL_NOT_FOUND,
          r"Storage pool not found",
          r"no storage pool with matching",
          r"storage pool '?[^'\s]+'? is not active",
          r"failed to get pool\b",
          r"cannot open directory '[^']+': No such file or directory",
          r"\bpool '[^']+' (not found|does not exist)"),
    _rule("iso-file-missing", E.ISO_NOT_FOUND,
          r"'[^'\n]*\.iso'[^\n]*No such file or directory",
          r"\.iso\b[^\n]*\bnot found\b"),
    _rule("storage-permission", E.STORAGE_PERMISSION_DENIED,
          r"\(as uid:\d+, gid:\d+\)",
          r"unable to set security context",
          r"\bsvirt_\w+",
          r"\bAppArmor\b",
          r"\bvirt_image_t\b",
          r"(storage file|Could not open|cannot open file|cannot access|Cannot access)[^\n]*(Permission denied|Operation not permitted)",
          r"\[Errno 13\] Permission denied",
          r"'/[^'\n]+'[^\n]*: (Permission denied|Operation not permitted|Read-only file system)"),
    _rule("network", E.NETWORK_NOT_FOUND,
          r"Network not found",
          r"no network with matching",
          r"network '[^']+' is not active",
          r"failed to get network\b",
          r"Cannot get interface MTU",
          r"Unable to add bridge \S+ port",
          r"\bbridge\b[^\n]*No such device",
          r"No such device[^\n]*\b(bridge|br\d+|tap|vnet|macvtap)",
          r"no interface with matching",
          r"\binterface\b[^\n]*No such device",
          r"Failed to apply firewall rules"),
    _rule("domain-missing", E.VM_NOT_FOUND,
          r"Domain not found",
          r"no domain with matching (name|uuid|id)",
          r"failed to get domain\b",
          r"\bdomain '[^']+' (does not exist|not found)"),
    # --- downloads over HTTP ------------------------------------------------------------------
    _rule("download", E.ISO_DOWNLOAD_FAILED,
          r"\b(Client|Server) error '\d{3}",
          r"\bfor url '?https?://",
          r"CERTIFICATE_VERIFY_FAILED",
          r"\bhttpx\.",
          r"peer closed connection without sending complete message body",
          r"\bwhile downloading\b",
          r"\bdownload(ing)?\b[^\n]*\b(failed|error|timed out|interrupted)",
          r"\b(Read|Connect|Pool|Write)Timeout\b",
          r"\bHTTP(/\d(\.\d)?)?\s+[45]\d\d\b",
          r"\bcannot resolve host\b",
          r"\bredirect(s|ed)?\b[^\n]*\b(http|URL|Location)",
          r"\bURLs with a host\b",
          r"\bHTTPS?ConnectionPool\(|Max retries exceeded with url"),
    # --- domain lifecycle -----------------------------------------------------------------------
    _rule("crashed", E.DOMAIN_CRASHED,
          r"qemu unexpectedly closed the monitor",
          r"process exited while connecting to monitor",
          r"\bcrashed\b",
          r"\bpanicked\b|\bguest panic",
          r"terminating on signal \d+",
          r"\bQEMU (process )?(exited|died|quit) unexpectedly",
          r"\bshut off \(crashed\)"),
    _rule("timeout", E.LIBVIRT_TIMEOUT,
          r"Timed out during operation",
          r"cannot acquire state change lock",
          r"Guest agent is not responding",
          r"\bdid not finish within \d+",
          r"\bagent is not connected\b",
          r"\bvir\w+\b[^\n]*\btimed out\b",
          r"\blibvirt\b[^\n]*\btimed out\b",
          r"\btimed out\b[^\n]*\blibvirt\b"),
    # --- spec problems detected by libvirt or the operator --------------------------------------
    _rule("invalid-spec", E.INVALID_SPEC,
          r"\bXML error\b",
          r"XML document failed to validate",
          r"\binvalid spec\b",
          r"\bunsupported configuration\b",
          r"\binvalid argument\b",
          r"Maximum CPUs greater than",
          r"\bvalidation (error|failed)\b"),
)

_LIBVIRT_HINTS = re.compile(
    r"libvirt|\bvirsh\b|\bqemu|\bvir[A-Z]\w+|internal error:|operation failed:|"
    r"Requested operation is not valid|\bdomain\b|\bvirtqemud\b|\bkvm\b|\bstorage (pool|vol)",
    re.IGNORECASE,
)
_HTTP_HINTS = re.compile(
    r"https?://|\bHTTP(/\d(\.\d)?)?\s+\d{3}\b|\bhttpx\b|\b(Not Found|Forbidden|Bad Gateway|"
    r"Service Unavailable|Gateway Timeout)\b",
    re.IGNORECASE,
)
_KUBERNETES_HINTS = re.compile(
    r"\bkubernetes\b|\bkubectl\b|\bkopf\b|\bapiVersion\b|\.k8s\.io\b|\bnamespace\b|"
    r"\bvirt\.libvirt-operator\.io\b|\b(Conflict|Unauthorized|Forbidden)\b.*\bReason\b",
    re.IGNORECASE,
)


def match_rule(text: str) -> Rule | None:
    """The first rule matching text, or None."""
    if not text:
        return None
    for rule in RULES:
        if rule.pattern.search(text):
            return rule
    return None


def looks_like_libvirt(text: str) -> bool:
    return bool(_LIBVIRT_HINTS.search(text or ""))


def looks_like_http(text: str) -> bool:
    return bool(_HTTP_HINTS.search(text or ""))


def looks_like_kubernetes(text: str) -> bool:
    return bool(_KUBERNETES_HINTS.search(text or ""))


_BY_NAME = {c.value: c for c in ErrorCode} | {CATALOG[c].reason.lower(): c for c in ErrorCode}
_TAGGED = re.compile(r"\[([A-Z][A-Z0-9_]+)\]|\b(?i:code):\s*([A-Z][A-Z0-9_]+)\b")
_BARE = re.compile(r"^\s*[\"'`]?([A-Za-z][A-Za-z0-9_-]*)[\"'`]?\s*[.:]?\s*$")


def explicit_code(text: str) -> ErrorCode | None:
    """The code a text names itself: ``ISO_CHECKSUM_MISMATCH`` (any case, ``-`` for ``_``),
    ``HostUnreachable`` (a condition reason), ``Reason: HostUnreachable``, ``[CODE] message`` as
    in a Ready condition's message or an Event, or ``Code: CODE`` as ``describe`` prints
    status.error. None when the text names no code."""
    if not text:
        return None
    for m in _TAGGED.finditer(text):
        if (m.group(1) or m.group(2)) in _BY_NAME:
            return _BY_NAME[m.group(1) or m.group(2)]
    m = _BARE.match(re.sub(r"^\s*reason:\s*", "", text, flags=re.IGNORECASE))
    if m:
        word = m.group(1)
        return _BY_NAME.get(word.upper().replace("-", "_")) or _BY_NAME.get(word.lower())
    return None


def is_generic(code: ErrorCode) -> bool:
    """LIBVIRT_ERROR says only where an error came from, not what to do about it."""
    return code == ErrorCode.LIBVIRT_ERROR


def classify_text(text: str, default: ErrorCode = ErrorCode.LIBVIRT_ERROR) -> ErrorCode:
    """Map raw error text to a catalog code.

    Rules first; then by origin: libvirt-looking text is LIBVIRT_ERROR, Kubernetes-looking text
    KUBERNETES_API_ERROR, HTTP-looking text ISO_DOWNLOAD_FAILED (the operator's only HTTP client
    fetches install media). Anything else gets ``default`` (LIBVIRT_ERROR: the catalog has no
    "unknown" code and almost every unexplained failure of this operator comes from a host).
    """
    named = explicit_code(text)
    if named is not None:
        return named
    rule = match_rule(text)
    if rule is not None:
        return rule.code
    if looks_like_libvirt(text):
        return ErrorCode.LIBVIRT_ERROR
    if looks_like_kubernetes(text):
        return ErrorCode.KUBERNETES_API_ERROR
    if looks_like_http(text):
        return ErrorCode.ISO_DOWNLOAD_FAILED
    return default


# --- libvirt numeric error codes, by symbolic name (libvirt-python's VIR_ERR_* constants) ------

# The number alone decides.
LIBVIRT_DEFINITIVE: Mapping[str, ErrorCode] = {
    "VIR_ERR_NO_DOMAIN": E.VM_NOT_FOUND,
    "VIR_ERR_NO_NETWORK": E.NETWORK_NOT_FOUND,
    "VIR_ERR_NO_NETWORK_PORT": E.NETWORK_NOT_FOUND,
    "VIR_ERR_NO_INTERFACE": E.NETWORK_NOT_FOUND,
    "VIR_ERR_NO_NWFILTER": E.NETWORK_NOT_FOUND,
    "VIR_ERR_NO_STORAGE_POOL": E.STORAGE_POOL_NOT_FOUND,
    "VIR_ERR_AUTH_FAILED": E.HOST_AUTH_FAILED,
    "VIR_ERR_AUTH_CANCELLED": E.HOST_AUTH_FAILED,
    "VIR_ERR_AUTH_UNAVAILABLE": E.HOST_AUTH_FAILED,
    "VIR_ERR_OPERATION_DENIED": E.HOST_AUTH_FAILED,
    "VIR_ERR_ACCESS_DENIED": E.HOST_AUTH_FAILED,
    "VIR_ERR_OPERATION_TIMEOUT": E.LIBVIRT_TIMEOUT,
    "VIR_ERR_AGENT_UNRESPONSIVE": E.LIBVIRT_TIMEOUT,
    "VIR_ERR_NO_SUPPORT": E.HYPERVISOR_UNSUPPORTED,
    "VIR_ERR_CPU_INCOMPATIBLE": E.HYPERVISOR_UNSUPPORTED,
    "VIR_ERR_OPERATION_UNSUPPORTED": E.HYPERVISOR_UNSUPPORTED,
    "VIR_ERR_XML_ERROR": E.INVALID_SPEC,
    "VIR_ERR_XML_DETAIL": E.INVALID_SPEC,
    "VIR_ERR_NO_MEMORY": E.INSUFFICIENT_RESOURCES,
    "VIR_ERR_NO_DOMAIN_SNAPSHOT": E.SNAPSHOT_NOT_FOUND,
}

# The text decides; this is the code when no text rule matches.
LIBVIRT_AMBIGUOUS: Mapping[str, ErrorCode] = {
    "VIR_ERR_INTERNAL_ERROR": E.LIBVIRT_ERROR,
    "VIR_ERR_OPERATION_FAILED": E.LIBVIRT_ERROR,
    "VIR_ERR_OPERATION_INVALID": E.LIBVIRT_ERROR,
    "VIR_ERR_SYSTEM_ERROR": E.LIBVIRT_ERROR,  # sockets, ssh, files: the text rules decide
    "VIR_ERR_RPC": E.HOST_UNREACHABLE,
    "VIR_ERR_NO_CONNECT": E.HOST_UNREACHABLE,
    "VIR_ERR_INVALID_CONN": E.HOST_UNREACHABLE,
    "VIR_ERR_NO_STORAGE_VOL": E.LIBVIRT_ERROR,  # an ISO volume -> ISO_NOT_FOUND by text
    "VIR_ERR_CONFIG_UNSUPPORTED": E.INVALID_SPEC,  # or HYPERVISOR_UNSUPPORTED by text
    "VIR_ERR_INVALID_ARG": E.INVALID_SPEC,  # "could not find capabilities" -> HYPERVISOR_UNSUPPORTED
    "VIR_ERR_ARGUMENT_UNSUPPORTED": E.HYPERVISOR_UNSUPPORTED,
    "VIR_ERR_STORAGE_PROBE_FAILED": E.LIBVIRT_ERROR,
    "VIR_ERR_RESOURCE_BUSY": E.LIBVIRT_TIMEOUT,
    "VIR_ERR_NO_SECRET": E.CREDENTIALS_NOT_FOUND,
}

# VIR_ERR_NONE/WARNING/ERROR are error *levels* whose values collide with error numbers.
_LEVEL_NAMES = frozenset({"VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR"})


def libvirt_error_names(module: Any) -> dict[int, str]:
    """Number -> symbolic name for the VIR_ERR_* constants of a libvirt module (duck-typed)."""
    out: dict[int, str] = {}
    for name in dir(module):
        if not name.startswith("VIR_ERR_") or name in _LEVEL_NAMES:
            continue
        value = getattr(module, name)
        if isinstance(value, int) and value not in out:
            out[value] = name
    return out


def classify_libvirt(error_name: str | None, text: str) -> ErrorCode:
    """Classify a libvirtError from its symbolic code name (e.g. "VIR_ERR_NO_DOMAIN") and message."""
    if error_name in LIBVIRT_DEFINITIVE:
        return LIBVIRT_DEFINITIVE[error_name]
    rule = match_rule(text)
    if rule is not None:
        return rule.code
    if error_name in LIBVIRT_AMBIGUOUS:
        return LIBVIRT_AMBIGUOUS[error_name]
    return ErrorCode.LIBVIRT_ERROR
