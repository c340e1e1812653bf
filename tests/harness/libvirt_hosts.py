"""Simulated libvirt hosts for tests: the product's dev-time launchers (libvirt_operator.devenv:
real libvirtd on loopback in its own mount namespace, test-driver host files), re-exported so the
fixtures and `make run` share one implementation, plus a bootable domain definition for the tests."""

from __future__ import annotations

import os
from xml.sax.saxutils import escape

from libvirt_operator.devenv.libvirtd import (  # noqa: F401 - re-exports
    BIND_DIRS,
    NAMESPACE_SCRIPT,
    LibvirtDaemon,
    LibvirtDaemonError,
    _kill_and_wait,
    libvirtd_available,
    start_all,
    start_daemons,
)
from libvirt_operator.devenv.testhost import write_test_host  # noqa: F401 - re-export

__all__ = [
    "LibvirtDaemon",
    "LibvirtDaemonError",
    "boot_domain_xml",
    "libvirtd_available",
    "start_all",
    "start_daemons",
    "write_test_host",
]


def boot_domain_xml(
    name: str,
    *,
    cdrom: str | os.PathLike[str] | None = None,
    serial_log: str | os.PathLike[str] | None = None,
    memory_mib: int = 64,
    vcpus: int = 1,
    domain_type: str = "qemu",
    user_network: bool = False,
) -> str:
    """A minimal x86_64 domain that boots from ``cdrom`` (a file path, e.g. a pool volume's
    ``path()``), with its first serial port written to ``serial_log`` (created by QEMU, via
    virtlogd). ``domain_type='qemu'`` is TCG, the only one that works on these machines."""
    devices = ["<emulator>/usr/bin/qemu-system-x86_64</emulator>"]
    if cdrom is not None:
        devices.append(
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='{escape(str(cdrom))}'/><target dev='hda' bus='ide'/><readonly/></disk>"
        )
    if serial_log is not None:
        devices.append(
            f"<serial type='file'><source path='{escape(str(serial_log))}'/>"
            "<target port='0'/></serial>"
        )
    if user_network:
        devices.append("<interface type='user'><model type='e1000'/></interface>")
    devices.append("<memballoon model='none'/>")
    body = "\n    ".join(devices)
    return f"""<domain type='{escape(domain_type)}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='cdrom'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {body}
  </devices>
</domain>
"""

