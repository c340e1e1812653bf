"""A real guest takes a real DHCP lease on a libvirt NAT network, and the VM's status and IP column
show that address with source ``lease``.

Everything networked lives in a network namespace the test makes (tests/harness/netns_network.py):
libvirtd, the network's bridge and dnsmasq, the guest's tap device. The guest is the Linux test
guest (tests/harness/linux_guest.py: Debian's cloud kernel + busybox ``udhcpc``), imported through
an ISOImage from a loopback HTTP server and booted from its cdrom by the in-process operator."""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid

import pytest

from tests.harness.kube import Kube
from tests.harness.linux_guest import (
    AGENT_MARKER,
    DHCP_MARKER,
    build_linux_guest_iso,
    leased_address,
    linux_guest_available,
)
from tests.harness.netns_network import NETWORK, SUBNET_PREFIX, NetnsNetworkHost, netns_available
from tests.harness.pytest_libvirt import unavailable

pytestmark = pytest.mark.e2e
VM = "virtualmachines"


@pytest.fixture
def nat_host(tmp_path, libvirtd_factory):  # libvirtd_factory: libvirtd can run here (skips otherwise)
    ok, why = netns_available()
    if not ok:
        unavailable("network namespace", why)
    host = NetnsNetworkHost(tmp_path / "nat-host")
    host.start()
    try:
        yield host
    finally:
        netns = host.netns
        host.stop()
        import os
        assert not os.path.exists(f"/run/netns/{netns}"), "the test's network namespace was left behind"


@pytest.fixture
def guest_iso(tmp_path_factory):
    ok, why = linux_guest_available()
    if not ok:
        unavailable("Linux test guest", why)
    return build_linux_guest_iso(tmp_path_factory.mktemp("linux-guest"))


def test_guest_dhcp_lease_shows_in_status_and_ip_column(kube, operator, namespace, nat_host, guest_iso,
                                                        iso_downloads) -> None:
    from tests.harness.http_server import TestHTTPServer

    host = f"nat-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": nat_host.uri, "insecure": True}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=60)
    sha = hashlib.sha256(guest_iso.read_bytes()).hexdigest()
    try:
        with TestHTTPServer(guest_iso) as http:
            kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "linux"}, "spec": {
                "source": {"url": http.url("/image")}, "checksum": f"sha256:{sha}",
                "targets": {"hostNames": [host]}}}, namespace)
            kube.create(VM, {"metadata": {"name": "dhcp"}, "spec": {
                "hostRef": host, "memory": "256Mi", "domainType": "qemu",
                "disks": [{"name": "media", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "linux"}}}],
                "interfaces": [{"name": "lan", "type": "network", "source": NETWORK}]}}, namespace)
            obj = kube.wait_condition(VM, "dhcp", "Ready", "True", namespace=namespace, timeout=120)
        started = time.monotonic()
        serial_log = nat_host.root / "log" / "qemu" / f"{obj['status']['domainName']}-serial.log"
        leased = kube.wait_for(lambda: serial_log.exists() and leased_address(serial_log.read_text(errors="replace")),
                               timeout=120, what=f"{DHCP_MARKER} on the guest's serial console")
        lease_seconds = time.monotonic() - started
        _nic, address, prefix = leased
        assert address.startswith(f"{SUBNET_PREFIX}.")
        # dnsmasq's view agrees: libvirt reads it from the status file dnsmasq's lease helper writes
        # after the ACK, which can lag the guest's own report on a busy machine
        leases = kube.wait_for(lambda: nat_host.leases(), timeout=20, what="the lease in libvirt's DHCPLeases")
        assert [lease["ipaddr"] for lease in leases] == [address]

        obj = kube.wait_for(lambda: (o := kube.get(VM, "dhcp", namespace))["status"].get("ipAddress") and o,
                            timeout=60, what="status.ipAddress")
        status_seconds = time.monotonic() - started
        [lan] = obj["status"]["interfaces"]
        assert lan["name"] == "lan" and lan["network"] == NETWORK
        assert lan["mac"] == nat_host.leases()[0]["mac"]
        assert lan["ipAddresses"] == [{"address": address, "prefix": prefix, "family": "IPv4", "source": "lease"}]
        assert obj["status"]["ipAddress"] == address
        row = kube.printed_columns(VM, "dhcp", namespace)
        assert row["IP"] == address and row["Status"] == "Running"
        print(f"lease on the serial console {lease_seconds:.1f}s after Ready; in the status "
              f"{status_seconds:.1f}s after Ready")

        kube.delete(VM, "dhcp", namespace)
        kube.wait_for(lambda: kube.get(VM, "dhcp", namespace) is None, timeout=60, what="VM deleted")
    finally:
        kube.delete(VM, "dhcp", namespace)
        kube.delete("isoimages", "linux", namespace)
        kube.delete("libvirthosts", host)


def test_guest_agent_is_asked_first_when_it_is_connected(nat_host, guest_iso, tmp_path) -> None:
    """The agent path of the address adapter on a real guest running qemu-ga. The operator does not
    add an agent channel to its own domains (yet), so this domain is defined directly."""
    import libvirt

    from libvirt_operator.adapters.libvirt.addresses import interface_addresses
    from libvirt_operator.reconcile import addresses

    libvirt.registerErrorHandler(lambda *_a: None, None)
    serial_log = tmp_path / "agent-serial.log"
    xml = f"""<domain type='qemu'><name>agent-guest</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type><boot dev='cdrom'/></os><features><acpi/><apic/></features>
      <devices>
        <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{guest_iso}'/>
          <target dev='hda' bus='ide'/><readonly/></disk>
        <interface type='network'><source network='{NETWORK}'/><model type='virtio'/>
          <alias name='ua-net-lan'/></interface>
        <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <serial type='pty'><log file='{serial_log}' append='on'/><target port='0'/></serial>
      </devices></domain>"""
    conn = libvirt.open(nat_host.uri)
    try:
        dom = conn.defineXML(xml)
        dom.create()
        text = lambda: serial_log.read_text(errors="replace") if serial_log.exists() else ""  # noqa: E731
        Kube.wait_for(lambda: leased_address(text()) and AGENT_MARKER in text(), timeout=120,
                      what="DHCP lease and qemu-ga started on the serial console")
        _nic, address, prefix = leased_address(text())
        Kube.wait_for(lambda: "state='connected'" in dom.XMLDesc(0), timeout=30, what="agent channel connected")
        obs = Kube.wait_for(lambda: (o := interface_addresses(conn, dom.UUIDString())) and o.reports
                            and o.reports[0].by_mac and o, timeout=30, what="the agent's answer")
        assert [r.source for r in obs.reports] == ["agent"]  # it knew every MAC: lease and ARP not asked
        [lan] = addresses.interfaces_status([{"name": "lan", "type": "network", "source": NETWORK}], obs.macs,
                                            None, running=True, observation=obs)
        assert lan["ipAddresses"][0] == {"address": address, "prefix": prefix, "family": "IPv4", "source": "agent"}
        assert all(a["source"] == "agent" for a in lan["ipAddresses"])  # e.g. its IPv6 link-local address, after
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        conn.close()
