"""Two replicas, one writer: two `libvirt-operator run --leader-elect` processes on the same test
control plane and the same two real libvirtd hosts. Exactly one holds the coordination.k8s.io/v1
Lease and acts; SIGKILL of the leader while ~24 VMs and an ISO import converge → the other takes over
within 15 s and converges everything with one domain per VM and one ISO volume per host; SIGTERM of
the leader → the lease is released and the other takes over faster; a leader frozen past its renew
deadline (SIGSTOP) exits with status 1 as soon as it runs again, without acting.

Takeover times are printed (pytest -s) and recorded in bench/README.md ("Leader election")."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from libvirt_operator.adapters.libvirt.volumes import volume_name
from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import Kube, condition
from tests.harness.libvirt_module import libvirt
from tests.harness.operator_process import OperatorProcess

VM, HOST, ISO = "virtualmachines", "libvirthosts", "isoimages"
LEASE = "libvirt-operator-test"
VMS = 24
TAKEOVER_LIMIT = 15.0
pytestmark = pytest.mark.usefixtures("without_session_operator")


# ------------------------------------------------------------------------------------------- CLI flags


def test_cli_leader_election_flags_are_parsed_and_validated(monkeypatch) -> None:
    """The `run` command's flags reach the options; bad combinations fail before anything starts."""
    from libvirt_operator import cli
    from libvirt_operator.cli import operator_main

    seen: list[Any] = []
    monkeypatch.setattr(operator_main, "run_blocking", seen.append)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setenv("POD_NAME", "lvop-0")
    runner = CliRunner()
    res = runner.invoke(cli.main, ["run", "--leader-elect", "--leader-election-namespace", "ops",
                                   "--leader-election-id", "my-lease", "--leader-election-lease-duration", "20",
                                   "--leader-election-renew-deadline", "15", "--leader-election-retry-period", "3"])
    assert res.exit_code == 0, res.output
    le = seen[-1].leader_election
    assert (le.enabled, le.name, le.namespace, le.lease_duration, le.renew_deadline, le.retry_period) == (
        True, "my-lease", "ops", 20, 15.0, 3.0)
    resolved = le.resolve()
    assert (resolved.identity, resolved.namespace) == ("lvop-0", "ops")

    res = runner.invoke(cli.main, ["run"])  # default: off (make run, the test harness)
    assert res.exit_code == 0 and seen[-1].leader_election.enabled is False

    monkeypatch.setenv("POD_NAMESPACE", "from-downward-api")
    monkeypatch.delenv("POD_NAME")
    res = runner.invoke(cli.main, ["run", "--leader-elect"])
    assert res.exit_code == 0, res.output
    resolved = seen[-1].leader_election.resolve()
    assert resolved.namespace == "from-downward-api" and resolved.name == "libvirt-operator"
    assert resolved.identity == f"{socket.gethostname()}_{os.getpid()}"

    for bad, message in [
        (["--leader-election-lease-duration", "5", "--leader-election-renew-deadline", "7"],
         "lease duration must be longer than the renew deadline"),
        (["--leader-election-renew-deadline", "2", "--leader-election-retry-period", "2"],
         "renew deadline must be longer than 1.2"),
        (["--leader-election-retry-period", "0.5"], "0.5 is not in the range x>=1"),
    ]:
        res = runner.invoke(cli.main, ["run", "--leader-elect", *bad])
        assert res.exit_code == 2 and message in res.output, res.output
    monkeypatch.delenv("POD_NAMESPACE")
    res = runner.invoke(cli.main, ["run", "--leader-elect"])  # outside a pod and no namespace given
    assert res.exit_code == 2 and "give the Lease's namespace" in res.output, res.output


# ------------------------------------------------------------------------------------ two real replicas


@pytest.fixture(scope="module")
def daemons(libvirtd_factory) -> list[Any]:
    return libvirtd_factory.many(2)


@pytest.fixture(scope="module")
def http(test_iso) -> Iterator[TestHTTPServer]:
    with TestHTTPServer(Path(test_iso.path)) as srv:
        yield srv


class Cluster:
    """The test's namespace, two labelled LibvirtHosts, two operator processes and the Lease."""

    def __init__(self, kube: Kube, kubeconfig: Path, daemons: list[Any], tmp_path: Path) -> None:
        self.kube = kube
        self.namespace = kube.new_namespace("le")
        self.label = f"le-{uuid.uuid4().hex[:6]}"
        self.hosts = {f"{self.label}-{i}": d for i, d in enumerate(daemons)}
        self.conns = {name: d.connect() for name, d in self.hosts.items()}
        self.coord = client.CoordinationV1Api(kube.api)
        cache = tmp_path / "iso-cache"
        args = ("--leader-elect", "--leader-election-namespace", self.namespace, "--leader-election-id", LEASE,
                "--download-allow", "127.0.0.0/8", "--iso-cache-dir", str(cache))
        self.ops = {n: OperatorProcess(kubeconfig, tmp_path, namespaces=(self.namespace,), extra_args=args, name=n)
                    for n in ("a", "b")}
        self.uids: list[str] = []

    # -- the Lease
    def holder(self) -> str | None:
        try:
            return self.coord.read_namespaced_lease(LEASE, self.namespace).spec.holder_identity
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    @staticmethod
    def identity(op: OperatorProcess) -> str:
        assert op.proc is not None
        return f"{socket.gethostname()}_{op.proc.pid}"

    def wait_leader(self, op: OperatorProcess, timeout: float = 30) -> float:
        """Seconds until `op` holds the Lease."""
        start = time.monotonic()
        want = self.identity(op)
        self.kube.wait_for(lambda: self.holder() == want, timeout=timeout, interval=0.05,
                           what=f"{want} holds the lease (holder: {self.holder()})\n{op.tail()}")
        return time.monotonic() - start

    # -- the hosts
    def domains(self) -> dict[str, list[str]]:
        """VM uid → hosts that have a domain with that UUID."""
        found: dict[str, list[str]] = {}
        for host, conn in self.conns.items():
            for dom in conn.listAllDomains():
                found.setdefault(dom.UUIDString(), []).append(host)
        return found

    def domain_names(self) -> dict[str, int]:
        names: dict[str, int] = {}
        for conn in self.conns.values():
            for dom in conn.listAllDomains():
                names[dom.name()] = names.get(dom.name(), 0) + 1
        return names

    def iso_volumes(self, prefix: str) -> dict[str, list[str]]:
        out = {}
        for host, conn in self.conns.items():
            pool = conn.storagePoolLookupByName("default")
            pool.refresh(0)
            out[host] = [v for v in pool.listVolumes() if v.startswith(prefix)]
        return out

    def make_vm(self, name: str) -> None:
        vm = self.kube.create(VM, {"metadata": {"name": name}, "spec": {
            "hostSelector": {"matchLabels": {"le": self.label}}, "runStrategy": "Halted", "memory": "64Mi",
            "domainType": "qemu", "disks": [{"name": "root", "volume": {"size": "16Mi"}}]}}, self.namespace)
        self.uids.append(vm["metadata"]["uid"])

    def vms(self) -> list[dict[str, Any]]:
        return self.kube.custom.list_namespaced_custom_object("virt.libvirt-operator.io", "v1alpha1",
                                                              self.namespace, VM)["items"]

    def not_ready(self) -> list[str]:
        return [v["metadata"]["name"] for v in self.vms()
                if (condition(v, "Ready") or {}).get("status") != "True"]

    def cleanup(self) -> None:
        live = [op for op in self.ops.values() if op.alive()] or [self.ops["a"].start()]
        for obj in self.vms():
            self.kube.delete(VM, obj["metadata"]["name"], self.namespace)
        for obj in self.kube.custom.list_namespaced_custom_object("virt.libvirt-operator.io", "v1alpha1",
                                                                  self.namespace, ISO)["items"]:
            self.kube.delete(ISO, obj["metadata"]["name"], self.namespace)
        with contextlib.suppress(AssertionError):
            self.kube.wait_for(lambda: not self.vms(), timeout=90, what="VMs deleted")
        for name in self.hosts:
            self.kube.delete(HOST, name)
        with contextlib.suppress(AssertionError):
            self.kube.wait_for(lambda: all(self.kube.get(HOST, n) is None for n in self.hosts), timeout=60,
                               what="test hosts deleted")
        for op in self.ops.values():
            op.stop()
        del live
        for conn in self.conns.values():  # leave the shared daemons empty
            for dom in conn.listAllDomains():
                if dom.UUIDString() in self.uids:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            pool = conn.storagePoolLookupByName("default")
            for vol in pool.listAllVolumes():
                if any(vol.name().startswith(f"lvop-{uid}") for uid in self.uids) or self.namespace in vol.name():
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
            conn.close()
        self.kube.core.delete_namespace(self.namespace)


@pytest.fixture
def cluster(kube, kubeconfig, daemons, tmp_path) -> Iterator[Cluster]:
    c = Cluster(kube, Path(kubeconfig), daemons, tmp_path)
    for name, d in c.hosts.items():
        kube.create(HOST, {"metadata": {"name": name, "labels": {"le": c.label}},
                           "spec": {"uri": d.uri, "insecure": True, "probeIntervalSeconds": 5}})
    try:
        yield c
    finally:
        c.cleanup()


def _acted(op: OperatorProcess) -> list[str]:
    """Log lines of kopf handling objects (anything a handler did), from this run's log."""
    out = []
    for line in op.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if str(rec.get("logger", "")).startswith("kopf.objects") or "handler" in str(rec.get("event", "")).lower():
                out.append(line)
    return out


def test_one_leader_acts_and_a_killed_leader_is_replaced_without_duplicates(cluster: Cluster, http, test_iso,
                                                                            kube) -> None:
    a, b = cluster.ops["a"], cluster.ops["b"]
    a.start()
    cluster.wait_leader(a)
    for name in cluster.hosts:
        kube.wait_condition(HOST, name, "Ready", "True", timeout=60)
    b.start()
    # b campaigns but never acts while a holds the lease
    kube.wait_for(lambda: "leader election: campaigning" in b.log_path.read_text(errors="replace"),
                  timeout=30, what=f"b campaigns\n{b.tail()}")
    time.sleep(3)
    assert cluster.holder() == cluster.identity(a)
    assert _acted(b) == [], "the waiting replica acted"
    assert "now leading" not in b.log_path.read_text(errors="replace")

    # work for both: VMs spread over two hosts, and one ISO imported to both
    iso_bytes = Path(test_iso.path).read_bytes()
    sha = hashlib.sha256(iso_bytes).hexdigest()
    kube.create(ISO, {"metadata": {"name": "boot"}, "spec": {
        "source": {"url": http.url("/image")}, "checksum": f"sha256:{sha}",
        "targets": {"hostNames": list(cluster.hosts)}}}, cluster.namespace)
    for i in range(VMS):
        cluster.make_vm(f"vm-{i:02d}")
    # SIGKILL the leader mid-way: some domains exist, not all
    kube.wait_for(lambda: len(cluster.domains()) >= VMS // 4, timeout=120, interval=0.1,
                  what=f"a quarter of the domains defined\n{a.tail()}")
    before_kill = len(cluster.domains())
    a.kill()
    killed = time.monotonic()
    kube.wait_for(lambda: cluster.holder() == cluster.identity(b), timeout=30, interval=0.05,
                  what=f"b takes the lease over\n{b.tail()}")
    takeover = time.monotonic() - killed
    print(f"\nSIGKILL takeover: {takeover:.2f} s (domains at the kill: {before_kill}/{VMS})")
    assert takeover <= TAKEOVER_LIMIT
    assert before_kill < VMS, "the leader was killed after it had finished: not mid-way"

    # b converges everything
    kube.wait_for(lambda: not cluster.not_ready(), timeout=240, interval=1,
                  what=f"all VMs Ready (not yet: {cluster.not_ready()})\n{b.tail()}")
    kube.wait_condition(ISO, "boot", "Ready", "True", namespace=cluster.namespace, timeout=120)
    domains = cluster.domains()
    ours = {uid: hosts for uid, hosts in domains.items() if uid in cluster.uids}
    assert len(ours) == VMS and all(len(h) == 1 for h in ours.values()), f"duplicate or missing domains: {ours}"
    dup_names = {n: c for n, c in cluster.domain_names().items() if c > 1}
    assert dup_names == {}
    vols = cluster.iso_volumes(volume_name(cluster.namespace, "boot", f"sha256:{sha}"))
    assert all(len(v) == 1 for v in vols.values()), f"ISO volumes per host: {vols}"
    # one download per leader at most (the import restarts after a kill; never two at once)
    assert 1 <= http.count("/image") <= 2
    # status agrees with the hosts: each VM's status.host is where its only domain is
    placed = {vm["metadata"]["uid"]: vm["status"].get("host") for vm in cluster.vms()}
    assert {uid: hosts[0] for uid, hosts in ours.items()} == placed


def _healthz(port: int) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as rsp:
            return rsp.status, json.loads(rsp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None


def _master_status(port: int) -> float | None:
    """controller-runtime's leader_election_master_status{name=<lease>} from the process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'leader_election_master_status{{name="{LEASE}"}}'):
            return float(line.split()[-1])
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_releases_the_lease_and_the_other_takes_over_faster(cluster: Cluster, kube) -> None:
    """Also: the waiting replica is Ready -- its /healthz answers 200 {"leader": false} -- and once
    elected the same port answers kopf's /healthz."""
    a, b = cluster.ops["a"], cluster.ops["b"]
    port, metrics_port = _free_port(), _free_port()
    b.extra_args = (*b.extra_args, "--liveness-port", str(port), "--metrics-port", str(metrics_port),
                    "--metrics-address", "127.0.0.1")
    a.start()
    cluster.wait_leader(a)
    b.start()
    kube.wait_for(lambda: "leader election: campaigning" in b.log_path.read_text(errors="replace"),
                  timeout=30, what=f"b campaigns\n{b.tail()}")
    # (holder: None until b's first read of the Lease)
    code, body = kube.wait_for(lambda: (r := _healthz(port))[0] and (r[1] or {}).get("holder") and r, timeout=30,
                               what=f"b's /healthz naming the holder: {_healthz(port)}")
    assert code == 200 and body["leader"] is False and body["holder"] == cluster.identity(a), body
    assert _master_status(metrics_port) == 0.0
    time.sleep(1)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    kube.wait_for(lambda: cluster.holder() == cluster.identity(b), timeout=30, interval=0.05,
                  what=f"b takes the released lease\n{a.tail()}\n{b.tail()}")
    takeover = time.monotonic() - sent
    assert a.proc.wait(30) == 0
    log = a.log_path.read_text(errors="replace")
    print(f"\nSIGTERM takeover: {takeover:.2f} s")
    assert "leader election: released the lease" in log
    assert takeover < 5.0, "a released lease is taken at the next retry, not after the lease duration"
    kube.wait_for(lambda: (r := _healthz(port))[0] == 200 and not (isinstance(r[1], dict) and "leader" in r[1]),
                  timeout=30, what="kopf's /healthz on b's liveness port")
    assert _master_status(metrics_port) == 1.0
    # and b acts: a VM created now converges
    for name in cluster.hosts:
        kube.wait_condition(HOST, name, "Ready", "True", timeout=60)
    cluster.make_vm("after-sigterm")
    kube.wait_condition(VM, "after-sigterm", "Ready", "True", namespace=cluster.namespace, timeout=90)


def test_a_leader_that_missed_its_renew_deadline_exits_at_once(cluster: Cluster, kube) -> None:
    """SIGSTOP freezes the leader past the lease duration (as a long GC pause or a partition would);
    the other replica takes over; when the old leader runs again it exits with status 1 at once."""
    a, b = cluster.ops["a"], cluster.ops["b"]
    a.start()
    cluster.wait_leader(a)
    b.start()
    kube.wait_for(lambda: "leader election: campaigning" in b.log_path.read_text(errors="replace"),
                  timeout=30, what=f"b campaigns\n{b.tail()}")
    assert a.proc is not None
    os.killpg(a.proc.pid, signal.SIGSTOP)
    try:
        cluster.wait_leader(b, timeout=30)
    finally:
        os.killpg(a.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    rc = a.proc.wait(15)
    print(f"\nfrozen leader exited {time.monotonic() - resumed:.2f} s after resuming, status {rc}")
    assert rc == 1
    assert "leader election: lost the lease, stopping" in a.log_path.read_text(errors="replace")
    assert cluster.holder() == cluster.identity(b)
