"""The `libvirt-operator` command: run the operator, print CRDs, start the embedded default."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import click

from ..core import crdgen
from .leader_election import leader_election_click_options, options_from_click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="libvirt-operator")
def main() -> None:
    """libvirt-operator: VirtualMachines, ISOImages and LibvirtHosts on real libvirt hosts."""
    from ..core.logs import configure

    # Every command logs to stderr only (stdout is for its output: `explain --json`, `crds`);
    # `run` and `dev` configure their own format and level.
    configure("auto", "WARNING")


@main.command()
@click.option("-n", "--namespace", "namespaces", multiple=True,
              help="Watch only this namespace (repeatable; glob patterns allowed). Default: all namespaces.")
@click.option("--metrics-port", default=8080, show_default=True, type=int, help="Port of /metrics (0: off).")
@click.option("--metrics-address", default="0.0.0.0", show_default=True, help="Address /metrics listens on.")
@click.option("--liveness-port", default=8081, show_default=True, type=int, help="Port of kopf's /healthz (0: off).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True,
              help="auto: console on a TTY, JSON otherwise.")
@click.option("--log-level", default="INFO", show_default=True, help="Log level.")
@click.option("--no-knowledge-base", is_flag=True, help="Skip the remediation knowledge base (fixed links only).")
@click.option("--rag-db", type=click.Path(file_okay=False), default=None,
              help="Knowledge-base index directory (default: $LIBVIRT_OPERATOR_RAG_DB or ~/.cache/libvirt-operator/rag-db).")
@click.option("--remediation-base-url", default=None,
              help="Prefix of runbook links in status (air-gapped sites: their mirror of rag/).")
@click.option("--download-allow", "download_allow", multiple=True, metavar="CIDR",
              help="Let ISO downloads reach this network (repeatable). By default they reach only public "
                   "addresses: loopback, private (10/8, 172.16/12, 192.168/16), CGNAT, link-local, ULA, ... "
                   "are refused.")
@click.option("--download-deny", "download_deny", multiple=True, metavar="CIDR",
              help="Also refuse ISO downloads to this network (repeatable; the most specific network wins).")
@click.option("--download-max-size", default=None, metavar="QUANTITY",
              help="Largest ISO image accepted, e.g. 16Gi (ISOImage spec.maxSize can only lower it; 0: no cap). "
                   "[default: 16Gi]")
@click.option("--max-concurrent-imports", type=click.IntRange(min=1), default=None,
              help="ISO imports (download + uploads) running at once. [default: 4]")
@click.option("--iso-cache-dir", default=None, help="Where ISO downloads are staged before upload.")
@click.option("--allow-test-driver", is_flag=True,
              help="Accept test:// LibvirtHost URIs (libvirt's test driver; development and tests only).")
@click.option("--test-driver-dir", "test_driver_dirs", multiple=True, metavar="DIR",
              help="Directory whose .xml files test:/// URIs may name (repeatable; default: only test:///default).")
@click.option("--console-port", type=int, default=None,
              help="Serve the console API (backend of the subresources APIService) on this port; default: off.")
@click.option("--console-cert-file", default=None, help="Its TLS cert (default: self-signed, generated at start).")
@click.option("--console-key-file", default=None, help="Its TLS key.")
@click.option("--console-service-name", "console_service_names", multiple=True, metavar="DNS",
              help="DNS names of the self-signed cert (the Service: <name>.<namespace>.svc); repeatable.")
@leader_election_click_options
def run(namespaces: tuple[str, ...], metrics_port: int, metrics_address: str, liveness_port: int,
        log_format: str, log_level: str, no_knowledge_base: bool, rag_db: str | None,
        remediation_base_url: str | None, download_allow: tuple[str, ...], download_deny: tuple[str, ...],
        download_max_size: str | None, max_concurrent_imports: int | None,
        iso_cache_dir: str | None, allow_test_driver: bool, test_driver_dirs: tuple[str, ...],
        console_port: int | None, console_cert_file: str | None, console_key_file: str | None,
        console_service_names: tuple[str, ...], **leader_election: Any) -> None:
    """Run the operator in the foreground against the cluster in KUBECONFIG (or in-cluster)."""
    from .operator_main import OperatorOptions, run_blocking, settings_from_options

    settings = settings_from_options(
        knowledge_base=not no_knowledge_base, rag_db=rag_db, remediation_base_url=remediation_base_url,
        download_allow=download_allow, download_deny=download_deny, iso_cache_dir=iso_cache_dir,
        download_max_size=download_max_size, max_concurrent_imports=max_concurrent_imports,
        allow_test_driver=allow_test_driver, test_driver_dirs=test_driver_dirs)
    settings = dataclasses.replace(settings, console_port=console_port, console_cert_file=console_cert_file,
                                   console_key_file=console_key_file, console_service_names=console_service_names)
    run_blocking(OperatorOptions(
        namespaces=namespaces, metrics_port=metrics_port, metrics_address=metrics_address,
        liveness_port=liveness_port, log_format=log_format, log_level=log_level,  # type: ignore[arg-type]
        knowledge_base=not no_knowledge_base, settings=settings,
        leader_election=options_from_click(**leader_election)))


@main.command()
@click.option("--write", "write_dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Write one file per CRD into this directory instead of printing.")
def crds(write_dir: pathlib.Path | None) -> None:
    """Print the CustomResourceDefinitions generated from the API types."""
    rendered = crdgen.render_all()
    if write_dir is None:
        click.echo("---\n".join(rendered.values()), nl=False)
        return
    write_dir.mkdir(parents=True, exist_ok=True)
    for fname, text in rendered.items():
        (write_dir / fname).write_text(text)
        click.echo(f"wrote {write_dir / fname}")


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path(".dev"),
              show_default=True, help="Where the local control plane and libvirt host keep their state.")
@click.option("--libvirt", "libvirt_mode", type=click.Choice(["auto", "daemon", "test"]), default="auto",
              show_default=True, help="auto: a real libvirtd where it can run, else libvirt's test driver.")
@click.option("--metrics-port", default=8080, show_default=True, type=int, help="Port of /metrics.")
def dev(workdir: pathlib.Path, libvirt_mode: str, metrics_port: int) -> None:
    """The embedded default: local control plane + local libvirt host + samples + the operator."""
    from .dev import run_dev

    sys.exit(run_dev(workdir.resolve(), libvirt_mode, metrics_port))


from .console import console as _console  # noqa: E402
from .drain import drain as _drain  # noqa: E402
from .vm_actions import kubectl_plugin as _kubectl_plugin  # noqa: E402
from .vm_actions import vm as _vm_actions  # noqa: E402  (start/stop/restart/pause/unpause)

_kubectl_plugin.add_command(_console)
_kubectl_plugin.add_command(_drain)
main.add_command(_vm_actions)
main.add_command(_console)
main.add_command(_drain)


try:  # the knowledge-base commands need the rag extra
    from .rag import explain, rag
except ImportError:  # pragma: no cover - exercised only without the extra
    pass
else:
    main.add_command(rag)
    main.add_command(explain)
