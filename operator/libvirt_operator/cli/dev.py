"""The embedded default: a local control plane, a local libvirt host, the samples and the operator.

The real parts come from libvirt_operator.devenv, the same launchers the test harness uses. It needs
the source checkout (the control plane is built from hack/controlplane, the samples are
manifests/examples/): `make run` from the repository.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.server
import os
import pathlib
import string
import sys
import threading
from collections.abc import Iterator
from typing import Any

import yaml


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


@contextlib.contextmanager
def _serve_directory(directory: pathlib.Path) -> Iterator[str]:
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **kw: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _render(path: pathlib.Path, values: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(string.Template(path.read_text()).substitute(values))


def run_dev(workdir: pathlib.Path, libvirt_mode: str, metrics_port: int) -> int:
    try:
        from kubernetes import config

        from ..devenv.checkout import CheckoutNotFound, find_checkout
        from ..devenv.controlplane import ControlPlane, ControlPlaneError
        from ..devenv.libvirtd import LibvirtDaemon, libvirtd_available
        from ..devenv.resources import apply_crds, create_objects
        from ..devenv.testhost import write_test_host
    except ImportError as err:  # the launchers need the `dev` extra (cryptography, kubernetes)
        raise SystemExit(f"`libvirt-operator dev` needs the dev extra: pip install -e '.[dev]' ({err})") from None
    from ..core import crdgen
    from ..core.logs import configure
    from .operator_main import OperatorOptions, run_blocking, settings_from_options

    try:
        root = find_checkout()
    except CheckoutNotFound as err:
        raise SystemExit(f"`libvirt-operator dev`: {err}") from None

    workdir.mkdir(parents=True, exist_ok=True)
    configure("console", "INFO")
    with contextlib.ExitStack() as stack:
        _say("starting the local control plane (etcd + kube-apiserver; the first run builds them from Go modules)")
        try:
            cp = stack.enter_context(ControlPlane(workdir / "controlplane"))
        except ControlPlaneError as err:
            raise SystemExit(f"`libvirt-operator dev`: the local control plane did not start: {err}") from None
        kubeconfig = cp.kubeconfig_path
        os.environ["KUBECONFIG"] = str(kubeconfig)
        api = config.new_client_from_config(config_file=str(kubeconfig))
        apply_crds(api, [crdgen.crd(r) for r in crdgen.RESOURCES])  # from this code's API types

        use_daemon = libvirt_mode == "daemon"
        if libvirt_mode == "auto":
            use_daemon, why = libvirtd_available()
            if not use_daemon:
                _say(f"no real libvirtd here ({why}); using libvirt's test driver instead")
        values = {"LIBVIRT_INSECURE": "true"}
        samples_dir = root / "manifests" / "examples"
        sample_files = ["libvirthost.yaml", "vm-blank.yaml"]
        if use_daemon:
            _say("starting a local libvirtd (QEMU/TCG) on loopback")
            daemon = stack.enter_context(LibvirtDaemon(name="local", root=workdir / "libvirt"))
            values["LIBVIRT_URI"] = daemon.uri
            iso = _build_boot_iso(workdir)
            if iso is not None:
                url = stack.enter_context(_serve_directory(iso.parent))
                values["ISO_URL"] = f"{url}/{iso.name}"
                values["ISO_CHECKSUM"] = "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest()
                sample_files += ["isoimage.yaml", "vm-from-iso.yaml"]
        else:
            values["LIBVIRT_URI"] = write_test_host(workdir / "test-host.xml", name="local", cpus=8, memory_mib=16384)

        _build_knowledge_base()
        _say("creating the sample resources from manifests/examples/")
        for created in create_objects(api, [_render(samples_dir / f, values) for f in sample_files]):
            print(f"    {created}")

        console_settings = _register_console(api, workdir)
        _say(f"export KUBECONFIG={kubeconfig}")
        _say("kubectl get libvirthosts,virtualmachines,isoimages -A")
        if metrics_port:
            _say(f"metrics: curl http://127.0.0.1:{metrics_port}/metrics")
        _say("running the operator in the foreground; Ctrl-C stops everything")
        try:
            # The sample ISO is served on loopback, which downloads may not reach by default.
            settings = settings_from_options(download_allow=("127.0.0.0/8",),
                                             iso_cache_dir=str(workdir / "iso-cache"),
                                             allow_test_driver=True, test_driver_dirs=(str(workdir),))
            settings = dataclasses.replace(settings, **console_settings)
            run_blocking(OperatorOptions(metrics_port=metrics_port, metrics_address="127.0.0.1",
                                         liveness_port=0, log_format="console", settings=settings))
        except KeyboardInterrupt:
            pass
        _say("stopping: operator stopped; removing local domains, libvirtd and the control plane")
    return 0


def _register_console(api: Any, workdir: pathlib.Path) -> dict[str, Any]:
    """The console API as the deploy manifests register it, but behind an ExternalName Service to
    localhost (the aggregator refuses loopback Endpoints; ExternalName is followed as is) and with the
    caBundle of a cert made here. `libvirt-operator console ns/vm` then works with the admin kubeconfig."""
    import socket

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from ..core.api.common import SUBRESOURCES_GROUP
    from ..handlers.console_api import self_signed_cert

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service, namespace = "libvirt-operator-console", "default"
    tls_dir = workdir / "console-tls"
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    cert, key = self_signed_cert([f"{service}.{namespace}.svc"], tls_dir)
    core, apis = client.CoreV1Api(api), client.ApiregistrationV1Api(api)
    name = f"v1alpha1.{SUBRESOURCES_GROUP}"
    for delete in (lambda: core.delete_namespaced_service(service, namespace), lambda: apis.delete_api_service(name)):
        with contextlib.suppress(ApiException):
            delete()
    core.create_namespaced_service(namespace, {"metadata": {"name": service}, "spec": {
        "type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}})
    apis.create_api_service({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": name},
                             "spec": {"group": SUBRESOURCES_GROUP, "version": "v1alpha1", "groupPriorityMinimum": 1000,
                                      "versionPriority": 15, "caBundle": base64.b64encode(cert.read_bytes()).decode(),
                                      "service": {"name": service, "namespace": namespace, "port": port}}})
    _say("console: libvirt-operator console <namespace>/<vm>   (Ctrl-] quits)")
    return {"console_port": port, "console_address": "127.0.0.1", "console_cert_file": str(cert),
            "console_key_file": str(key)}


def _build_boot_iso(workdir: pathlib.Path) -> pathlib.Path | None:
    try:
        from ..devenv.testiso import build_test_iso

        path, _markers = build_test_iso(workdir / "iso")
        return pathlib.Path(path)
    except Exception as err:  # the ISO sample is optional: the VM sample still runs
        _say(f"skipping the ISO sample: cannot build the test ISO ({err})")
        return None


def _build_knowledge_base() -> None:
    if os.environ.get("LIBVIRT_OPERATOR_SKIP_RAG_INDEX") == "1":
        return
    try:
        from ..adapters.rag import build_index, default_paths
    except ImportError:
        _say("knowledge base skipped (install the rag extra for runbook links in status)")
        return
    _say("indexing the runbooks in rag/ into the knowledge base (incremental)")
    rag_dir, db_dir = default_paths()
    stats = build_index(rag_dir, db_dir)
    print(f"    {stats}")
