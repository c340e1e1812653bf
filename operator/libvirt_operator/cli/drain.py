"""`libvirt-operator drain HOST` (and `kubectl libvirt drain HOST`): like `kubectl drain` for a LibvirtHost.

Cordons the host (spec.unschedulable: true, the user's own change), then asks for one
VirtualMachineMigration per running VM placed there; the operator moves each one live to another host.
VMs that cannot move live (stopped, pinned by hostRef) are listed and left where they are. With --wait
it waits for every migration and exits 1 if one failed. `--uncordon` clears the cordon."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import click

from ..core.api.common import GROUP, VERSION

HOSTS, VMS, MIGRATIONS = "libvirthosts", "virtualmachines", "virtualmachinemigrations"
EXIT_FAILED, EXIT_TIMEOUT, EXIT_ERROR = 1, 2, 3


async def _drain(host: str, wait: bool, timeout: float, uncordon: bool, kubeconfig: str | None,
                 context: str | None) -> int:
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.client.exceptions import ApiException

    await config.load_kube_config(config_file=kubeconfig, context=context)
    async with client.ApiClient() as api_client:
        api = client.CustomObjectsApi(api_client)
        try:
            await api.patch_cluster_custom_object(GROUP, VERSION, HOSTS, host, {"spec": {"unschedulable": not uncordon}},
                                                  _content_type="application/merge-patch+json")
        except ApiException as err:
            click.echo(f"error: {'uncordoning' if uncordon else 'cordoning'} LibvirtHost {host}: HTTP {err.status} "
                       f"{err.reason}", err=True)
            return EXIT_ERROR
        click.echo(f"LibvirtHost {host} {'uncordoned' if uncordon else 'cordoned'}")
        if uncordon:
            return 0
        vms = (await api.list_cluster_custom_object(GROUP, VERSION, VMS)).get("items", [])
        started: list[tuple[str, str]] = []
        for vm in vms:
            meta, status = vm["metadata"], vm.get("status") or {}
            if status.get("host") != host or meta.get("deletionTimestamp"):
                continue
            ns, name = meta["namespace"], meta["name"]
            if (vm.get("spec") or {}).get("hostRef"):
                click.echo(f"  {ns}/{name}: pinned by hostRef, left on {host}")
                continue
            if status.get("printableStatus") != "Running":
                click.echo(f"  {ns}/{name}: not running ({status.get('printableStatus') or '-'}), left on {host}")
                continue
            mig = f"drain-{name[:40]}-{uuid.uuid4().hex[:6]}"
            await api.create_namespaced_custom_object(GROUP, VERSION, ns, MIGRATIONS, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachineMigration",
                "metadata": {"name": mig, "labels": {"virt.libvirt-operator.io/drain": host}},
                "spec": {"vmName": name}})
            click.echo(f"  {ns}/{name}: migrating ({ns}/{mig})")
            started.append((ns, mig))
        if not wait or not started:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending, failed = set(started), []
        while pending and loop.time() < deadline:
            for ns, mig in sorted(pending):
                obj = await api.get_namespaced_custom_object(GROUP, VERSION, ns, MIGRATIONS, mig)
                status: dict[str, Any] = obj.get("status") or {}
                if status.get("phase") in ("Succeeded", "Failed"):
                    pending.discard((ns, mig))
                    line = f"  {ns}/{mig}: {status['phase']}"
                    if status["phase"] == "Failed":
                        failed.append(mig)
                        line += f": [{(status.get('error') or {}).get('code')}] {(status.get('error') or {}).get('message')}"
                    click.echo(line)
            await asyncio.sleep(0.5)
        if pending:
            click.echo(f"timed out after {timeout:.0f}s: {len(pending)} migration(s) still running", err=True)
            return EXIT_TIMEOUT
        return EXIT_FAILED if failed else 0


@click.command(name="drain")
@click.argument("host", metavar="LIBVIRTHOST")
@click.option("--wait", is_flag=True, help="Wait for every migration; exit 1 if one failed.")
@click.option("--timeout", default=1800.0, show_default=True, type=float, help="Seconds --wait waits.")
@click.option("--uncordon", is_flag=True, help="Clear the cordon (spec.unschedulable) instead.")
@click.option("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
@click.option("--context", default=None, help="kubeconfig context.")
def drain(host: str, wait: bool, timeout: float, uncordon: bool, kubeconfig: str | None, context: str | None) -> None:
    """Cordon a LibvirtHost and move its running VMs away live (one VirtualMachineMigration each)."""
    sys.exit(asyncio.run(_drain(host, wait, timeout, uncordon, kubeconfig, context)))
