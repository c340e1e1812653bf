"""The aggregated API `subresources.virt.libvirt-operator.io/v1alpha1`: a VM's serial console, reached
through the kube-apiserver (`kubectl libvirt console ns/vm`) with the user's own credentials.

KubeVirt's pattern: an APIService routes the group to this HTTPS server; the apiserver authenticates
the user and calls us as its front proxy (client cert from the requestheader CA + X-Remote-* headers);
we ask the cluster (SubjectAccessReview: `get virtualmachines/console`) and only then open the
console on the VM's host and upgrade to a WebSocket (binary frames both ways). No user ever needs the
host's SSH key or libvirt URI. Credentials and headers are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..adapters.kube import KubeClient
from ..adapters.kube.frontproxy import RequestHeaderConfig, caller_from_headers, may, read_requestheader_config
from ..adapters.libvirt import HostPool
from ..adapters.libvirt.console import open_console
from ..adapters.libvirt.events import ensure_event_thread
from ..core.api.common import GROUP as VM_GROUP
from ..core.api.common import SUBRESOURCES_GROUP as GROUP
from ..core.api.common import SUBRESOURCES_GROUP_VERSION as GROUP_VERSION
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.settings import Settings
from ..core.api.host import LibvirtHostSpec
from ..reconcile.host import connect_options
from ..reconcile.runtime import Runtime

log = get_logger(__name__)
VERSION = GROUP_VERSION.rsplit("/", 1)[1]
CONSOLE_PATH = f"/apis/{GROUP_VERSION}/namespaces/{{namespace}}/virtualmachines/{{name}}/console"



def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    """A Kubernetes Status object: what kubectl and client libraries show to the user."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _discovery() -> dict[str, Any]:
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION, "resources": [
        {"name": "virtualmachines/console", "singularName": "", "namespaced": True,
         "kind": "VirtualMachine", "verbs": ["get"]}]}


def _group() -> dict[str, Any]:
    version = {"groupVersion": GROUP_VERSION, "version": VERSION}
    return {"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version],
            "preferredVersion": version}


def _json(body: dict[str, Any]) -> Any:
    async def reply(_request: web.Request) -> web.Response:
        return web.json_response(body)
    return reply


@dataclasses.dataclass
class RunningConsoleServer:
    runner: web.AppRunner
    port: int
    cert_pem: bytes  # the serving cert (an APIService's caBundle, when it is self-signed)
    rt: Runtime

    async def cleanup(self) -> None:
        await self.runner.cleanup()
        await self.rt.pool.close_all()
        await self.rt.kube.close()


class ConsoleServer:
    def __init__(self, rt: Runtime, requestheader: RequestHeaderConfig) -> None:
        self.rt, self.kube, self.requestheader = rt, rt.kube, requestheader
        self.app = web.Application(middlewares=[self._front_proxy_only])
        self.app.add_routes([
            web.get("/apis", _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group()]})),
            web.get(f"/apis/{GROUP}", _json(_group())),
            web.get(f"/apis/{GROUP_VERSION}", _json(_discovery())),
            web.get(CONSOLE_PATH, self._console),
        ])

    @web.middleware
    async def _front_proxy_only(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every request must come from the apiserver's front proxy: a client cert verified against the
        requestheader CA by the TLS layer, with an allowed name. Anything else is 401, whatever it
        claims in X-Remote-User."""
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if not peer:
            return status(401, "Unauthorized", "this API is served through the Kubernetes API server only "
                          "(no front-proxy client certificate)")
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        if self.requestheader.allowed_names and not set(names) & set(self.requestheader.allowed_names):
            return status(401, "Unauthorized", "client certificate is not one of the front proxy's allowed names")
        return await handler(request)

    async def _console(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._console_checked(request)
        except AppError as err:  # the Kubernetes API failed us (SubjectAccessReview, reads)
            log.warning("console request failed", error=err.message)
            return status(503, "ServiceUnavailable", f"the console API could not ask the Kubernetes API: {err.message}")

    async def _console_checked(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        caller = caller_from_headers(self.requestheader, request.headers)
        if caller is None:
            return status(401, "Unauthorized", "the front proxy named no user")
        details = {"name": name, "group": GROUP, "kind": "virtualmachines"}
        allowed, _why = await may(self.kube, caller, verb="get", group=GROUP, resource="virtualmachines",
                                  subresource="console", namespace=namespace, name=name)
        if not allowed:
            log.info("console refused", namespace=namespace, vm=name, user=caller.user)
            return status(403, "Forbidden", f'virtualmachines.{GROUP} "{name}" is forbidden: User "{caller.user}" '
                          f'cannot get resource "virtualmachines/console" in API group "{GROUP}" in the namespace '
                          f'"{namespace}"', details)
        vm = await self.kube.get_object("virtualmachines", name, namespace)
        if vm is None:
            return status(404, "NotFound", f'virtualmachines.{VM_GROUP} "{name}" not found', details)
        host_name = (vm.get("status") or {}).get("host") or (vm.get("spec") or {}).get("hostRef")
        host_obj = await self.kube.get_object("libvirthosts", host_name) if host_name else None
        if host_obj is None:
            return status(503, "ServiceUnavailable", f"VirtualMachine {namespace}/{name} is not on a host "
                          f"({'LibvirtHost ' + host_name + ' not found' if host_name else 'not placed yet'})", details)
        try:  # this server's own connection (every replica serves consoles, leader or not), kept
            # current with the host's spec and Secret (the pool replaces it when they changed)
            spec = LibvirtHostSpec.model_validate(host_obj.get("spec") or {})
            host = await self.rt.pool.ensure(host_name, await connect_options(spec, self.rt))
        except (AppError, ValueError) as err:
            return status(503, "ServiceUnavailable", f"cannot connect to host {host_name}: "
                          f"{getattr(err, 'message', None) or err}", details)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return status(400, "BadRequest", "the console is a WebSocket: connect with `kubectl libvirt console`")
        try:
            console = await open_console(host, vm["metadata"]["uid"])
        except AppError as err:
            if err.code == ErrorCode.HYPERVISOR_UNSUPPORTED or "support" in err.message.lower():
                return status(501, "NotImplemented", f"host {host_name} has no console support: {err.message}", details)
            why = "it has no domain on its host yet" if err.code == ErrorCode.VM_NOT_FOUND else err.message
            return status(503, "ServiceUnavailable", f"cannot open the console of VirtualMachine {namespace}/{name}: "
                          f"{why}", details)
        log.info("console opened", namespace=namespace, vm=name, user=caller.user, host=host_name)
        try:
            return await _pipe(request, console)
        finally:
            console.close()
            log.info("console closed", namespace=namespace, vm=name, user=caller.user)


async def _pipe(request: web.Request, console: Any) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("plain.libvirt-operator.io",), heartbeat=30, max_msg_size=1 << 20)
    await ws.prepare(request)

    async def guest_to_client() -> None:
        while (data := await console.read()):
            await ws.send_bytes(data)
        await ws.close(message=b"console ended")

    pump = asyncio.create_task(guest_to_client())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                console.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                console.write(msg.data.encode())
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
    return ws


# -- serving certificate ---------------------------------------------------------------------

def self_signed_cert(dns_names: list[str], directory: Path) -> tuple[Path, Path]:
    """A fresh key and self-signed serving cert (1 year) for the given names and loopback."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _ssl_context(cert: Path, key: Path, requestheader: RequestHeaderConfig) -> tuple[ssl.SSLContext, bytes]:
    """The serving TLS context and the serving cert's PEM (read now: a generated cert's files go next)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cadata=requestheader.client_ca_pem)
    # OPTIONAL, not REQUIRED: a caller without a cert gets a readable 401 Status instead of a TLS
    # alert; one with a cert from another CA still fails the handshake.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx, cert.read_bytes()


async def start_console_server(settings: Settings, kubeconfig: str | None = None) -> RunningConsoleServer:
    """Serve the console API on settings.console_port (0: any free port) with a client and host
    connections of its own, apart from kopf's: every replica serves consoles, elected or not (the
    Service spans them all). Without cert/key files a self-signed cert for console_service_names
    is generated (the APIService then skips verification, or carries it as caBundle)."""
    ensure_event_thread()  # before the first libvirt connection
    kube = await KubeClient.create(kubeconfig)
    try:
        requestheader = await read_requestheader_config(kube)
    except BaseException:
        await kube.close()
        raise
    try:
        if not (settings.console_cert_file and settings.console_key_file):
            # the generated key lives in the TLS context only: its files go as soon as it is loaded, so
            # no private key outlives the process on disk (not even after a SIGKILL)
            with tempfile.TemporaryDirectory(prefix="lvop-console-tls-") as directory:
                cert, key = self_signed_cert(list(settings.console_service_names) or ["localhost"], Path(directory))
                ssl_context, cert_pem = _ssl_context(cert, key, requestheader)
        else:
            ssl_context, cert_pem = _ssl_context(Path(settings.console_cert_file), Path(settings.console_key_file),
                                                 requestheader)
    except BaseException:
        await kube.close()
        raise
    rt = Runtime(settings=settings, pool=HostPool(), kube=kube)
    server = ConsoleServer(rt, requestheader)
    runner = web.AppRunner(server.app, access_log=None)  # an access log would carry user names per request
    await runner.setup()
    site = web.TCPSite(runner, settings.console_address, settings.console_port or 0, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await kube.close()
        raise
    port = _bound_port(runner)
    log.info("console API serving", port=port, group=GROUP_VERSION)
    return RunningConsoleServer(runner, port, cert_pem, rt)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0
