"""`libvirt-operator vm start|stop|restart|pause|unpause <ns>/<name>` and the kubectl plugin
`kubectl libvirt vm …` (console script `kubectl-libvirt`).

Uses the user's own kubeconfig: requesting an action is a merge patch of the annotation
virt.libvirt-operator.io/action-request with a fresh id, so the user needs `patch` on
virtualmachines (and `get` for --wait). The operator executes each id once and reports in
status.lastAction; --wait polls it and exits 1 when the action failed or was refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import uuid
from typing import Any

import click

from ..core.api.common import GROUP, VERSION
from ..core.api.vm import ACTIONS
from ..reconcile.actions import ACTION_REQUEST_ANNOTATION, new_request

PLURAL = "virtualmachines"
EXIT_FAILED, EXIT_TIMEOUT, EXIT_ERROR = 1, 2, 3


def parse_target(value: str, namespace: str | None) -> tuple[str, str]:
    if "/" in value:
        ns, _, name = value.partition("/")
    else:
        ns, name = namespace or "", value
    if not ns or not name or "/" in name:
        raise click.BadParameter("expected <namespace>/<name> (or <name> with -n NAMESPACE)", param_hint="VM")
    return ns, name


async def _whoami(api_client: Any) -> str | None:
    """The user's name from a SelfSubjectReview (Kubernetes ≥ 1.28); informational only."""
    from kubernetes_asyncio import client

    try:
        review = await client.AuthenticationV1Api(api_client).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        return review.status.user_info.username
    except Exception:  # noqa: BLE001 - older clusters or no permission: the request works without it
        return None


async def _request(action: str, namespace: str, name: str, wait: bool, timeout: float, kubeconfig: str | None,
                   context: str | None) -> int:
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.client.exceptions import ApiException

    await config.load_kube_config(config_file=kubeconfig, context=context)
    async with client.ApiClient() as api_client:
        api = client.CustomObjectsApi(api_client)
        request_id = str(uuid.uuid4())
        value = new_request(action, request_id, await _whoami(api_client), dt.datetime.now(dt.timezone.utc))
        try:
            await api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": {ACTION_REQUEST_ANNOTATION: value}}},
                _content_type="application/merge-patch+json")
        except ApiException as err:
            if err.status == 404:
                click.echo(f"error: VirtualMachine {namespace}/{name} not found", err=True)
            elif err.status == 403:
                click.echo(f"error: not allowed to patch VirtualMachine {namespace}/{name} (requesting an action "
                           "needs the 'patch' verb on virtualmachines)", err=True)
            else:
                click.echo(f"error: patching VirtualMachine {namespace}/{name}: HTTP {err.status} {err.reason}",
                           err=True)
            return EXIT_ERROR
        click.echo(f"{action} requested for VirtualMachine {namespace}/{name} (id {request_id})")
        if not wait:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: dict[str, Any] = {}
        while loop.time() < deadline:
            try:
                obj = await api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as err:
                click.echo(f"error: reading VirtualMachine {namespace}/{name}: HTTP {err.status} {err.reason}",
                           err=True)
                return EXIT_ERROR
            last = (obj.get("status") or {}).get("lastAction") or {}
            if last.get("id") == request_id and last.get("phase") in ("Succeeded", "Failed"):
                printable = (obj.get("status") or {}).get("printableStatus") or "-"
                click.echo(f"{last['phase']}: {last.get('message') or ''} (status: {printable})")
                return 0 if last["phase"] == "Succeeded" else EXIT_FAILED
            await asyncio.sleep(0.5)
        phase = last.get("phase") if last.get("id") == request_id else "not picked up yet"
        click.echo(f"timed out after {timeout:.0f}s waiting for the operator ({phase})", err=True)
        return EXIT_TIMEOUT


def _action_command(action: str, help_text: str) -> click.Command:
    @click.command(name=action, help=help_text)
    @click.argument("vm", metavar="NAMESPACE/NAME")
    @click.option("-n", "--namespace", default=None, help="Namespace, when VM is a bare name.")
    @click.option("--wait", is_flag=True, help="Wait for the operator's outcome; exit 1 if it failed or was refused.")
    @click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds --wait waits.")
    @click.option("--kubeconfig", default=None,
                  help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
    @click.option("--context", default=None, help="kubeconfig context.")
    def command(vm: str, namespace: str | None, wait: bool, timeout: float, kubeconfig: str | None,
                context: str | None) -> None:
        ns, name = parse_target(vm, namespace)
        sys.exit(asyncio.run(_request(action, ns, name, wait, timeout, kubeconfig, context)))

    return command


_HELP = {
    "start": "Start a stopped VM (refused under runStrategy Halted).",
    "stop": "Shut a VM down gracefully, powered off after its grace period (refused under runStrategy Always).",
    "restart": "Shut down (gracefully, then power off) and boot again: applies a changed definition.",
    "pause": "Suspend a running VM (libvirt suspend).",
    "unpause": "Resume a paused VM.",
}


@click.group(name="vm", context_settings={"help_option_names": ["-h", "--help"]})
def vm() -> None:
    """Request an action on a VirtualMachine (needs `patch` on virtualmachines). The request is an
    annotation, never a spec change: safe with Argo CD / Flux."""


for _action in ACTIONS:
    vm.add_command(_action_command(_action, _HELP[_action]))


@click.group(name="kubectl-libvirt", context_settings={"help_option_names": ["-h", "--help"]})
def kubectl_plugin() -> None:
    """kubectl plugin: `kubectl libvirt vm restart <ns>/<name> [--wait]`, `kubectl libvirt console <ns>/<name>`."""


kubectl_plugin.add_command(vm)  # `console` is added by cli/__init__.py (console.py builds on this module)
