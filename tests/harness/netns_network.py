"""A real libvirt host with a real libvirt NAT network, all inside a network namespace the test makes.

``NetnsNetworkHost(workdir).start()`` creates a network namespace (``ip netns add``, only ``lo``
up), runs a real libvirtd in it (:class:`tests.harness.cluster.NetnsLibvirtDaemon`, listening
on the namespace's own 127.0.0.1; the test process reaches it through a loopback forwarder:
``.uri``) and defines and starts a libvirt network ``NETWORK`` (``<forward mode='nat'/>``, DHCP by
libvirt's dnsmasq). Its bridge, its addresses, dnsmasq and the guests' tap devices exist only in
that namespace: nothing private-range is added to the root namespace, and no traffic leaves it.

``stop()`` destroys the domains, the network (its bridge and dnsmasq), libvirtd and virtlogd, then
deletes the namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape

from tests.harness.cluster import NetnsLibvirtDaemon

__all__ = ["NETWORK", "NetnsNetworkHost", "netns_available"]

NETWORK = "lvop-nat"
SUBNET_PREFIX = "192.168.150"  # inside the namespace only
_COUNTER = itertools.count(1)


def netns_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (ip netns, nsenter)"
    for tool in ("ip", "nsenter", "unshare", "dnsmasq", "iptables"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, check=False).returncode:
            return False, f"missing program {tool} (run hack/install-system-deps.sh)"
    return True, ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class NetnsNetworkHost:
    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        n = next(_COUNTER)
        self.workdir = Path(workdir)
        self.netns = f"lvo-ip-{os.getpid()}-{n}"
        self.netns_path = f"/run/netns/{self.netns}"
        self.bridge = f"lvopbr{os.getpid() % 10000}{n}"[:15]
        self.gateway = f"{SUBNET_PREFIX}.1"
        self.daemon: NetnsLibvirtDaemon | None = None

    @property
    def uri(self) -> str:
        assert self.daemon is not None
        return self.daemon.uri

    @property
    def root(self) -> Path:
        assert self.daemon is not None and self.daemon.root is not None
        return self.daemon.root

    def network_xml(self) -> str:
        return (f"<network><name>{NETWORK}</name><forward mode='nat'/><bridge name='{escape(self.bridge)}'/>"
                f"<ip address='{self.gateway}' netmask='255.255.255.0'><dhcp>"
                f"<range start='{SUBNET_PREFIX}.100' end='{SUBNET_PREFIX}.199'/></dhcp></ip></network>")

    def start(self) -> NetnsNetworkHost:
        import libvirt

        _ip("netns", "add", self.netns)
        try:
            _ip("-n", self.netns, "link", "set", "lo", "up")
            self.daemon = NetnsLibvirtDaemon(netns_path=self.netns_path, node_ip="127.0.0.1", name=self.netns,
                                             root=self.workdir / "libvirtd")
            self.daemon.start()
            (self.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)  # as the Debian package has it
            conn = libvirt.open(self.uri)
            try:
                conn.networkDefineXML(self.network_xml()).create()
            finally:
                conn.close()
        except BaseException:
            self.stop()
            raise
        return self

    def leases(self) -> list[dict[str, object]]:
        """The network's DHCP leases as libvirt reports them."""
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            return list(conn.networkLookupByName(NETWORK).DHCPLeases())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                import libvirt

                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.destroy()
                    net = conn.networkLookupByName(NETWORK)
                    if net.isActive():
                        net.destroy()  # stops dnsmasq, removes the bridge
                finally:
                    conn.close()
            self.daemon.stop()
            self.daemon = None
        if os.path.exists(self.netns_path):
            _ip("netns", "delete", self.netns, check=False)

    def __enter__(self) -> NetnsNetworkHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
