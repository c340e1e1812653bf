"""The Helm chart's download settings and egress NetworkPolicy, rendered by a real helm (built from
the pinned module hack/helm) and checked on the real kube-apiserver (server-side dry run):
`download.allow` must reach the operator's command line *and* its download guard, and the egress
policy must limit the pod to DNS, the API server, the libvirt hosts and the download networks."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from libvirt_operator.adapters.http.download import DownloadPolicy, check_destination
from tests.integration.test_deploy_manifests import (  # noqa: F401  (fixtures)
    CHART, DEPLOY, NAMESPACE, _apply, _docs, dyn, helm_binary, rbac_installed,
)


def render(helm: str, tmp_path: Path, *sets: str) -> list[dict[str, Any]]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HELM_CACHE_HOME": str(tmp_path / "c"),
           "HELM_CONFIG_HOME": str(tmp_path / "g"), "HELM_DATA_HOME": str(tmp_path / "d")}
    args = [helm, "template", "lvop", str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.34.0"]
    for value in sets:
        args += ["--set", value]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def operator_settings(deployment: dict[str, Any]):
    """The Settings the operator would run with: the image's ENTRYPOINT args plus the container's,
    parsed by the real `libvirt-operator run` command."""
    from libvirt_operator.cli import main
    from libvirt_operator.cli.operator_main import settings_from_options

    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    params = main.commands["run"].make_context("run", ["--log-format", "json", *args]).params
    return settings_from_options(
        download_allow=params["download_allow"], download_deny=params["download_deny"],
        download_max_size=params["download_max_size"], max_concurrent_imports=params["max_concurrent_imports"])


def rules_by_port(policy: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out = {}
    for rule in policy["spec"]["egress"]:
        for port in rule.get("ports") or []:
            out[port["port"]] = rule
    return out


def test_the_default_chart_limits_egress(helm_binary, tmp_path, dyn, rbac_installed) -> None:  # noqa: F811
    docs = render(helm_binary, tmp_path)
    policy, dep = one(docs, "NetworkPolicy"), one(docs, "Deployment")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Egress"]
    by_port = rules_by_port(policy)
    assert set(by_port) == {53, 443, 6443, 22, 16509, 16514, 80}
    dns = by_port[53]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert "to" not in by_port[6443] and "to" not in by_port[16514]  # any address, those ports only
    downloads = by_port[80]
    assert {(p["protocol"], p["port"]) for p in downloads["ports"]} == {("TCP", 80), ("TCP", 443)}
    blocks = [t["ipBlock"] for t in downloads["to"]]
    v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
            "127.0.0.0/8"} <= set(v4["except"])
    v6 = next(b for b in blocks if b["cidr"] == "::/0")
    assert {"fc00::/7", "fe80::/10", "::1/128"} <= set(v6["except"])
    # the apiserver accepts it as written (schema, CIDR and except validation)
    _apply(dyn, policy, dry_run="All")
    # the operator's own defaults: no private network, 16Gi cap, 4 imports at once
    settings = operator_settings(dep)
    assert settings.download_allowed_networks == ()
    assert settings.download_max_bytes == 16 * 2**30 and settings.iso_max_concurrent_imports == 4
    assert not check_destination("10.20.1.2", DownloadPolicy.from_settings(settings))


def test_download_allow_reaches_the_operators_guard_and_the_policy(helm_binary, tmp_path, dyn,  # noqa: F811
                                                                   rbac_installed) -> None:  # noqa: F811
    """The README's example: --set 'download.allow={10.20.0.0/16}'."""
    docs = render(helm_binary, tmp_path, "download.allow={10.20.0.0/16}", "download.maxSize=2Gi",
                  "download.maxConcurrentImports=2")
    dep, policy = one(docs, "Deployment"), one(docs, "NetworkPolicy")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--download-allow=10.20.0.0/16", "--download-max-size=2Gi", "--max-concurrent-imports=2"} <= set(args)
    settings = operator_settings(dep)
    assert settings.download_allowed_networks == (ipaddress.ip_network("10.20.0.0/16"),)
    assert settings.download_max_bytes == 2 * 2**30 and settings.iso_max_concurrent_imports == 2
    guard = DownloadPolicy.from_settings(settings)
    assert check_destination("10.20.1.2", guard) and check_destination("::ffff:10.20.1.2", guard)
    assert not check_destination("10.21.0.1", guard) and not check_destination("169.254.169.254", guard)
    downloads = rules_by_port(policy)[80]
    assert {"cidr": "10.20.0.0/16"} in [t["ipBlock"] for t in downloads["to"]]
    _apply(dyn, policy, dry_run="All")


def test_the_policy_narrows_to_known_addresses_and_can_be_turned_off(helm_binary, tmp_path, dyn,  # noqa: F811
                                                                    rbac_installed) -> None:  # noqa: F811
    docs = render(helm_binary, tmp_path, "networkPolicy.apiServer.cidrs={10.0.0.10/32}",
                  "networkPolicy.libvirtHosts.cidrs={192.168.10.0/24,fd00:10::/64}",
                  "networkPolicy.downloads.ports=null")
    policy = one(docs, "NetworkPolicy")
    by_port = rules_by_port(policy)
    assert by_port[6443]["to"] == [{"ipBlock": {"cidr": "10.0.0.10/32"}}]
    assert by_port[16514]["to"] == [{"ipBlock": {"cidr": "192.168.10.0/24"}}, {"ipBlock": {"cidr": "fd00:10::/64"}}]
    downloads = [r for r in policy["spec"]["egress"] if any("except" in t.get("ipBlock", {}) for t in r.get("to", []))]
    assert len(downloads) == 1 and "ports" not in downloads[0]  # any port
    _apply(dyn, policy, dry_run="All")
    docs = render(helm_binary, tmp_path, "networkPolicy.enabled=false")
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


def test_the_plain_manifests_ship_the_same_egress_policy(helm_binary, tmp_path) -> None:  # noqa: F811
    (plain,) = [d for p in sorted(DEPLOY.glob("*.yaml")) for d in _docs(p) if d["kind"] == "NetworkPolicy"]
    chart = one(render(helm_binary, tmp_path), "NetworkPolicy")
    assert plain["spec"]["egress"] == chart["spec"]["egress"]
    assert plain["spec"]["policyTypes"] == chart["spec"]["policyTypes"]
    assert plain["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "libvirt-operator"
