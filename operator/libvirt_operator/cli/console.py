"""`libvirt-operator console <ns>/<vm>` and `kubectl libvirt console <ns>/<vm>`: the VM's serial console
through the Kubernetes API (the operator's aggregated API, handlers/console_api.py), with the user's
own kubeconfig; allowed by RBAC `get` on `virtualmachines/console` in
subresources.virt.libvirt-operator.io. Ctrl-] quits, as in `virsh console`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import termios
import tty
from typing import Any

import click

from ..core.api.common import SUBRESOURCES_GROUP_VERSION as GROUP_VERSION
from .vm_actions import EXIT_ERROR, parse_target

ESCAPE = b"\x1d"  # Ctrl-]
PROTOCOL = "plain.libvirt-operator.io"


def _console_url(server: str, namespace: str, name: str) -> str:
    return f"{server.rstrip('/')}/apis/{GROUP_VERSION}/namespaces/{namespace}/virtualmachines/{name}/console"


def _client_tls(cfg: Any) -> ssl.SSLContext | bool:
    if not cfg.verify_ssl:
        return False
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


async def _auth_headers(cfg: Any) -> dict[str, str]:
    """What the kubeconfig authenticates with besides a client cert: a bearer token (also from exec
    plugins and OIDC, refreshed by the client library's hook) or basic auth."""
    token = await cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
    if token:
        return {"Authorization": token}
    if cfg.username:
        return {"Authorization": cfg.get_basic_auth_token()}
    return {}


def _explain(code: int, namespace: str, name: str, server_message: str) -> str:
    what = f"VirtualMachine {namespace}/{name}"
    if code == 403:
        return (f"forbidden: you may not open the console of {what} (it needs `get` on virtualmachines/console "
                f"in API group subresources.virt.libvirt-operator.io; ask for the ClusterRole "
                f"libvirt-operator-console in namespace {namespace}). {server_message}")
    if code == 404:
        return f"{what} not found, or the console API is not installed in this cluster. {server_message}"
    if code == 401:
        return f"unauthorized: the cluster did not accept your credentials. {server_message}"
    if code == 501:
        return f"the host of {what} has no console support (e.g. libvirt's test driver). {server_message}"
    if code == 503:
        return ("console unavailable: " + (server_message or f"the host of {what} is not connected or the VM is "
                                           "not running (a console needs a running domain)"))
    return f"cannot open the console of {what}: HTTP {code}. {server_message}"


async def _why(session: Any, url: str, code: int, **kw: Any) -> str:
    """The Status message for a refused handshake (aiohttp drops its body): the same GET without the
    upgrade gives the same refusal, unless it failed only after the upgrade check."""
    with contextlib.suppress(Exception):
        async with session.get(url, **kw) as resp:
            if resp.status == code:
                body = await resp.json(content_type=None)
                return str(body.get("message") or "")
    return ""


async def _session(namespace: str, name: str, kubeconfig: str | None, context: str | None) -> int:
    import aiohttp
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    url = _console_url(cfg.host, namespace, name)
    kw = {"ssl": _client_tls(cfg), "headers": await _auth_headers(cfg)}
    async with aiohttp.ClientSession(trust_env=True) as session:
        try:
            ws = await session.ws_connect(url, protocols=(PROTOCOL,), heartbeat=30, max_msg_size=1 << 20, **kw)
        except aiohttp.WSServerHandshakeError as err:
            click.echo(f"error: {_explain(err.status, namespace, name, await _why(session, url, err.status, **kw))}",
                       err=True)
            return EXIT_ERROR
        except aiohttp.ClientError as err:
            click.echo(f"error: cannot reach the Kubernetes API at {cfg.host}: {err}", err=True)
            return EXIT_ERROR
        async with ws:
            return await _attach(ws)


async def _attach(ws: Any) -> int:
    import aiohttp

    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    fd = stdin.fileno()
    quit_requested = asyncio.Event()
    typed: asyncio.Queue[bytes] = asyncio.Queue()  # sent in order by one task
    tty_state = termios.tcgetattr(fd) if os.isatty(fd) else None
    if tty_state is not None:
        sys.stderr.write("Connected to the console (escape character is ^])\r\n")
        sys.stderr.flush()
        tty.setraw(fd)

    def on_input() -> None:
        data = os.read(fd, 4096)
        if not data:
            loop.remove_reader(fd)  # end of input: keep showing the guest's output
            return
        head, esc, _ = data.partition(ESCAPE)
        if head:
            typed.put_nowait(head)
        if esc:
            quit_requested.set()

    try:
        loop.add_reader(fd, on_input)
        reading_input = True
    except (PermissionError, ValueError, OSError):  # e.g. a regular file: no console input
        reading_input = False

    async def output() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                stdout.write(msg.data)
                stdout.flush()
            elif msg.type == aiohttp.WSMsgType.TEXT:
                stdout.write(msg.data.encode())
                stdout.flush()

    async def input_() -> None:
        while True:
            await ws.send_bytes(await typed.get())

    pump = asyncio.create_task(output())
    sender = asyncio.create_task(input_())
    quitting = asyncio.create_task(quit_requested.wait())
    try:
        await asyncio.wait({pump, quitting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if reading_input:
            loop.remove_reader(fd)
        for task in (pump, sender, quitting):
            task.cancel()
        if tty_state is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, tty_state)
            sys.stderr.write("\n")
    if quit_requested.is_set():
        return 0
    click.echo("console closed by the server (the VM stopped, or another session took the console)", err=True)
    return 0


@click.command(name="console", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("vm", metavar="NAMESPACE/NAME")
@click.option("-n", "--namespace", default=None, help="Namespace, when VM is a bare name.")
@click.option("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
@click.option("--context", default=None, help="kubeconfig context.")
def console(vm: str, namespace: str | None, kubeconfig: str | None, context: str | None) -> None:
    """Attach to a VM's serial console through the Kubernetes API (needs `get` on virtualmachines/console
    in subresources.virt.libvirt-operator.io: ClusterRole libvirt-operator-console). Ctrl-] quits."""
    ns, name = parse_target(vm, namespace)
    sys.exit(asyncio.run(_session(ns, name, kubeconfig, context)))
