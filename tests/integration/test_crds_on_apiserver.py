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
    assert columns == ["Host", "Status", "Ready", "Reason", "Age"]
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
