"""A tiny bootable ISO that proves a guest really booted.

``build_test_iso(dest_dir)`` makes (or takes from the cache) an ISO built with ``grub-mkrescue``
from the sources in ``devenv/data/testiso/``: GRUB writes to the first serial port and echoes
the first marker, then ``multiboot``s a ~1 KiB 32-bit kernel (``kernel.S``, assembled with
``gcc -m32``) that writes the second marker to COM1 (0x3F8) and halts (``cli; hlt``). Give the
guest a ``<serial type='file'>`` and both markers show up in that file about a second after
``create()`` under QEMU TCG; the halted guest then uses almost no CPU.

Before halting, the kernel looks at the first virtio disk (``disk.c``, a polling legacy
virtio-blk driver): it prints ``DISK_MARKER_PRESENT`` or ``DISK_MARKER_ABSENT`` depending on
whether sector 0 starts with its marker, then writes (and flushes) the marker and prints
``DISK_MARKER_WRITTEN``; without a virtio disk it prints ``NO_DISK``. Snapshot tests use this to
see what a disk held at boot.

``build_test_iso(dest_dir, heartbeat=True)`` makes a variant whose GRUB passes ``heartbeat`` on the
kernel's command line: instead of halting for good, the kernel (``heartbeat.c``) prints
``HEARTBEAT_MARKER`` and then ``TICK_MARKER <n>`` about once a second (PIT at 20 Hz, ``sti; hlt``
in between: its QEMU used ~0.3% of a core under TCG), ``n`` counting up in guest memory. Live migration tests use it to
see a guest keep running, not boot again, on the destination host.

Only the GRUB modules the boot needs go onto the ISO, so it is ~0.8 MB (a default
``grub-mkrescue`` image is ~9.5 MB). Needs ``gcc`` with 32-bit support (``gcc-multilib``),
``grub-mkrescue`` (``grub-pc-bin``, ``grub-common``) and ``xorriso``: see
``hack/install-system-deps.sh``. Built ISOs are cached by a hash of the sources under
``${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/testiso/``.

The embedded default boots it as its sample ISO; the tests use it to prove a boot
(``tests/harness/pytest_libvirt.py``, fixture ``test_iso``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "DISK_MARKER_ABSENT",
    "DISK_MARKER_PRESENT",
    "DISK_MARKER_WRITTEN",
    "GRUB_MARKER",
    "HEARTBEAT_MARKER",
    "KERNEL_MARKER",
    "MARKERS",
    "NO_DISK",
    "SOURCE_DIR",
    "TICK_MARKER",
    "build_test_iso",
    "iso_build_available",
    "iso_cache_dir",
]

SOURCE_DIR = Path(__file__).resolve().parent / "data" / "testiso"
SOURCES = ("grub.cfg", "kernel.S", "disk.c", "heartbeat.c", "linker.ld")

GRUB_MARKER = "LVOP-TESTISO-GRUB-OK"
KERNEL_MARKER = "LVOP-TESTISO-KERNEL-OK"
MARKERS: tuple[str, str] = (GRUB_MARKER, KERNEL_MARKER)
# Printed after the kernel marker by disk.c, about the first virtio disk's sector 0 (see there).
DISK_MARKER_PRESENT = "LVOP-TESTISO-MARKER-PRESENT"
DISK_MARKER_ABSENT = "LVOP-TESTISO-MARKER-ABSENT"
DISK_MARKER_WRITTEN = "LVOP-TESTISO-MARKER-WRITTEN"
NO_DISK = "LVOP-TESTISO-NO-DISK"
# The heartbeat variant (heartbeat.c): once after the disk report, then "<TICK_MARKER> <n>" each second.
HEARTBEAT_MARKER = "LVOP-TESTISO-HEARTBEAT"
TICK_MARKER = "LVOP-TESTISO-TICK"
_KERNEL_LINE = "multiboot /boot/kernel.elf"

_GCC_FLAGS = [
    "-m32", "-ffreestanding", "-nostdlib", "-static", "-no-pie",
    "-Wl,--build-id=none", "-O2", "-fno-pic", "-fno-stack-protector", "-fno-builtin",
    "-mno-sse", "-mno-mmx",
]  # fmt: skip
_GRUB_MODULES = "multiboot normal serial terminal echo boot iso9660 biosdisk"
_MKRESCUE_FLAGS = [
    f"--install-modules={_GRUB_MODULES}",
    "--fonts=",
    "--locales=",
    "--themes=",
]
# Bump when the build steps change in a way the sources' hash would not show.
_RECIPE = "3"

_TOOLS = ("gcc", "grub-mkrescue", "xorriso")


def iso_cache_dir() -> Path:
    base = os.environ.get("LIBVIRT_OPERATOR_CACHE") or str(
        Path.home() / ".cache" / "libvirt-operator"
    )
    return Path(base) / "testiso"


def iso_build_available() -> tuple[bool, str]:
    """Whether the tools to build the ISO are installed: ``(True, "")`` or ``(False, why)``."""
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return False, f"missing programs: {', '.join(missing)} (run hack/install-system-deps.sh)"
    if not Path("/usr/lib/grub/i386-pc").is_dir():
        return False, "no /usr/lib/grub/i386-pc (package grub-pc-bin; run hack/install-system-deps.sh)"
    return True, ""


def _source_hash(heartbeat: bool = False) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {_RECIPE}\n{_GCC_FLAGS}\n{_MKRESCUE_FLAGS}\n".encode())
    if heartbeat:
        h.update(b"variant heartbeat\n")
    for name in SOURCES:
        data = (SOURCE_DIR / name).read_bytes()
        h.update(f"{name} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:24]


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(
            f"test ISO build step failed ({res.returncode}): {' '.join(cmd)}\n"
            f"{res.stdout[-2000:]}{res.stderr[-4000:]}"
        )


def _grub_cfg(heartbeat: bool) -> str:
    text = (SOURCE_DIR / "grub.cfg").read_text()
    if not heartbeat:
        return text
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == _KERNEL_LINE]
    if len(hits) != 1:
        raise RuntimeError(f"grub.cfg must have exactly one {_KERNEL_LINE!r} line for the heartbeat variant")
    lines[hits[0]] = lines[hits[0]].rstrip("\n") + " heartbeat\n"
    return "".join(lines)


def _build(dest: Path, heartbeat: bool = False) -> None:
    """Build the ISO into ``dest`` (written atomically)."""
    ok, reason = iso_build_available()
    if not ok:
        raise RuntimeError(f"cannot build the test ISO: {reason}")
    for marker, source in ((GRUB_MARKER, "grub.cfg"), (KERNEL_MARKER, "kernel.S")):
        if marker not in (SOURCE_DIR / source).read_text():
            raise RuntimeError(f"{source} lost its marker {marker!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=dest.parent) as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "tree"
        (tree / "boot" / "grub").mkdir(parents=True)
        (tree / "boot" / "grub" / "grub.cfg").write_text(_grub_cfg(heartbeat))
        _run(
            [
                "gcc", *_GCC_FLAGS,
                f"-Wl,-T,{SOURCE_DIR / 'linker.ld'}",
                "-o", str(tree / "boot" / "kernel.elf"),
                str(SOURCE_DIR / "kernel.S"),
                str(SOURCE_DIR / "disk.c"),
                str(SOURCE_DIR / "heartbeat.c"),
            ],
            tmp,
        )  # fmt: skip
        if shutil.which("grub-file"):
            _run(["grub-file", "--is-x86-multiboot", str(tree / "boot" / "kernel.elf")], tmp)
        iso = tmp / "test.iso"
        _run(["grub-mkrescue", *_MKRESCUE_FLAGS, "-o", str(iso), str(tree)], tmp)
        os.replace(iso, dest)


def build_test_iso(
    dest_dir: str | os.PathLike[str], *, heartbeat: bool = False
) -> tuple[Path, tuple[str, str]]:
    """Return ``(path, (grub_marker, kernel_marker))`` with the ISO copied into ``dest_dir``.

    The ISO is built once per version of the sources (and variant: ``heartbeat``, see the module
    docstring) and reused from the cache after that; the copy in ``dest_dir``
    (``test-<hash>.iso``) is the caller's to modify or delete.
    """
    digest = _source_hash(heartbeat)
    cached = iso_cache_dir() / f"test-{digest}.iso"
    if not cached.is_file():
        _build(cached, heartbeat)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / cached.name
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(cached, tmp)
    os.replace(tmp, path)
    return path, MARKERS
