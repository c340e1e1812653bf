#!/bin/bash
# Install the system packages the test harness needs (Debian/Ubuntu), idempotently:
#   - a real libvirtd with QEMU (TCG) for simulated hosts (tests/harness/libvirt_hosts.py),
#   - libvirt-dev + pkg-config + gcc to build libvirt-python from its sdist,
#   - grub-mkrescue, xorriso, mtools and a 32-bit gcc for the bootable test ISO
#     (tests/harness/test_iso.py),
#   - util-linux (unshare, taskset, mount) for the per-host mount namespaces,
#   - openssh-server for a loopback sshd in qemu+ssh:// tests (tests/harness/sshd.py),
# and create the libvirt-qemu system user/group that libvirtd insists on resolving at start
# (even when qemu.conf says user = "root").
#
# Runs as root, or through sudo when available. Quiet on success; apt's output is shown only
# when a step fails. Skips apt entirely when everything is already installed.
set -euo pipefail

PACKAGES=(
    libvirt-daemon
    libvirt-daemon-driver-qemu
    libvirt-clients
    qemu-system-x86
    qemu-utils
    libvirt-dev
    pkg-config
    gcc
    gcc-multilib
    grub-pc-bin
    grub-common
    xorriso
    mtools
    util-linux
    mount
    procps
    iproute2
    openssh-client
    openssh-server
)

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -n -- bash "$0" "$@"
    fi
    echo "install-system-deps: must run as root (and sudo is not available)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

run_quiet() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        echo "install-system-deps: failed: $*" >&2
        tail -n 50 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    # openssh-server is for tests/harness/sshd.py (its own sshd on a loopback port): never let the
    # package start the system's sshd on port 22.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    run_quiet apt-get update
    run_quiet apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! getent group libvirt-qemu >/dev/null; then
    groupadd -r libvirt-qemu
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
fi
