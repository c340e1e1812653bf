#!/bin/bash
# Start one simulated libvirt host: virtlogd + libvirtd with all their state under ROOT.
#
# Usage (see libvirt_operator/devenv/libvirtd.py, which writes the config files first):
#   unshare --mount --propagation private -- taskset -c 0 bash libvirtd-in-namespace.sh ROOT
#
# Inside the private mount namespace the per-host directories ROOT/{etc,run,lib,cache,log}
# are bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
# /var/log/libvirt, so several daemons can run side by side without sharing sockets, pid
# files, domain definitions or logs. The script then starts virtlogd (daemonised, pid file
# /run/libvirt/virtlogd.pid) and execs libvirtd, so the caller's child pid is libvirtd itself.
# The namespace (and its mounts) disappears when its last process (libvirtd, virtlogd, QEMU,
# the watchdog below) has exited: nothing needs unmounting from outside.
set -euo pipefail

root=${1:?usage: $0 ROOT}
[ -d "$root" ] || { echo "libvirtd-in-namespace: no such directory: $root" >&2; exit 2; }

# Refuse to touch the caller's mount namespace: the bind mounts below must stay private.
if [ "$(readlink /proc/self/ns/mnt)" = "$(readlink "/proc/$PPID/ns/mnt" 2>/dev/null || true)" ]; then
    echo "libvirtd-in-namespace: not in a private mount namespace (run under unshare --mount)" >&2
    exit 2
fi
mount --make-rprivate /

for pair in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
    src="$root/${pair%%:*}"
    dst="${pair#*:}"
    mkdir -p "$src" "$dst"
    mount --bind "$src" "$dst"
done

virtlogd --daemon --pid-file /run/libvirt/virtlogd.pid --config /etc/libvirt/virtlogd.conf
for _ in $(seq 200); do
    [ -S /run/libvirt/virtlogd-sock ] && break
    sleep 0.05
done
[ -S /run/libvirt/virtlogd-sock ] || { echo "libvirtd-in-namespace: virtlogd did not create its socket" >&2; exit 1; }

# Watchdog: if the process that launched us (the test run) dies without stopping this host,
# tear the host down so no libvirtd, virtlogd or QEMU outlives it. It exits by itself as soon
# as libvirtd (this shell's pid, after the exec below) has exited.
parent=$PPID
main=$$
(
    exec </dev/null
    while kill -0 "$parent" 2>/dev/null && kill -0 "$main" 2>/dev/null; do
        sleep 0.5
    done
    if kill -0 "$main" 2>/dev/null; then
        echo "libvirtd-in-namespace: launcher $parent is gone, stopping this host" >&2
        for pidfile in /run/libvirt/qemu/*.pid; do
            [ -f "$pidfile" ] && kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
        done
        kill -TERM "$main" 2>/dev/null || true
        [ -f /run/libvirt/virtlogd.pid ] && kill -TERM "$(cat /run/libvirt/virtlogd.pid)" 2>/dev/null || true
    fi
) &

exec libvirtd --listen --pid-file /run/libvirt/libvirtd.pid --config /etc/libvirt/libvirtd.conf
