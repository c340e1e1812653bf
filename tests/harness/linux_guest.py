"""The Linux test guest: a real Debian kernel with a busybox initramfs that reports what it finds.

``build_linux_guest_iso(dest_dir)`` makes (or takes from the cache) an ISO built with
``grub-mkrescue``: GRUB on the serial port boots Debian's cloud kernel with a busybox initramfs
whose ``/init`` (``tests/harness/linuxguest/``) loads the virtio (PCI, net, console, blk) and
IDE-cdrom/iso9660 drivers and then reports, each part only when the device exists:

    LVOP-LINUX-GRUB-OK
    LVOP-LINUX-INIT-OK
    LVOP-LINUX-NIC eth0 52:54:00:..:..:..
    LVOP-LINUX-AGENT /dev/vport1p1          (a guest-agent channel: Debian's qemu-ga runs on it)
    SEED-LABEL cidata                       (a cdrom labelled cidata: cloud-init's NoCloud seed,
    SEED-SHA256 <user-data>                  read by the Linux iso9660 driver as cloud-init would)
    SEED-META <each meta-data line>
    SEED-NETWORK-SHA256 <network-config>
    DISK vda SECTORS <n>                    (each virtio disk: its size and its first MiB's hash)
    DISK vda SHA256-1M <hex>
    LVOP-LINUX-DONE
    LVOP-LINUX-DHCP eth0 192.168.x.y/24     (udhcpc, in the background: whenever the lease comes)

Under QEMU TCG the report is done ~15-40 s after ``create()``, the lease 10-25 s after it; the
guest pings its router once after the lease (so the host's neighbour table knows it too), then
idles. The image is a ``grub-mkrescue`` hybrid: it boots as a cdrom and as a disk (SeaBIOS -> MBR ->
GRUB), so the same bytes make a bootable qcow2 base image. The multiboot stub of
``tests/harness/test_iso.py`` stays the quick boot proof for everything else.

Tests never touch the network: ``hack/install-system-deps.sh`` downloads the kernel package
(``linux-image-*-cloud-amd64``, the current dependency of ``linux-image-cloud-amd64``) and
``qemu-guest-agent`` into ``${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/linuxguest/debs/``;
this module only unpacks them (``dpkg-deb -x``, nothing is installed). Also needs ``busybox-static``,
``grub-mkrescue`` (``grub-pc-bin``) and ``xorriso``. Built ISOs are cached in ``linuxguest/`` by the
packages' versions and a hash of the sources.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "AGENT_MARKER",
    "DHCP_MARKER",
    "DONE_MARKER",
    "INIT_MARKER",
    "build_linux_guest_iso",
    "leased_address",
    "linux_guest_available",
    "serial_lines",
]

SOURCE_DIR = Path(__file__).resolve().parent / "linuxguest"
SOURCES = ("grub.cfg", "init", "udhcpc.script")
# The .debs hack/install-system-deps.sh puts in the cache (the names it gives them).
KERNEL_DEB = "linux-image-*-cloud-amd64_*.deb"
AGENT_DEB = "qemu-guest-agent_*.deb"
# Their dependencies are added from the modules' own `depends=`; /init loads them in the order
# written to /etc/modules.order. virtio_console: the guest agent's channel; ata_piix, sr_mod,
# isofs: the cidata seed on an IDE cdrom (the operator's cdrom bus with BIOS firmware).
MODULES = ("virtio_pci", "virtio_net", "virtio_console", "virtio_blk", "ata_piix", "sr_mod", "isofs")
INIT_MARKER = "LVOP-LINUX-INIT-OK"
AGENT_MARKER = "LVOP-LINUX-AGENT"
DHCP_MARKER = "LVOP-LINUX-DHCP"
DONE_MARKER = "LVOP-LINUX-DONE"
_GRUB_MODULES = "linux normal serial terminal echo boot iso9660 biosdisk gzio part_msdos"
_RECIPE = "3"
_TOOLS = ("busybox", "ldd", "grub-mkrescue", "xorriso", "dpkg-deb")
_SETUP = "run hack/install-system-deps.sh"
_DHCP_LINE = re.compile(rf"{DHCP_MARKER} (\S+) (\d+\.\d+\.\d+\.\d+)/(\d+)")


def _cache_dir() -> Path:
    base = os.environ.get("LIBVIRT_OPERATOR_CACHE") or str(Path.home() / ".cache" / "libvirt-operator")
    return Path(base) / "linuxguest"


def _cached_deb(pattern: str) -> Path | None:
    found = sorted((_cache_dir() / "debs").glob(pattern))
    return found[-1] if found else None


def linux_guest_available() -> tuple[bool, str]:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return False, f"missing programs: {', '.join(missing)} ({_SETUP})"
    absent = [p for p in (KERNEL_DEB, AGENT_DEB) if _cached_deb(p) is None]
    if absent:
        return False, f"no {' or '.join(absent)} in {_cache_dir() / 'debs'} ({_SETUP})"
    return True, ""


def leased_address(serial_log: str) -> tuple[str, str, int] | None:
    """``(nic, address, prefix)`` from the guest's DHCP marker line, or None before the lease."""
    m = _DHCP_LINE.search(serial_log)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def serial_lines(text: str, key: str) -> list[str]:
    """Values of the guest's ``KEY value`` lines (serial logs may carry \\r and kernel noise)."""
    values = []
    for line in text.replace("\r", "").splitlines():
        if line.startswith(key + " "):
            values.append(line[len(key) + 1:].strip())
    return values


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"linux guest build step failed ({res.returncode}): {' '.join(cmd)}\n"
                           f"{res.stdout[-2000:]}{res.stderr[-4000:]}")
    return res.stdout


def _add_agent(root: Path, agent_root: Path) -> None:
    """qemu-ga (Debian's qemu-guest-agent, dynamically linked) and the libraries it needs, taken
    from this machine (the same Debian release), at the paths the dynamic loader looks in."""
    binary = agent_root / "usr" / "sbin" / "qemu-ga"
    (root / "sbin").mkdir(exist_ok=True)
    shutil.copyfile(binary, root / "sbin" / "qemu-ga")
    os.chmod(root / "sbin" / "qemu-ga", 0o755)
    ldd = _run(["ldd", str(binary)], root)
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):
        target = root / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), target)
        os.chmod(target, 0o755)


def _initramfs(tree: Path, kernel_root: Path, agent_root: Path, dest: Path) -> None:
    """A gzip'd newc cpio with static busybox, /init, the udhcpc hook, the kernel modules and qemu-ga."""
    root = tree / "initramfs"
    for sub in ("bin", "etc", "proc", "sys", "dev", "lib/modules", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    shutil.copyfile(SOURCE_DIR / "init", root / "init")
    os.chmod(root / "init", 0o755)
    shutil.copyfile(SOURCE_DIR / "udhcpc.script", root / "etc" / "udhcpc.script")
    os.chmod(root / "etc" / "udhcpc.script", 0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    available = {p.name[: -len(".ko")]: p for p in kernel_root.glob("lib/modules/*/kernel/**/*.ko")}
    order: list[str] = []

    def add(name: str) -> None:  # depth first: a module after everything it depends on
        if name in order:
            return
        if name not in available:
            raise RuntimeError(f"kernel module {name}.ko not in the kernel package")
        m = re.search(rb"depends=([A-Za-z0-9_,-]*)", available[name].read_bytes())
        for dep in filter(None, (m.group(1).decode().split(",") if m else [])):
            add(dep.replace("-", "_"))
        order.append(name)
        shutil.copyfile(available[name], root / "lib" / "modules" / f"{name}.ko")

    for name in MODULES:
        add(name)
    _add_agent(root, agent_root)
    (root / "etc" / "modules.order").write_text("\n".join(order) + "\n")
    dest.write_bytes(gzip.compress(_newc(root), compresslevel=6, mtime=0))


def _newc(root: Path) -> bytes:
    """The tree as a newc ("070701") cpio archive owned by root, as the kernel unpacks it."""
    out = bytearray()

    def entry(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, path in enumerate(sorted(root.rglob("*")), start=1):
        st = path.lstat()
        if path.is_symlink():
            entry(str(path.relative_to(root)), st.st_mode, os.readlink(path).encode(), ino)
        elif path.is_dir():
            entry(str(path.relative_to(root)), st.st_mode, b"", ino)
        else:
            entry(str(path.relative_to(root)), st.st_mode, path.read_bytes(), ino)
    entry("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _source_hash(deb: Path, agent_deb: Path) -> str:
    h = hashlib.sha256(f"recipe {_RECIPE} {deb.name} {agent_deb.name} {MODULES} {_GRUB_MODULES}\n".encode())
    for name in SOURCES:
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:24]


def build_linux_guest_iso(dest_dir: str | os.PathLike[str]) -> Path:
    """The ISO (built once per cached package versions and sources), copied into ``dest_dir``."""
    ok, reason = linux_guest_available()
    if not ok:
        raise RuntimeError(f"cannot build the Linux test guest: {reason}")
    cache = _cache_dir()
    deb, agent_deb = _cached_deb(KERNEL_DEB), _cached_deb(AGENT_DEB)
    assert deb is not None and agent_deb is not None  # linux_guest_available() checked both
    cached = cache / f"linux-guest-{_source_hash(deb, agent_deb)}.iso"
    if not cached.is_file():
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp_s:
            tmp = Path(tmp_s)
            _run(["dpkg-deb", "-x", str(deb), str(tmp / "kernel")], tmp)
            tree = tmp / "tree"
            (tree / "boot" / "grub").mkdir(parents=True)
            shutil.copyfile(SOURCE_DIR / "grub.cfg", tree / "boot" / "grub" / "grub.cfg")
            vmlinuz = sorted((tmp / "kernel" / "boot").glob("vmlinuz-*"))
            if not vmlinuz:
                raise RuntimeError(f"{deb.name} has no /boot/vmlinuz-*")
            shutil.copyfile(vmlinuz[-1], tree / "boot" / "vmlinuz")
            _run(["dpkg-deb", "-x", str(agent_deb), str(tmp / "agent")], tmp)
            _initramfs(tmp, tmp / "kernel", tmp / "agent", tree / "boot" / "initrd.gz")
            iso = tmp / "guest.iso"
            _run(["grub-mkrescue", f"--install-modules={_GRUB_MODULES}", "--fonts=", "--locales=", "--themes=",
                  "-o", str(iso), str(tree)], tmp)
            os.replace(iso, cached)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / cached.name
    shutil.copyfile(cached, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path
