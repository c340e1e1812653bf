"""The Argo CD health check (manifests/argocd/health.lua, installed by argocd-cm-patch.yaml) run by a
real Lua interpreter on the status objects the real operator writes on the real apiserver: what an
Argo CD user sees for a VM that runs, crash-loops or waits on a dead host, a host that answers or
refuses, an ISO that was just created or whose checksum is wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.http_server import TestHTTPServer
from tests.harness.prometheus import REPO

lupa = pytest.importorskip("lupa.lua51")  # Argo CD runs gopher-lua: Lua 5.1

SCRIPT = (REPO / "manifests" / "argocd" / "health.lua").read_text()
GROUP = "virt.libvirt-operator.io"
VM, HOST, ISO = "virtualmachines", "libvirthosts", "isoimages"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """As Argo CD runs it: the object as the global `obj`, the script's returned table."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return result["status"], result["message"]


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_argocd_cm_installs_the_script_for_every_kind() -> None:
    cm = yaml.safe_load((REPO / "manifests" / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"] == {f"resource.customizations.health.{GROUP}_{kind}": SCRIPT
                          for kind in ("VirtualMachine", "ISOImage", "LibvirtHost", "VirtualMachineSnapshot",
                                       "VirtualMachineRestore", "VirtualMachineMigration")}


def test_health_of_real_objects(kube, operator, namespace, test_host_factory, tmp_path: Path) -> None:
    host = uniq("argo-hv")
    fresh_host = kube.create(HOST, {"metadata": {"name": host}, "spec": {"uri": test_host_factory(host, cpus=8, memory_mib=8192)}})
    assert health(fresh_host)[0] == "Progressing"  # as created: no status yet
    ready_host = kube.wait_condition(HOST, host, "Ready", "True", timeout=30)
    assert health(ready_host)[0] == "Healthy"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = uniq("argo-dead")
    kube.create(HOST, {"metadata": {"name": dead}, "spec": {"uri": f"qemu+tcp://127.0.0.1:{port}/system", "insecure": True}})
    dead_host = kube.wait_condition(HOST, dead, "Ready", "False", timeout=30)
    state, message = health(dead_host)
    assert state == "Degraded" and "HOST_UNREACHABLE" in message, (state, message, dead_host["status"])

    running = kube.create(VM, {"metadata": {"name": "web"}, "spec": {"memory": "64Mi", "hostRef": host}}, namespace)
    assert health(running)[0] == "Progressing"
    obj = kube.wait_for(lambda: (o := kube.get(VM, "web", namespace)) and
                        (o.get("status") or {}).get("printableStatus") == "Running" and o, what="web Running")
    assert health(obj)[0] == "Healthy"

    kube.create(VM, {"metadata": {"name": "off"}, "spec": {"memory": "64Mi", "hostRef": host,
                                                                   "runStrategy": "Halted"}}, namespace)
    obj = kube.wait_for(lambda: (o := kube.get(VM, "off", namespace)) and
                        (o.get("status") or {}).get("printableStatus") == "Stopped" and o, what="off Stopped")
    assert health(obj)[0] == "Healthy"  # stopped on purpose is what the user asked for

    kube.create(VM, {"metadata": {"name": "stranded"}, "spec": {"memory": "64Mi", "hostRef": dead}}, namespace)
    obj = kube.wait_for(lambda: (o := kube.get(VM, "stranded", namespace)) and (o.get("status") or {}).get("error") and o,
                        what="stranded reports an error")
    state, message = health(obj)
    assert state == "Degraded" and obj["status"]["error"]["code"] in message, (state, message)

    uid = running["metadata"]["uid"]
    operator.call(lambda: operator.runtime.pool.get(host).call("test-crash", lambda c: c.lookupByUUIDString(uid).destroy()))
    obj = kube.wait_for(lambda: (o := kube.get(VM, "web", namespace)) and
                        (o.get("status") or {}).get("printableStatus") == "CrashLoopBackOff" and o,
                        timeout=10, what="web CrashLoopBackOff")
    state, message = health(obj)
    assert state == "Degraded" and message.startswith("CrashLoopBackOff"), (state, message)

    image = tmp_path / "image.iso"
    image.write_bytes(b"\0" * 65536)
    rt = operator.runtime
    original = rt.settings
    rt.settings = dataclasses.replace(original, iso_cache_dir=str(tmp_path / "cache"))
    try:
        with TestHTTPServer(image) as http:
            iso = kube.create(ISO, {"metadata": {"name": "bad"},
                                    "spec": {"source": {"url": http.url("/image")},
                                             "checksum": "sha256:" + hashlib.sha256(b"other").hexdigest(),
                                             "targets": {"hostNames": [host]}}}, namespace)
            assert health(iso)[0] == "Progressing"
            obj = kube.wait_condition(ISO, "bad", "Stalled", "True", namespace=namespace, timeout=30)
            state, message = health(obj)
            assert state == "Degraded" and "ISO_CHECKSUM_MISMATCH" in message, (state, message)
    finally:
        rt.settings = original
        # Namespaces never finish terminating here: remove what would otherwise stay (a stalled ISO
        # and a crash-looping VM count in the operator's metrics for the rest of the session).
        for plural, name in ((ISO, "bad"), (VM, "web"), (VM, "off"), (VM, "stranded")):
            if kube.get(plural, name, namespace) is not None:
                kube.delete(plural, name, namespace)
        for name in (host, dead):
            kube.delete(HOST, name)


def test_a_spec_change_not_yet_observed_is_progressing() -> None:
    """Only the generation check: an object whose status describes an older generation."""
    obj = {"kind": "VirtualMachine", "metadata": {"generation": 3},
           "status": {"observedGeneration": 2, "printableStatus": "Running",
                      "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "running"}]}}
    assert health(obj) == ("Progressing", "Waiting for the operator to observe generation 3")
    obj["status"]["observedGeneration"] = 3
    assert health(obj) == ("Healthy", "running")
