"""Turn libvirt exceptions into AppErrors: libvirt's error codes first, message text where ambiguous.

The mapping itself lives in core.classify (pure, shared with `libvirt-operator explain`); this module
only translates libvirt's numeric codes into their symbolic names.
"""

from __future__ import annotations

import libvirt

from ...core.classify import classify_libvirt, libvirt_error_names
from ...core.errors import AppError

_NAMES = libvirt_error_names(libvirt)
# Codes that may mean the connection itself is gone; confirmed with isAlive() before reopening.
CONNECTION_LOST = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                   libvirt.VIR_ERR_INTERNAL_ERROR}


def classify_libvirt_error(err: libvirt.libvirtError, *, host: str | None = None,
                           operation: str | None = None) -> AppError:
    code_num = err.get_error_code()
    message = err.get_error_message() or str(err)
    code = classify_libvirt(_NAMES.get(code_num), message)
    return AppError(code, message, context={
        "host": host, "operation": operation, "libvirtCode": _NAMES.get(code_num, code_num),
    }, cause=err)
