"""spec.cloudInit and disks from images on a real kube-apiserver: bad input is refused by the CRD
(CEL and schema bounds) before the operator sees it."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from libvirt_operator.core.api.cloudinit import MAX_USER_DATA

VM = "virtualmachines"


def _reject(kube, namespace: str, name: str, spec: dict) -> str:
    with pytest.raises(ApiException) as info:
        kube.create(VM, {"metadata": {"name": name}, "spec": spec}, namespace=namespace)
    assert info.value.status == 422, info.value.body
    return info.value.body


def test_user_data_and_secret_ref_are_mutually_exclusive(kube, namespace) -> None:
    body = _reject(kube, namespace, "both", {"cloudInit": {
        "userData": "#cloud-config\n", "userDataSecretRef": {"name": "ud"}}})
    assert "set userData or userDataSecretRef, not both" in body
    ok = kube.create(VM, {"metadata": {"name": "ref"}, "spec": {"cloudInit": {
        "userDataSecretRef": {"name": "ud"}, "networkData": "version: 2\n"}}}, namespace=namespace)
    assert ok["spec"]["cloudInit"]["userDataSecretRef"]["key"] == "userdata"  # the default key


def test_user_data_size_is_bounded(kube, namespace) -> None:
    body = _reject(kube, namespace, "huge", {"cloudInit": {"userData": "#" * (MAX_USER_DATA + 1)}})
    assert "spec.cloudInit.userData" in body and "Too long" in body
    kube.create(VM, {"metadata": {"name": "max"}, "spec": {"cloudInit": {"userData": "#" * MAX_USER_DATA}}},
                namespace=namespace)


def test_image_disks_are_validated(kube, namespace) -> None:
    src = {"volume": {"pool": "images", "name": "debian-12.qcow2"}}
    body = _reject(kube, namespace, "nosize", {"disks": [{"name": "root", "volume": {}}]})
    assert "a volume needs a size unless it has a source" in body
    body = _reject(kube, namespace, "noclone", {"disks": [{"name": "root", "volume": {"size": "1Gi", "clone": "full"}}]})
    assert "clone applies only to a volume with a source" in body
    for stolen in ("lvop-0b7e4c2a-55f1-4d7e-9a0c-3f2b1e6d8c90-root", "iso-team-b-secret-image-1234abcd-0011223344556677"):
        body = _reject(kube, namespace, "steal", {"disks": [{"name": "root", "volume": {
            "source": {"volume": {"pool": "default", "name": stolen}}}}]})
        assert "managed by the operator and cannot be a disk's source" in body
    body = _reject(kube, namespace, "badmode", {"disks": [{"name": "root", "volume": {"source": src, "clone": "copy"}}]})
    assert "Unsupported value" in body
    body = _reject(kube, namespace, "slash", {"disks": [{"name": "root", "volume": {
        "source": {"volume": {"pool": "images", "name": "../etc/shadow"}}}}]})
    assert "spec.disks[0].volume.source.volume.name" in body
    vm = kube.create(VM, {"metadata": {"name": "fromimage"}, "spec": {"disks": [
        {"name": "root", "bootOrder": 1, "volume": {"source": src}},
        {"name": "data", "volume": {"source": src, "clone": "full", "size": "20Gi"}}]}}, namespace=namespace)
    assert vm["spec"]["disks"][0]["volume"] == {"source": src}  # clone defaults to backing in the operator


def test_the_example_manifest_is_accepted(kube, namespace) -> None:
    import yaml

    from tests.harness.kube import REPO

    doc = yaml.safe_load((REPO / "manifests" / "examples" / "vm-cloudinit.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    vm = kube.create(VM, doc, namespace=namespace)
    assert vm["spec"]["cloudInit"]["userDataSecretRef"] == {"name": "web-userdata", "key": "userdata"}
    assert vm["spec"]["disks"][0]["volume"]["clone"] == "backing"
