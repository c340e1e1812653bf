"""The bootable test ISO is the product's dev-time one (libvirt_operator.devenv.testiso), which the
embedded default boots as its sample; re-exported for the fixtures (pytest_libvirt.test_iso).

(No ``test*`` functions or ``Test*`` classes here, so pytest collects nothing from this module.)"""

from __future__ import annotations

from libvirt_operator.devenv.testiso import (  # noqa: F401 - re-exports
    DISK_MARKER_ABSENT,
    DISK_MARKER_PRESENT,
    DISK_MARKER_WRITTEN,
    GRUB_MARKER,
    HEARTBEAT_MARKER,
    KERNEL_MARKER,
    MARKERS,
    NO_DISK,
    SOURCE_DIR,
    TICK_MARKER,
    build_test_iso,
    iso_build_available,
    iso_cache_dir,
)
