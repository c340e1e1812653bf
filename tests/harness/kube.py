"""A small synchronous Kubernetes client for tests (the `kubernetes` package), with polling helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from libvirt_operator.devenv.resources import apply_crds

GROUP, VERSION = "virt.libvirt-operator.io", "v1alpha1"
KINDS = {"libvirthosts": "LibvirtHost", "virtualmachines": "VirtualMachine", "isoimages": "ISOImage",
         "virtualmachinesnapshots": "VirtualMachineSnapshot", "virtualmachinerestores": "VirtualMachineRestore",
         "virtualmachinemigrations": "VirtualMachineMigration"}
REPO = Path(__file__).resolve().parents[2]


def cert_kubeconfig(controlplane: Any, user: str, group: str, directory: Path) -> Path:
    """A kubeconfig for `user` in `group`, authenticated by a client cert from the cluster CA and embedded
    in the file (as kubeadm's `kubeadm kubeconfig user` makes them)."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from libvirt_operator.devenv.controlplane import _cert_pem, _issue, _key_pem, _name, _new_key

    ca_cert = x509.load_pem_x509_certificate(controlplane.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((controlplane.cert_dir / "ca.key").read_bytes(), None)
    key = _new_key()
    cert = _issue(subject=_name(user, group), key=key, issuer=ca_cert.subject, issuer_key=ca_key,
                  eku=[ExtendedKeyUsageOID.CLIENT_AUTH])

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": user,
           "clusters": [{"name": "envtest", "cluster": {"server": controlplane.server_url,
                                                         "certificate-authority-data": b64(_cert_pem(ca_cert))}}],
           "users": [{"name": user, "user": {"client-certificate-data": b64(_cert_pem(cert)),
                                             "client-key-data": b64(_key_pem(key))}}],
           "contexts": [{"name": user, "context": {"cluster": "envtest", "user": user}}]}
    path = directory / f"{user}.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


class Kube:
    def __init__(self, kubeconfig: str | Path) -> None:
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ext = client.ApiextensionsV1Api(self.api)

    # --- CRDs and namespaces ---
    def apply_crds(self, crd_dir: Path = REPO / "crds") -> list[str]:
        """Apply the CRD files in ``crd_dir`` (the same code path as `make run`), wait for Established."""
        docs = [yaml.safe_load(path.read_text()) for path in sorted(crd_dir.glob("*.yaml"))]
        return apply_crds(self.api, docs)

    def new_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        return name

    # --- custom objects ---
    def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KINDS[plural], **body}
        if namespace:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        return self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            if namespace:
                return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            return self.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def printed_columns(self, plural: str, name: str, namespace: str) -> dict[str, Any]:
        """The row `kubectl get` prints: the apiserver's Table rendering of the CRD's printer columns."""
        request = self.api.param_serialize(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}, auth_settings=["BearerToken"])
        response = self.api.call_api(*request)
        response.read()
        data = json.loads(response.data)
        assert data["kind"] == "Table", data
        return dict(zip([c["name"] for c in data["columnDefinitions"]], data["rows"][0]["cells"], strict=True))

    def patch(self, plural: str, name: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        if namespace:
            return self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body)
        return self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, body)

    def delete(self, plural: str, name: str, namespace: str | None = None) -> None:
        try:
            if namespace:
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            else:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def events_for(self, namespace: str, name: str) -> list[Any]:
        events = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return list(events.items)

    def wait_events(self, namespace: str, name: str, *reasons: str, timeout: float = 30) -> list[str]:
        """The object's Event reasons once all of `reasons` are among them.

        The operator posts an Event after the status it reports (kopf queues Events), so a test that
        has just seen the status waits for the Event rather than reading the list once."""
        def seen() -> list[str] | None:
            got = [e.reason for e in self.events_for(namespace, name)]
            return got if set(reasons) <= set(got) else None
        return self.wait_for(seen, timeout=timeout, what=f"Events {', '.join(reasons)} for {name}")

    # --- waiting ---
    @staticmethod
    def wait_for(predicate: Callable[[], Any], *, timeout: float = 30, interval: float = 0.2,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")

    def wait_condition(self, plural: str, name: str, ctype: str, status: str, *, namespace: str | None = None,
                       timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.get(plural, name, namespace)
            for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
                if cond["type"] == ctype and cond["status"] == status:
                    return obj
            return None
        return self.wait_for(check, timeout=timeout, what=f"{plural}/{name} {ctype}={status}")


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)

