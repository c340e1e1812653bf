"""IP addresses of a VM: which sources are asked (from the live domain XML), what the status shows
(trust order, ordering, stopped VMs), the polling schedule, and the adapter on libvirt's test driver."""

from __future__ import annotations

import libvirt
import pytest

from libvirt_operator.adapters.libvirt.addresses import interface_addresses, sources_to_ask
from libvirt_operator.core.addresses import AddressObservation, ReportedAddress, SourceReport
from libvirt_operator.reconcile import addresses

libvirt.registerErrorHandler(lambda *_a: None, None)
MAC = "52:54:00:aa:bb:01"
V4 = ReportedAddress("192.168.150.20", 24, "IPv4")
V6 = ReportedAddress("fd00::20", 64, "IPv6")
LINK_LOCAL = ReportedAddress("fe80::5054:ff:feaa:bb01", 64, "IPv6")
NIC = {"name": "nic0", "type": "network", "source": "lan"}


def _xml(interfaces: str, channel: str = "") -> str:
    return f"<domain><devices>{interfaces}{channel}</devices></domain>"


def test_sources_in_trust_order_only_those_that_can_know() -> None:
    net = f"<interface type='network'><mac address='{MAC.upper()}'/><source network='lan'/></interface>"
    bridge = "<interface type='bridge'><mac address='52:54:00:aa:bb:02'/><source bridge='br0'/></interface>"
    agent = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='{}'/></channel>"
    assert sources_to_ask(_xml(net)) == (("lease", "arp"), {MAC})
    assert sources_to_ask(_xml(bridge))[0] == ("arp",)  # no libvirt network: no lease to look up
    assert sources_to_ask(_xml(net, agent.format("connected")))[0] == ("agent", "lease", "arp")
    # An agent channel whose agent is not running would cost a timeout per poll: not asked.
    assert sources_to_ask(_xml(net, agent.format("disconnected")))[0] == ("lease", "arp")


def test_most_exact_source_wins_and_ipv4_comes_first() -> None:
    obs = AddressObservation((SourceReport("arp", {MAC: (ReportedAddress("192.168.150.99", None, "IPv4"),)}),
                              SourceReport("lease", {MAC: (V4,)}),
                              SourceReport("agent", {MAC: (LINK_LOCAL, V6, V4)})), {"nic0": MAC})
    [entry] = addresses.interfaces_status([NIC], obs.macs, None, running=True, observation=obs)
    assert entry == {"name": "nic0", "mac": MAC, "network": "lan", "ipAddresses": [
        {"address": "192.168.150.20", "prefix": 24, "family": "IPv4", "source": "agent"},
        {"address": "fd00::20", "prefix": 64, "family": "IPv6", "source": "agent"},
        {"address": "fe80::5054:ff:feaa:bb01", "prefix": 64, "family": "IPv6", "source": "agent"}]}
    # Without the agent: the lease; a failed source is skipped.
    obs = AddressObservation((SourceReport("lease", {}, "no lease yet"),
                              SourceReport("arp", {MAC: (ReportedAddress("192.168.150.99", None, "IPv4"),)})))
    [entry] = addresses.interfaces_status([NIC], {"nic0": MAC}, None, running=True, observation=obs)
    assert entry["ipAddresses"] == [{"address": "192.168.150.99", "family": "IPv4", "source": "arp"}]


def test_status_keeps_addresses_across_reconciles_and_drops_them_when_stopped() -> None:
    status: dict = {}
    obs = AddressObservation((SourceReport("lease", {MAC: (V4,)}),), {"nic0": MAC})
    addresses.put(status, addresses.interfaces_status([NIC, {"name": "nic1"}], obs.macs, None, running=True,
                                                      observation=obs))
    assert status["ipAddress"] == "192.168.150.20"
    # A full reconcile (same MACs, no observation) keeps what the poller found: nothing to write.
    again = dict(status)
    addresses.put(again, addresses.interfaces_status([NIC, {"name": "nic1"}], {"nic0": MAC}, status["interfaces"],
                                                     running=True))
    assert again == status
    # A new MAC (the interface was replaced): the old addresses were someone else's.
    addresses.put(again, addresses.interfaces_status([NIC], {"nic0": "52:54:00:00:00:09"}, status["interfaces"],
                                                     running=True))
    assert "ipAddress" not in again and "ipAddresses" not in again["interfaces"][0]
    addresses.without_addresses(status)
    assert status == {"interfaces": [{"name": "nic0", "mac": MAC, "network": "lan"}, {"name": "nic1"}]}


def test_first_address_is_the_first_interface_that_has_one() -> None:
    assert addresses.first_address([{"name": "a"}, {"name": "b", "ipAddresses": [{"address": "10.9.0.2"}]}]) == "10.9.0.2"
    assert addresses.first_address([]) is None


def test_schedule_polls_soon_after_a_start_backs_off_while_missing_and_rarely_once_known() -> None:
    s = addresses.PollSchedule()
    assert not s.due("u", "run1", 0.0)          # first seen: due after FIRST_POLL_SECONDS
    assert not s.due("u", "run1", 2.9) and s.due("u", "run1", 3.0)
    gaps = []
    now = 3.0
    for _ in range(16):
        s.polled("u", now, found=False)
        nxt = now
        while not s.due("u", "run1", nxt):
            nxt += 0.5
        gaps.append(nxt - now)
        now = nxt
    # every 5 s in the first minute of the run, then backing off to every 30 s
    assert gaps == [5.0] * 12 + [10.0, 20.0, 30.0, 30.0]
    s.polled("u", now, found=True)
    assert not s.due("u", "run1", now + 59) and s.due("u", "run1", now + 60)
    assert not s.due("u", "run2", now + 60)  # a new run starts over: soon, not at once
    assert s.due("u", "run2", now + 63)
    s.retain([])
    assert len(s) == 0


@pytest.fixture
def test_conn():
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def test_adapter_on_the_test_driver(test_conn) -> None:
    dom = test_conn.lookupByName("test")
    obs = interface_addresses(test_conn, dom.UUIDString())
    assert obs is not None
    assert [r.source for r in obs.reports] == ["lease"]  # every MAC answered: ARP is not asked
    assert obs.reports[0].by_mac == {"aa:bb:cc:dd:ee:ff": (ReportedAddress("192.168.122.3", 24, "IPv4"),)}
    dom.destroy()
    assert interface_addresses(test_conn, dom.UUIDString()) is None  # not running: nothing to ask
    assert interface_addresses(test_conn, "00000000-0000-0000-0000-000000000001") is None


def test_an_operator_restart_spreads_the_first_polls_of_vms_with_known_addresses() -> None:
    s = addresses.PollSchedule()
    uids = [f"uid-{i}" for i in range(200)]
    for uid in uids:
        assert not s.due(uid, "run", 0.0, known=True)
    first = [next(t / 2 for t in range(0, 200) if s.due(uid, "run", t / 2, known=True)) for uid in uids]
    assert min(first) >= addresses.FIRST_POLL_SECONDS
    assert max(first) <= addresses.FIRST_POLL_SECONDS + addresses.KNOWN_POLL_SECONDS
    # not all at once: no 5-second window holds more than a fifth of them
    assert max(sum(1 for f in first if w <= f < w + 5) for w in range(0, 65)) < len(uids) / 5
