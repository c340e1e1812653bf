"""No private key the operator holds outlives it on disk: a kubeconfig's embedded client key and the
console API's generated serving key live in TLS contexts, not in files left in the temp directory
(a SIGKILLed operator runs no exit handler to remove them)."""

from __future__ import annotations

import base64
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from libvirt_operator.adapters.kube import KubeClient
from tests.harness.kube import cert_kubeconfig


def files_holding(secret: bytes) -> list[Path]:
    """Files in the temp directory (top level, and our lvop-* directories) whose content holds `secret`."""
    root = Path(tempfile.gettempdir())
    candidates = [p for p in root.iterdir() if p.is_file()]
    candidates += [p for d in root.glob("lvop-*") if d.is_dir() for p in d.rglob("*") if p.is_file()]
    found = []
    for path in candidates:
        try:
            if secret in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


async def test_a_kubeconfig_with_an_embedded_key_leaves_no_copy_of_the_key_on_disk(
        controlplane: Any, tmp_path: Path) -> None:
    user = f"keycheck-{uuid.uuid4().hex[:6]}"
    kubeconfig = cert_kubeconfig(controlplane, user, "system:masters", tmp_path)
    key = base64.b64decode(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["client-key-data"])
    body = key.splitlines()[1]  # the first line of its base64 body: in any file that holds the key
    clients = []
    try:
        for _ in range(2):  # a second client of the same kubeconfig in one process works too
            client = await KubeClient.create(str(kubeconfig))
            clients.append(client)
            # authenticated by the client cert: a listing only system:masters may do
            namespaces = await client.core.list_namespace()
            assert any(ns.metadata.name == "default" for ns in namespaces.items)
            assert files_holding(body) == [], "the client key was left in a file"
    finally:
        for client in clients:
            await client.close()
