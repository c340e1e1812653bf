"""The generated CRDs on a real kube-apiserver: structural, and CEL rules reject bad input early."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException


def _reject(fn, *args, **kwargs) -> str:
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    assert info.value.status == 422, info.value.body
    return info.value.body


def test_crds_are_established_and_printer_columns_served(kube) -> None:
    crd = kube.ext.read_custom_resource_definition("virtualmachines.virt.libvirt-operator.io")
    columns = [c.name for c in crd.spec.versions[0].additional_printer_columns]
    assert columns == ["Host", "Status", "IP", "Ready", "Reason", "Age"]
    assert crd.spec.names.short_names == ["lvvm"]


def test_plain_tcp_host_needs_the_insecure_flag(kube) -> None:
    body = _reject(kube.create, "libvirthosts", {"metadata": {"name": "plain-tcp"},
                                                 "spec": {"uri": "qemu+tcp://127.0.0.1:1/system"}})
    assert "insecure: true" in body


def test_uri_scheme_is_validated(kube) -> None:
    body = _reject(kube.create, "libvirthosts", {"metadata": {"name": "bad-scheme"},
                                                 "spec": {"uri": "http://example.invalid/"}})
    assert "spec.uri" in body


def test_vm_host_ref_is_immutable_and_defaults_are_applied(kube, namespace) -> None:
    vm = kube.create("virtualmachines", {"metadata": {"name": "pinned"}, "spec": {"hostRef": "a"}},
                     namespace=namespace)
    assert vm["spec"]["runStrategy"] == "Always" and vm["spec"]["memory"] == "512Mi"
    body = _reject(kube.patch, "virtualmachines", "pinned", {"spec": {"hostRef": "b"}}, namespace=namespace)
    assert "hostRef is immutable" in body
    kube.patch("virtualmachines", "pinned", {"spec": {"cpu": 2}}, namespace=namespace)  # other fields may change
    kube.patch("virtualmachines", "pinned", {"metadata": {"finalizers": None}}, namespace=namespace)
    kube.delete("virtualmachines", "pinned", namespace=namespace)


def test_vm_disk_needs_exactly_one_source(kube, namespace) -> None:
    body = _reject(kube.create, "virtualmachines", {"metadata": {"name": "twodisk"}, "spec": {
        "disks": [{"name": "root", "volume": {"size": "1Gi"}, "cdrom": {"isoImageRef": {"name": "x"}}}]}},
        namespace=namespace)
    assert "exactly one of volume or cdrom" in body


def test_iso_checksum_required_unless_opted_out(kube, namespace) -> None:
    body = _reject(kube.create, "isoimages", {"metadata": {"name": "nosum"},
                                              "spec": {"source": {"url": "http://127.0.0.1/x.iso"}}},
                   namespace=namespace)
    assert "checksum is required" in body
    _reject(kube.create, "isoimages", {"metadata": {"name": "ftp"}, "spec": {
        "source": {"url": "ftp://127.0.0.1/x.iso"}, "skipChecksumVerification": True}}, namespace=namespace)


# ------------------------------------------------------------------ limits on user input (hostile manifests)

def _vm(name: str, **spec) -> dict:
    return {"metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize(("spec", "expected"), [
    ({"disks": [{"name": f"d{i}", "volume": {"size": "1Gi"}} for i in range(33)]}, "spec.disks: Too many"),
    ({"interfaces": [{"name": f"n{i}"} for i in range(17)]}, "spec.interfaces: Too many"),
    ({"disks": [{"name": "root", "volume": {"size": "1Gi"}}, {"name": "root", "volume": {"size": "2Gi"}}]},
     "Duplicate value"),
    ({"disks": [{"name": "x" * 41, "volume": {"size": "1Gi"}}]}, "spec.disks[0].name: Too long"),
    ({"disks": [{"name": "Root_Disk", "volume": {"size": "1Gi"}}]}, "spec.disks[0].name in body should match"),
    ({"interfaces": [{"name": "n" * 41}]}, "spec.interfaces[0].name: Too long"),
    ({"cpu": 0}, "spec.cpu in body should be greater than or equal to 1"),
    ({"cpu": 100000}, "spec.cpu in body should be less than or equal to 512"),
    ({"memory": "1Ki"}, "memory must be at least 16Mi"),
    ({"memory": "1Ei"}, "memory must be at most 16Ti"),
    ({"memory": "1" * 40}, "spec.memory: Too long"),
    ({"disks": [{"name": "root", "volume": {"size": "0"}}]}, "size must be at least 1Mi"),
    ({"disks": [{"name": "root", "volume": {"size": "65Ti"}}]}, "size must be at most 64Ti"),
    ({"disks": [{"name": "root", "volume": {"size": "999999999999999999999"}}]}, "size must be at most 64Ti"),
    ({"disks": [{"name": "a", "bootOrder": 1, "volume": {"size": "1Gi"}},
                {"name": "b", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "x"}}}]},
     "bootOrder values must be unique across disks"),
    ({"interfaces": [{"name": "a", "macAddress": "52:54:00:00:00:01"},
                     {"name": "b", "macAddress": "52:54:00:00:00:01"}]}, "macAddress values must be unique"),
    ({"interfaces": [{"name": "a", "macAddress": "01:00:5e:00:00:01"}]}, "macAddress must be a unicast address"),
    ({"interfaces": [{"name": "a", "type": "bridge", "source": "br-much-too-long-name"}]},
     "a bridge name is at most 15 characters"),
    ({"hostRef": "Not_A_Host"}, "spec.hostRef in body should match"),
    ({"hostSelector": {"matchLabels": {f"k{i}": "v" for i in range(17)}}}, "spec.hostSelector.matchLabels: Too many"),
    ({"hostSelector": {"matchLabels": {"k" * 318: "v"}}}, "keys must be at most 317 characters"),
    ({"hostSelector": {"matchLabels": {"zone": "v" * 64}}}, "Too long"),
    ({"disks": [{"name": "c", "cdrom": {"isoImageRef": {"name": "../../etc"}}}]},
     "spec.disks[0].cdrom.isoImageRef.name in body should match"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hostile_vm_manifests_are_refused_with_clear_messages(kube, namespace, spec, expected) -> None:
    body = _reject(kube.create, "virtualmachines", _vm("hostile", **spec), namespace=namespace)
    assert expected in body, body


def test_vm_at_the_limits_is_accepted(kube, namespace) -> None:
    """The largest VM the schema allows still fits the apiserver's CEL cost budget and is stored."""
    vm = kube.create("virtualmachines", _vm(
        "biggest", hostRef="h.example", cpu=512, memory="16Ti",
        disks=[{"name": f"d{i:02d}" + "x" * 37, "bootOrder": i + 1, "volume": {"size": "64Ti", "pool": "p" * 253}}
               for i in range(32)],
        interfaces=[{"name": f"n{i:02d}" + "x" * 37, "macAddress": f"52:54:00:00:00:{i:02x}",
                     "type": "network", "source": "s" * 253} for i in range(16)]), namespace=namespace)
    assert len(vm["spec"]["disks"]) == 32 and len(vm["spec"]["interfaces"]) == 16
    kube.patch("virtualmachines", "biggest", {"metadata": {"finalizers": None}}, namespace=namespace)
    kube.delete("virtualmachines", "biggest", namespace=namespace)


def test_iso_target_list_is_bounded(kube, namespace) -> None:
    body = _reject(kube.create, "isoimages", {"metadata": {"name": "many"}, "spec": {
        "source": {"url": "http://127.0.0.1/x.iso"}, "skipChecksumVerification": True,
        "targets": {"hostNames": [f"h{i}" for i in range(65)]}}}, namespace=namespace)
    assert "spec.targets.hostNames: Too many" in body
