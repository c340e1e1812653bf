"""Runbooks that work: every YAML manifest in rag/ is accepted by the real API server (server-side
dry run against the session's control plane with the CRDs installed), and every `kubectl`
command names resources, subresources and fields that exist there; `kubectl patch` is applied
with a server-side dry run to an object of that kind, so a runbook never proposes a change the
API refuses (an immutable field, a field that does not exist, a value the schema refuses)."""

from __future__ import annotations

import json
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from libvirt_operator.adapters.rag import load_documents

RAG = Path(__file__).resolve().parents[2] / "rag"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"(?<!`)`(kubectl [^`]+)`(?!`)")
_JSONPATH = re.compile(r"\{(range\s+|end)?\.?((?:[^{}\\]|\\.)*?)\}")
_NEEDS_NAME = {"patch", "annotate", "label", "exec", "logs", "edit"}
_OBJ_TYPES = {"iso", "isoimage", "isoimages", "lvh", "libvirthost", "libvirthosts", "lvvm", "virtualmachine",
              "virtualmachines"}


def _docs() -> list[Any]:
    return load_documents(RAG)


def yaml_blocks() -> list[tuple[str, str]]:
    return [(d.path, m.group(2)) for d in _docs() for m in _FENCE.finditer(d.body) if m.group(1) in ("yaml", "yml")]


def kubectl_commands() -> list[tuple[str, list[str]]]:
    """(document, argv) for every kubectl invocation in shell blocks and inline code."""
    out: list[tuple[str, list[str]]] = []
    for d in _docs():
        texts = [m.group(2) for m in _FENCE.finditer(d.body) if m.group(1) in ("sh", "bash", "shell", "console", "")]
        texts += [m.group(1) for m in _INLINE.finditer(d.body)]
        for text in texts:
            text = text.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" #", 1)[0].strip()
                for part in re.split(r"\s*(?:\|\||&&|\||;|\$\()\s*", line):
                    if part.startswith("kubectl "):
                        try:
                            argv = shlex.split(part.replace("<", "x-").replace(">", ""))
                        except ValueError:  # an unbalanced quote: a command cut by the splitter
                            argv = part.replace("<", "x-").replace(">", "").split()
                        out.append((d.path, argv))
    return out


class Api:
    """What the API server says exists: resource names (plural, singular, short, kind) and CRD schemas."""

    def __init__(self, api_client: Any) -> None:
        self.resources: dict[str, tuple[str, str, str, bool]] = {}  # name -> (group/version, plural, kind, namespaced)
        self.subresources: set[str] = set()
        from kubernetes import dynamic

        for r in dynamic.DynamicClient(api_client).resources.search():
            if not getattr(r, "kind", None) or r.kind.endswith("List") and not r.name:
                continue
            gv = r.group_version
            if "/" in (r.name or ""):
                self.subresources.add(r.name)
                continue
            for sub in (getattr(r, "subresources", None) or {}):
                self.subresources.add(f"{r.name}/{sub}")
            entry = (gv, r.name, r.kind, bool(r.namespaced))
            for name in [r.name, getattr(r, "singular_name", "") or "", r.kind.lower(), *(r.short_names or [])]:
                if name:
                    self.resources.setdefault(name.lower(), entry)
                    self.resources.setdefault(f"{name.lower()}.{r.group}" if r.group else name.lower(), entry)
        self.schemas: dict[str, dict[str, Any]] = {}
        crds = dynamic.DynamicClient(api_client).resources.get(
            api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition").get().to_dict()
        for crd in crds["items"]:
            version = next(v for v in crd["spec"]["versions"] if v["storage"])
            self.schemas[crd["spec"]["names"]["plural"]] = version["schema"]["openAPIV3Schema"]

    def resource(self, name: str) -> tuple[str, str, str, bool]:
        base = name.split("/", 1)[0].lower()
        assert base in self.resources, f"no resource type {base!r} in the API"
        return self.resources[base]

    def check_path(self, plural: str, path: str) -> None:
        """Assert a dotted field path (jsonpath / custom-columns / explain) exists in a CRD's schema."""
        schema = self.schemas.get(plural)
        if schema is None:
            return  # a built-in type: the discovery check is all we do
        parts = [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", path.strip(".")) if p]
        node = schema
        for i, raw in enumerate(parts):
            part = re.sub(r"\[.*?\]$", "", raw)
            if i == 0 and part in ("metadata", "apiVersion", "kind"):
                return
            while node.get("type") == "array":
                node = node.get("items", {})
            props = node.get("properties")
            if props is None:
                assert node.get("additionalProperties") or node.get("x-kubernetes-preserve-unknown-fields"), (
                    f"{plural}: {path!r}: {part!r} below a field without properties")
                return
            assert part in props, f"{plural}: no field {'.'.join(parts[:i + 1])!r} (has {sorted(props)})"
            node = props[part]


@pytest.fixture(scope="module")
def api(kube: Any) -> Api:
    return Api(kube.api)


@pytest.fixture(scope="module")
def namespace(kube: Any) -> Iterator[str]:
    name = kube.new_namespace("runbooks")
    yield name
    kube.core.delete_namespace(name)


def test_the_corpus_has_snippets_to_check() -> None:
    assert len(yaml_blocks()) >= 1
    assert len(kubectl_commands()) >= 60


@pytest.mark.parametrize(("path", "block"), yaml_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_yaml_blocks_are_accepted_by_the_api_server(kube: Any, api: Api, namespace: str, path: str, block: str) -> None:
    from kubernetes import dynamic

    dyn = dynamic.DynamicClient(kube.api)
    for doc in yaml.safe_load_all(block):
        if not isinstance(doc, dict) or "kind" not in doc:
            continue
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = namespace if resource.namespaced else None
        doc.setdefault("metadata", {})["namespace"] = ns
        try:
            resource.create(body=doc, namespace=ns, dry_run="All")
        except ApiException as err:
            pytest.fail(f"{path}: the API server refuses the {doc['kind']} manifest: {err.body}")


def _flag_value(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def _positional(argv: list[str]) -> list[str]:
    out, skip = [], False
    takes_value = {"-n", "--namespace", "-o", "--output", "-p", "--patch", "--type", "--as", "-c", "--since",
                   "--field-selector", "-l", "--selector", "--from-file", "-f", "--filename", "--api-group"}
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in takes_value:
            skip = True
            continue
        if a.startswith("-") or a == "--":
            continue
        out.append(a)
    return out


def _jsonpath_fields(expr: str) -> list[str]:
    """Field paths of a kubectl jsonpath, ``{range .a[*]}{.b}{end}`` giving ``a.b``
    (``.items[*]`` of a list: the objects themselves)."""
    fields: list[str] = []
    prefix: list[str] = []
    for keyword, path in _JSONPATH.findall(expr):
        if keyword.startswith("range"):
            prefix.append("" if path.startswith("items[") else ".".join([*prefix[-1:], path]).strip("."))
        elif keyword == "end":
            prefix.pop()
        elif path and not path.startswith('"'):
            fields.append(".".join([*prefix[-1:], path]).strip("."))
    return fields


def _minimal(plural: str, name: str) -> dict[str, Any]:
    specs = {
        "libvirthosts": {"uri": "qemu+tcp://127.0.0.1:1/system", "insecure": True},
        "isoimages": {"source": {"url": "https://example.org/a.iso"}, "checksum": "sha256:" + "0" * 64},
        "virtualmachines": {"memory": "64Mi"},
    }
    assert plural in specs, f"no minimal {plural} object to try the patch on"
    return {"metadata": {"name": name}, "spec": specs[plural]}


@pytest.mark.parametrize(("path", "argv"), kubectl_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_kubectl_commands_name_what_exists(kube: Any, api: Api, namespace: str, path: str, argv: list[str]) -> None:
    check_kubectl(kube, api, namespace, path, argv)


@pytest.mark.parametrize("command", [
    # the advice the ISO_CHECKSUM_MISMATCH runbook used to give: the CRD refuses it
    "kubectl patch iso fedora -n vms --type merge -p '{\"spec\":{\"checksum\":\"sha256:%s\"}}'" % ("1" * 64),
    "kubectl get lvh kvm-01 -o jsonpath='{.status.nosuchfield}'",
    "kubectl get lvvm -o custom-columns=NAME:.metadata.name,HOST:.spec.hostname",
    "kubectl describe libvirtmachine web-1",
    "kubectl auth can-i patch virtualmachines/logs --as=system:serviceaccount:a:b",
])
def test_the_checks_catch_what_the_api_refuses(kube: Any, api: Api, namespace: str, command: str) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_kubectl(kube, api, namespace, "example", shlex.split(command))


def check_kubectl(kube: Any, api: Api, namespace: str, path: str, argv: list[str]) -> None:
    pos = _positional(argv)
    verb = pos[0] if pos else ""
    args = pos[1:]
    if verb in ("api-resources", "apply", "version", "cluster-info") or _flag_value(argv, "--raw"):
        return
    if verb == "explain":
        kind, _, field = args[0].partition(".")
        _, plural, _, _ = api.resource(kind)
        api.check_path(plural, field)
        return
    if verb == "auth":  # kubectl auth can-i VERB RESOURCE[/SUB]
        target = args[2]
        base, _, sub = target.partition("/")
        _, plural, _, _ = api.resource(base)
        if sub:
            assert f"{plural}/{sub}" in api.subresources, f"{path}: no subresource {target}"
        return
    if verb == "create" and args and args[0] in ("secret", "configmap", "namespace"):
        api.resource(args[0])
        return
    if verb in ("exec", "logs"):
        api.resource(args[0] if "/" in args[0] else "pod")
        return
    assert verb in ("get", "describe", "delete", "patch", "annotate", "label", "edit"), f"{path}: {argv}"
    assert args, f"{path}: `{' '.join(argv)}` names no resource type"
    kinds = args[0].split(",")
    for kind in kinds:
        _, plural, _, _ = api.resource(kind)
        output = _flag_value(argv, "-o", "--output") or ""
        if output.startswith(("jsonpath=", "custom-columns=")):
            if output.startswith("jsonpath="):
                fields = _jsonpath_fields(output.split("=", 1)[1])
            else:
                fields = [c.split(":", 1)[1] for c in output.split("=", 1)[1].split(",")]
            for f in fields:
                api.check_path(plural, f)
    if verb in _NEEDS_NAME:
        assert len(args) >= 2 or "/" in args[0], f"{path}: {verb} without an object name: {argv}"
    if verb == "patch" and kinds[0].lower() in _OBJ_TYPES:
        _, plural, _, namespaced = api.resource(kinds[0])
        name = f"rb-{uuid.uuid4().hex[:6]}"
        ns = namespace if namespaced else None
        kube.create(plural, _minimal(plural, name), namespace=ns)
        try:
            patch = json.loads(_flag_value(argv, "-p", "--patch") or "{}")
            kind_type = _flag_value(argv, "--type") or "strategic"
            assert kind_type in ("merge", "json"), f"{path}: custom resources take --type merge or json"
            if ns:
                kube.custom.patch_namespaced_custom_object(
                    "virt.libvirt-operator.io", "v1alpha1", ns, plural, name, patch, dry_run="All")
            else:
                kube.custom.patch_cluster_custom_object(
                    "virt.libvirt-operator.io", "v1alpha1", plural, name, patch, dry_run="All")
        except ApiException as err:
            pytest.fail(f"{path}: the API server refuses `{' '.join(argv)}`: {err.body}")
        finally:
            kube.delete(plural, name, namespace=ns)
