"""The bootable test ISO is the product's dev-time one (libvirt_operator.devenv.testiso), which the
embedded default boots as its sample; re-exported for the fixtures (pytest_libvirt.test_iso).

(No ``test*`` functions or ``Test*`` classes here, so pytest collects nothing from this module.)"""

from __future__ import annotations

from pathlib import Path

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

from .kube import Kube


class Serial:
    """The guest's serial log on the host (appended to at every boot)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.boots = 0

    def next_boot(self, timeout: float = 60) -> str:
        """The output of the next boot, once the guest reported its disk and wrote the marker."""
        def done() -> str | None:
            text = self.path.read_text(errors="replace") if self.path.exists() else ""
            parts = text.split(KERNEL_MARKER)
            if len(parts) > self.boots + 1 and DISK_MARKER_WRITTEN in parts[self.boots + 1]:
                return parts[self.boots + 1]
            return None
        out = Kube.wait_for(done, timeout=timeout, what=f"boot {self.boots + 1} on the serial log")
        self.boots += 1
        return out
