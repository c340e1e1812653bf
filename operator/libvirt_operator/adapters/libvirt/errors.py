"""Turn libvirt exceptions into AppErrors: libvirt's numeric codes first, message text when ambiguous."""

from __future__ import annotations

import libvirt

from ...core.classify import classify_text
from ...core.errors import AppError, ErrorCode

_BY_CODE: dict[int, ErrorCode] = {
    libvirt.VIR_ERR_NO_DOMAIN: ErrorCode.VM_NOT_FOUND,
    libvirt.VIR_ERR_NO_STORAGE_POOL: ErrorCode.STORAGE_POOL_NOT_FOUND,
    libvirt.VIR_ERR_NO_NETWORK: ErrorCode.NETWORK_NOT_FOUND,
    libvirt.VIR_ERR_AUTH_FAILED: ErrorCode.HOST_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED: ErrorCode.HOST_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE: ErrorCode.HOST_AUTH_FAILED,
    libvirt.VIR_ERR_NO_CONNECT: ErrorCode.HOST_UNREACHABLE,
    libvirt.VIR_ERR_XML_ERROR: ErrorCode.INVALID_SPEC,
    libvirt.VIR_ERR_XML_DETAIL: ErrorCode.INVALID_SPEC,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: ErrorCode.HYPERVISOR_UNSUPPORTED,
    libvirt.VIR_ERR_NO_SUPPORT: ErrorCode.HYPERVISOR_UNSUPPORTED,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: ErrorCode.LIBVIRT_TIMEOUT,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: ErrorCode.LIBVIRT_TIMEOUT,
}
# Codes that say little on their own (system errors, internal errors, RPC): the text decides.
_AMBIGUOUS = {
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_STORAGE_PROBE_FAILED,
}
# Codes that mean the connection itself is gone and must be reopened.
CONNECTION_LOST = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                   libvirt.VIR_ERR_INTERNAL_ERROR}


def classify_libvirt_error(err: libvirt.libvirtError, *, host: str | None = None,
                           operation: str | None = None) -> AppError:
    code_num = err.get_error_code()
    message = err.get_error_message() or str(err)
    code = _BY_CODE.get(code_num)
    if code is None:
        text_code = classify_text(message)
        code = text_code if (code_num in _AMBIGUOUS or text_code != ErrorCode.LIBVIRT_ERROR) else ErrorCode.LIBVIRT_ERROR
        if code in (ErrorCode.KUBERNETES_API_ERROR, ErrorCode.ISO_DOWNLOAD_FAILED):
            code = ErrorCode.LIBVIRT_ERROR  # text rules for other worlds never apply to libvirt errors
    return AppError(code, message, context={
        "host": host, "operation": operation, "libvirtCode": code_num, "libvirtDomain": err.get_error_domain(),
    }, cause=err)
