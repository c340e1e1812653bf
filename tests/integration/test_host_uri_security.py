"""LibvirtHost URIs that would make the operator read its own files, run programs or skip
verification: refused by the CRD's CEL rules on the real apiserver, and by the operator at
reconcile for what only the operator can judge (its --allow-test-driver setting and directories).
Status never quotes a file the URI names."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from libvirt_operator.core.api.host import LibvirtHostSpec
from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.core.settings import Settings
from libvirt_operator.reconcile.host import connect_options
from libvirt_operator.reconcile.runtime import Runtime
from tests.harness.kube import condition

SECRET = "SUPERSECRET-7f3a9c"

# Each refused by the CRD (HTTP 422), with a word of the rule's message.
CEL_REFUSED = {
    "test:///var/run/secrets/kubernetes.io/serviceaccount/token": "test:///default or test:///abs/path.xml",
    "test:///etc/../var/run/secrets/x.xml": "test:///default or test:///abs/path.xml",
    "test://host/default": "test:///default or test:///abs/path.xml",
    "qemu+ssh://root@h/system?keyfile=/var/run/secrets/kubernetes.io/serviceaccount/token": "only the query",
    "qemu+ssh://root@h/system?known_hosts=/dev/null": "only the query",
    "qemu+tls://h/system?pkipath=/tmp": "only the query",
    "qemu+ssh://root@h/system?command=/bin/sh": "only the query",
    "qemu+ssh://root@h/system?socket=/run/docker.sock": "only the query",
    "qemu+ssh://root@h/system?no_verify=1": "only the query",
    "qemu+ssh://root@h/system?netcat=/tmp/nc": "only the query",
    "qemu+ssh://root@h/system?NO_VERIFY=1": "only the query",
    "qemu+ssh://root@h/system?mode=legacy&no_verify=1": "only the query",
    "qemu+ssh://root@h/system?mode=direct": "only the query",
    "qemu+ssh://root@h/system?mode=legacy;no_verify=1": "may contain only",
    "qemu+ssh://root@h/system?%6eo_verify=1": "may contain only",
    "qemu+ssh://root@h/system#x": "may contain only",
    "qemu+ssh://root:hunter2@h/system": "password",
    "qemu:///embed?root=/var/lib/x": "only the query",
    "qemu:///embed": "/system or /session",
    "qemu+ext:///system": "spec.uri",
}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.mark.parametrize("uri, why", CEL_REFUSED.items())
def test_hostile_uri_is_refused_by_the_crd(kube, uri: str, why: str) -> None:
    with pytest.raises(ApiException) as info:
        kube.create("libvirthosts", {"metadata": {"name": _name("hostile")}, "spec": {"uri": uri, "insecure": True}})
    assert info.value.status == 422, info.value.body
    assert why in info.value.body


@pytest.mark.parametrize("uri", ["qemu+ssh://root@kvm-01.example.com:2222/system?mode=legacy&proxy=native",
                                 "qemu+tls://[fd00::1]:16514/session", "qemu:///system", "test:///default",
                                 "test:///tmp/hosts/a-1.xml"])
def test_ordinary_uri_is_accepted_by_the_crd(kube, uri: str) -> None:
    # Server-side dry run: admitted and validated like a real create, never stored, so the session
    # operator never tries to reach these (non-loopback) addresses.
    from tests.harness.kube import GROUP, VERSION
    created = kube.custom.create_cluster_custom_object(
        GROUP, VERSION, "libvirthosts", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LibvirtHost",
                                         "metadata": {"name": _name("ok")}, "spec": {"uri": uri}},
        dry_run="All")
    assert created["spec"]["uri"] == uri


def _assert_refused_without_content(kube, name: str, reason: str, *words: str) -> None:
    host = kube.wait_condition("libvirthosts", name, "Ready", "False", timeout=60)
    ready = condition(host, "Ready")
    assert ready["reason"] == reason, ready
    for word in words:
        assert word in ready["message"]
    for text in (ready["message"], host["status"]["error"]["message"], str(host["status"])):
        assert SECRET not in text
    events = kube.wait_for(  # the Event is posted after the status patch
        lambda: kube.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={name}").items,
        timeout=30, what=f"events of {name}")
    assert all(SECRET not in (e.message or "") for e in events)


def test_file_outside_the_test_driver_dirs_is_refused_without_reading_it(kube, operator, tmp_path_factory) -> None:
    # /var/tmp is outside the session's temporary directory, the only --test-driver-dir here.
    outside = Path("/var/tmp") / f"lvop-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    try:
        (outside / "token.xml").write_text(SECRET + "\n")
        name = _name("outside")
        kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": f"test://{outside}/token.xml"}})
        _assert_refused_without_content(kube, name, "InvalidSpec", "--test-driver-dir")
        kube.delete("libvirthosts", name)
    finally:
        for f in outside.iterdir():
            f.unlink()
        outside.rmdir()


def test_test_driver_parse_error_never_quotes_the_file(kube, operator, tmp_path) -> None:
    # Inside the allowed directory, but not a host file: libvirt's parse error quotes its first line.
    (tmp_path / "token.xml").write_text(SECRET + "\n")
    name = _name("garbage")
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": f"test://{tmp_path}/token.xml"}})
    _assert_refused_without_content(kube, name, "HostUnreachable", "could not load", "details withheld")
    kube.delete("libvirthosts", name)


def test_secret_with_wrong_keys_names_expected_and_found_keys(kube, operator, namespace) -> None:
    from kubernetes import client

    kube.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="ssh"), string_data={"id_rsa": "k", "ssh-privatekey": "k"}))
    name = _name("keys")
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {
        "uri": "qemu+ssh://root@127.0.0.1:1/system", "credentialsSecretRef": {"name": "ssh", "namespace": namespace}}})
    host = kube.wait_condition("libvirthosts", name, "Ready", "False", timeout=30)
    message = condition(host, "Ready")["message"]
    assert condition(host, "Ready")["reason"] == "CredentialsNotFound"
    assert f"Secret {namespace}/ssh" in message and "has no key known_hosts" in message
    assert "expected keys ssh-privatekey, known_hosts" in message and "found keys: id_rsa, ssh-privatekey" in message
    kube.delete("libvirthosts", name)


class _NoKube:
    async def read_secret(self, namespace: str, name: str) -> None:  # pragma: no cover - never reached
        raise AssertionError("the URI is refused before any Secret is read")


def test_operator_without_the_flag_refuses_the_test_driver(test_host_factory) -> None:
    """An operator started without --allow-test-driver (the production default) refuses every test://
    URI, even test:///default and files the CRD would accept."""
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=None, kube=_NoKube())  # type: ignore[arg-type]
    for uri in ("test:///default", test_host_factory("flagless")):
        spec = LibvirtHostSpec.model_validate({"uri": uri})
        with pytest.raises(AppError) as info:
            asyncio.run(connect_options(spec, rt))
        assert info.value.code == ErrorCode.INVALID_SPEC
        assert "--allow-test-driver" in info.value.message


def test_ssh_host_without_a_secret_is_refused_naming_the_keys() -> None:
    """Strict host-key checking needs the Secret's known_hosts: no Secret, no connection attempt."""
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=None, kube=_NoKube())  # type: ignore[arg-type]
    spec = LibvirtHostSpec.model_validate({"uri": "qemu+ssh://root@kvm-01.example.com/system"})
    with pytest.raises(AppError) as info:
        asyncio.run(connect_options(spec, rt))
    assert info.value.code == ErrorCode.CREDENTIALS_NOT_FOUND
    assert "credentialsSecretRef is missing" in info.value.message
    assert "ssh-privatekey, known_hosts" in info.value.message
