"""A running VM's IP addresses in status.interfaces and the IP column, on libvirt test-driver hosts
(the test driver answers virDomainInterfaceAddresses for interfaces on a network), through the real
apiserver and the in-process operator."""

from __future__ import annotations

import time
import uuid

from prometheus_client import REGISTRY

from libvirt_operator.reconcile import addresses

VM = "virtualmachines"


def polls(host: str) -> float:
    return REGISTRY.get_sample_value("libvirt_operator_libvirt_calls_total",
                                     {"host": host, "operation": "interface_addresses", "outcome": "ok"}) or 0.0


def test_running_vm_shows_its_leased_address_and_stopping_clears_it(kube, operator, namespace, test_host_factory,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(addresses, "KNOWN_POLL_SECONDS", 1.0)  # in-process operator: every second, not minute
    host = f"ip-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host},
                                 "spec": {"uri": test_host_factory(host, network=True)}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=30)
    kube.create(VM, {"metadata": {"name": "web"}, "spec": {
        "hostRef": host, "memory": "128Mi",
        "interfaces": [{"name": "nic0", "type": "network", "source": "default"},
                       {"name": "nic1", "type": "network", "source": "default"}]}}, namespace)

    t0 = time.monotonic()
    obj = kube.wait_for(lambda: (o := kube.get(VM, "web", namespace)) and (o.get("status") or {}).get("ipAddress")
                        and o, timeout=30, what="an IP address in the status")
    seconds = time.monotonic() - t0
    status = obj["status"]
    nic0, nic1 = status["interfaces"]
    assert nic0["name"] == "nic0" and nic0["network"] == "default" and nic0["mac"]
    assert nic0["ipAddresses"] == [{"address": status["ipAddress"], "prefix": 24, "family": "IPv4",
                                    "source": "lease"}]
    assert status["ipAddress"].startswith("192.168.122.")  # the test driver's made-up lease (never dialled)
    assert nic1["ipAddresses"][0]["address"] != status["ipAddress"]  # the IP column: the first interface's
    assert kube.printed_columns(VM, "web", namespace)["IP"] == status["ipAddress"]
    print(f"address visible {seconds:.1f}s after the VM was created")

    # Asked again and again (every second here instead of every minute): an unchanged answer writes
    # nothing, so the resourceVersion stays.
    version = obj["metadata"]["resourceVersion"]
    asked = polls(host)
    kube.wait_for(lambda: polls(host) >= asked + 3, timeout=70, what="three more polls")
    assert kube.get(VM, "web", namespace)["metadata"]["resourceVersion"] == version

    kube.patch(VM, "web", {"spec": {"runStrategy": "Halted"}}, namespace)
    obj = kube.wait_for(lambda: (o := kube.get(VM, "web", namespace))["status"].get("printableStatus")
                        == "Stopped" and o, timeout=30, what="stopped")
    assert "ipAddress" not in obj["status"]
    assert all("ipAddresses" not in i for i in obj["status"]["interfaces"])
    assert obj["status"]["interfaces"][0]["mac"] == nic0["mac"]  # names and MACs stay
    assert kube.printed_columns(VM, "web", namespace).get("IP") in (None, "")

    kube.patch(VM, "web", {"spec": {"runStrategy": "Always"}}, namespace)
    kube.wait_for(lambda: (kube.get(VM, "web", namespace)["status"].get("ipAddress") or "").startswith("192.168."),
                  timeout=30, what="the address again after a start")
    kube.delete(VM, "web", namespace)
    kube.wait_for(lambda: kube.get(VM, "web", namespace) is None, timeout=30, what="VM deleted")
    kube.delete("libvirthosts", host)
