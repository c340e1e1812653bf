"""The admission policy for spec.cloudInit.userDataSecretRef on a real kube-apiserver: the Secret's
value ends up inside the guest (readable by whoever logs in or controls the VM), so naming it needs
`get` on it, as for ISOImage and LibvirtHost Secret references."""

from __future__ import annotations

from typing import Any

from tests.harness.kube import GROUP, VERSION, Kube
from tests.integration.test_admission_policies import (  # noqa: F401  (fixtures)
    _created, _denied, _grant, _wait_enforced, mallory, policies,
)


def test_vm_cannot_put_a_secret_its_creator_cannot_read_into_a_guest(kube, policies, namespace,  # noqa: F811
                                                                      mallory) -> None:  # noqa: F811
    user, custom = mallory
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "db-userdata"},
                                                   "stringData": {"userdata": "#cloud-config\npassword: x\n"}})

    def create(name: str, cloud_init: dict[str, Any] | None, **kwargs: Any) -> Any:
        spec: dict[str, Any] = {"runStrategy": "Halted"}
        if cloud_init is not None:
            spec["cloudInit"] = cloud_init
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine", "metadata": {"name": name},
                "spec": spec}
        return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines", body, **kwargs)

    steal = {"userDataSecretRef": {"name": "db-userdata"}}
    _wait_enforced(lambda: create("steal", steal, dry_run="All"), "userDataSecretRef")
    body = _denied(create, "steal", steal)
    assert f"you may not get Secret {namespace}/db-userdata" in body
    assert kube.get("virtualmachines", "steal", namespace) is None
    create("inline", {"userData": "#cloud-config\n"})  # control: inline user data needs no Secret access
    # Once allowed to read that one Secret, the user may hand it to the operator.
    _grant(kube, namespace, user, "read-db-userdata", [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["db-userdata"], "verbs": ["get"]}])
    Kube.wait_for(lambda: _created(create, "allowed", steal), timeout=15, what="VM with a readable Secret admitted")
    for name in ("inline", "allowed"):
        kube.delete("virtualmachines", name, namespace=namespace)
