#!/bin/bash
# Install the system packages the test harness and `make run` need (Debian/Ubuntu), idempotently:
#   - a real libvirtd with QEMU (TCG) for simulated hosts (operator/libvirt_operator/devenv/libvirtd.py),
#   - libvirt-dev + pkg-config + gcc to build libvirt-python from its sdist,
#   - grub-mkrescue, xorriso, mtools and a 32-bit gcc for the bootable test ISO
#     (operator/libvirt_operator/devenv/testiso.py),
#   - util-linux (unshare, taskset, mount) for the per-host mount namespaces,
#   - openssh-server for a loopback sshd in qemu+ssh:// tests (tests/harness/sshd.py),
#   - prometheus + promtool for the monitoring tests (tests/harness/prometheus.py),
#   - libvirt-doc: libvirt.org's pages, indexed into the knowledge base (adapters/rag/upstream.py),
#   - containerd, runc, CNI plugins, dnsmasq, iptables, busybox-static for the single-node cluster,
#     and debootstrap + buildah + skopeo + umoci to build the operator image without a registry
#     (tests/harness/cluster.py, hack/image/),
#   - the .debs of Debian's cloud kernel and qemu-guest-agent, downloaded (not installed) into
#     ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/linuxguest/debs/: the Linux test guest
#     (tests/harness/linux_guest.py) is built from them, so tests never reach the network,
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
    prometheus
    libvirt-doc
    containerd
    runc
    containernetworking-plugins
    busybox-static
    dnsmasq-base
    iptables
    debootstrap
    buildah
    skopeo
    umoci
)

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        # The caller's cache, not root's: the tests read the guest's packages from it.
        exec sudo -n -- env "LIBVIRT_OPERATOR_CACHE=${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}" \
            bash "$0" "$@"
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
    # package start the system's sshd on port 22. Same for prometheus (tests/harness/prometheus.py
    # starts its own on 127.0.0.1).
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

# One package's .deb into the guest's cache, unless that exact file is there already; other
# versions of its family (an older kernel ABI, an older agent) are removed once it is.
deb_name() {
    apt-get download --print-uris "$1" 2>/dev/null | awk 'NR == 1 {print $2}'
}

fetch_deb() {
    local package=$1 family=$2 dir=$3 name tmp old
    name=$(deb_name "$package" || true)
    if [ -z "$name" ]; then  # package lists never fetched (every package was preinstalled)
        run_quiet apt-get update
        name=$(deb_name "$package" || true)
    fi
    if [ -z "$name" ]; then
        echo "install-system-deps: apt cannot download $package" >&2
        return 1
    fi
    if [ ! -f "$dir/$name" ]; then
        tmp=$(mktemp -d "$dir/.download.XXXXXX")
        if getent passwd _apt >/dev/null; then
            chown _apt "$tmp"  # apt downloads as _apt when it can write there
        fi
        (cd "$tmp" && run_quiet apt-get download "$package")
        mv "$tmp/$name" "$dir/$name"
        rm -rf "$tmp"
    fi
    for old in "$dir/$family"*.deb; do
        if [ -f "$old" ] && [ "$old" != "$dir/$name" ]; then
            rm -f "$old"
        fi
    done
}

cloud_kernel() {  # the image package the metapackage currently depends on (one ABI)
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'
}

cache_root=${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}
new_cache_root=$([ -d "$cache_root" ] || echo yes)
guest_debs=$cache_root/linuxguest/debs
mkdir -p "$guest_debs"
kernel=$(cloud_kernel || true)
if [ -z "$kernel" ]; then
    run_quiet apt-get update
    kernel=$(cloud_kernel || true)
fi
if [ -z "$kernel" ]; then
    echo "install-system-deps: apt does not know linux-image-cloud-amd64" >&2
    exit 1
fi
fetch_deb "$kernel" linux-image- "$guest_debs"
fetch_deb qemu-guest-agent qemu-guest-agent_ "$guest_debs"
if [ -n "${SUDO_UID:-}" ]; then  # run through sudo: the caller's cache stays the caller's
    chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$cache_root/linuxguest"
    if [ -n "$new_cache_root" ]; then
        chown "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$cache_root"
    fi
fi
