"""VM create/delete and `apply → serial` on one real libvirtd: the operator vs raw libvirt, same run.

    .venv/bin/python bench/vm_libvirtd_bench.py --vms 100 --reps 2 --serial-reps 5 [--json out.json]

Needs root and the libvirt system packages (hack/install-system-deps.sh), like the integration tests.

1. Starts one private real libvirtd (QEMU/TCG, `libvirt_operator.devenv.libvirtd.LibvirtDaemon`,
   qemu+tcp on loopback, dir pool `default`), a private control plane (tests.harness.controlplane)
   with crds/ applied, and the operator as a **separate process** (the pieces of
   bench/vm_scale_bench.py: JSON logs to a file, /metrics on loopback), one LibvirtHost on that daemon.
2. The domain XML of the raw baseline is the operator's own: one VirtualMachine of the bench's shape
   (runStrategy Halted, 1 vCPU, 64Mi, domainType qemu, no disks) is defined through the operator, its
   inactive XML read with XMLDesc, the VM deleted; each raw domain is that XML with a new name, a new
   UUID and its own serial log file (the operator's metadata element is dropped).
3. Per repeat, in the same run: raw create (define+start with --threads threads, one connection each,
   timed until all are running), raw delete (destroy+undefine, same threads, until none is left);
   then ours: N VirtualMachines (runStrategy Always, same shape) created with a bare aiohttp client,
   timed until all are Ready=True (seen by one watch, not LIST polls) AND all N domains run on the daemon;
   then all deleted, timed until the objects are gone AND no domain or volume of theirs is left on the
   daemon. CPU seconds per process (libvirtd, API server, etcd, operator, this client) and of the whole
   machine are recorded for both create phases.
4. `apply → serial`: an ISOImage of the test ISO (devenv/testiso.py, served by the test HTTP server)
   imported to the host first; then, alternately, raw define+start of the operator's XML for that VM
   (cdrom = the ISO volume) and `create` of the VirtualMachine, each timed until the guest's kernel
   marker is in its serial log; median over --serial-reps.
5. Counts libvirt call timeouts/errors (operator /metrics) and timeout/error lines in its log.

Everything runs on loopback; daemons, QEMUs and temp dirs are removed at the end (also on failure).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import vm_scale_bench as vsb  # noqa: E402  (the operator process, the bare API client, the LIST waits)
from vm_scale_bench import GROUP, HOST_PLURAL, VERSION, VM_PLURAL, Api, BenchError, log  # noqa: E402

ISO_PLURAL = "isoimages"
VM_MEMORY = "64Mi"
RUNNING = 1


# --------------------------------------------------------------------------------------------
# The operator process: vm_scale_bench's, with settings for a real host (loopback ISO downloads)
# --------------------------------------------------------------------------------------------

def operator_child(kubeconfig: str, metrics_port: int, log_level: str) -> None:
    import ipaddress

    os.environ["KUBECONFIG"] = kubeconfig
    from libvirt_operator.cli.operator_main import OperatorOptions
    from libvirt_operator.core.settings import Settings

    workdir = Path(kubeconfig).parent.parent
    settings = Settings(knowledge_base_enabled=False, iso_cache_dir=str(workdir / "iso-cache"),
                        download_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    options = OperatorOptions(metrics_port=metrics_port, metrics_address="127.0.0.1", liveness_port=0,
                              log_format="json", log_level=log_level, knowledge_base=False, settings=settings)
    vsb.run_operator(options)  # VM_SCALE_BENCH_PROFILE: as vm_scale_bench


class OperatorProcess(vsb.OperatorProcess):
    """vm_scale_bench's process wrapper, started from this file (so operator_child above runs)."""

    def __init__(self, kubeconfig: Path, workdir: Path, log_level: str) -> None:
        self.metrics_port = vsb.free_port()
        self.log_path = workdir / "operator.log"
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--operator-child", str(kubeconfig), str(self.metrics_port), log_level],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            preexec_fn=vsb._die_with_parent)  # noqa: PLW1509
        import urllib.request
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call_outcomes(metrics: dict[str, Any]) -> Counter[str]:
    """libvirt calls that did not end ok, by operation:outcome."""
    return Counter({k: v for k, v in vsb.libvirt_calls(metrics).items() if ":" in k})


def call_seconds(m0: dict[str, Any], m1: dict[str, Any]) -> dict[str, str]:
    """Mean duration of each libvirt operation between two scrapes (count, mean s)."""
    def sums(m: dict[str, Any], name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for labels, v in m.get(name, {}).items():
            out[dict(labels)["operation"]] += v
        return out
    n = sums(m1, "libvirt_operator_libvirt_call_duration_seconds_count") - \
        sums(m0, "libvirt_operator_libvirt_call_duration_seconds_count")
    s = sums(m1, "libvirt_operator_libvirt_call_duration_seconds_sum")
    s.subtract(sums(m0, "libvirt_operator_libvirt_call_duration_seconds_sum"))
    return {op: f"{int(c)} x {s[op] / c:.3f}s" for op, c in sorted(n.items()) if c}


def log_problems(path: Path, start: int) -> tuple[Counter[str], int]:
    """(timeout/error lines by message, new offset) in the operator's JSON log from byte `start`."""
    out: Counter[str] = Counter()
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read()
    for raw in data.splitlines():
        line = raw.decode(errors="replace")
        low = line.lower()
        if "timeout" in low or "did not finish" in low or '"level": "error"' in low or '"level":"error"' in low:
            try:
                rec = json.loads(line)
                msg = str(rec.get("event") or rec.get("message") or rec.get("msg") or "")[:80]
                code = rec.get("code") or ""
                out[f"{rec.get('level', '?')}: {msg} {code}".strip()] += 1
            except ValueError:
                out[line[:80]] += 1
    return out, start + len(data)


# --------------------------------------------------------------------------------------------
# Raw libvirt
# --------------------------------------------------------------------------------------------

def raw_xml(template: str, name: str, serial_log: str) -> str:
    """The operator's domain XML with a new name, a new UUID, its own serial log, no metadata."""
    root = ET.fromstring(template)
    root.find("name").text = name  # type: ignore[union-attr]
    u = root.find("uuid")
    if u is not None:
        root.remove(u)
    ET.SubElement(root, "uuid").text = str(uuid.uuid4())
    md = root.find("metadata")
    if md is not None:
        root.remove(md)
    for log_el in root.iterfind("./devices/serial/log"):
        log_el.set("file", serial_log)
    for src in root.iterfind("./devices/serial/source"):
        if src.get("path"):
            src.set("path", serial_log)
    return ET.tostring(root, encoding="unicode")


class RawClient:
    """`threads` threads, each with its own connection to the daemon."""

    def __init__(self, uri: str, threads: int) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda *_a: None, None)
        self.libvirt = libvirt
        self.local = threading.local()
        self.conns: list[Any] = []
        self.lock = threading.Lock()
        self.uri = uri
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="raw")
        # open every thread's connection before timing anything
        barrier = threading.Barrier(threads)
        list(self.pool.map(lambda _i: (self.conn(), barrier.wait()), range(threads)))

    def conn(self) -> Any:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = self.libvirt.open(self.uri)
            with self.lock:
                self.conns.append(c)
        return c

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()

    def run(self, fn: Any, items: list[Any]) -> float:
        t0 = time.monotonic()
        for f in [self.pool.submit(fn, i) for i in items]:
            f.result()
        return time.monotonic() - t0

    def create(self, xmls: list[str]) -> float:
        def one(x: str) -> None:
            self.conn().defineXML(x).create()
        return self.run(one, xmls)

    def delete(self, names: list[str]) -> float:
        def one(name: str) -> None:
            dom = self.conn().lookupByName(name)
            t = time.perf_counter()
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            with self.lock:
                self.teardown_seconds.append(time.perf_counter() - t)
        self.teardown_seconds: list[float] = []
        return self.run(one, names)


# --------------------------------------------------------------------------------------------
# Helpers on the daemon
# --------------------------------------------------------------------------------------------

class MachineCpu(vsb.CpuMeter):
    """CPU seconds per process (as vm_scale_bench), `qemu`: every live QEMU process (their start-up and
    the guests; a phase that creates them counts all they spent), and `machine`: every core's busy
    time, so that `the rest` (machine minus those) is the kernel's share and everything else."""

    def snapshot(self) -> dict[str, float]:
        out = super().snapshot()
        out["qemu"] = qemu_cpu_seconds()
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        out["machine"] = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = vsb.CpuMeter.spent(before, after)
        d["the rest"] = round(d["machine"] - sum(v for k, v in d.items() if k != "machine"), 2)
        return d


def qemu_cpu_seconds() -> float:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("qemu-system"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def libvirtd_pid(session: int) -> int:
    """The libvirtd process of the daemon whose session leader (unshare → taskset → bash) is `session`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            sid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if comm == "libvirtd" and sid == session:
            return int(entry.name)
    raise BenchError(f"no libvirtd process in session {session}")


def domains_with_prefix(conn: Any, prefix: str, active_only: bool = False) -> int:
    flags = 1 if active_only else 0  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
    return sum(1 for d in conn.listAllDomains(flags) if d.name().startswith(prefix))


def volumes_of(conn: Any, uids: set[str]) -> int:
    pool = conn.storagePoolLookupByName("default")
    pool.refresh(0)
    return sum(1 for v in pool.listAllVolumes(0) if any(u in v.name() for u in uids))


def vm_body(name: str, host: str, strategy: str = "Always", disks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"hostRef": host, "runStrategy": strategy, "cpu": 1, "memory": VM_MEMORY,
                            "domainType": "qemu", "terminationGracePeriodSeconds": 0}
    if disks:
        spec["disks"] = disks
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec}


async def wait_for(check: Any, timeout: float, what: str, op: OperatorProcess | None = None,
                   interval: float = 0.25) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if op is not None:
            op.check()
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}"
                             + (f"\n--- operator log tail:\n{op.tail()}" if op else ""))
        await asyncio.sleep(interval)


async def template_xml(api: Api, op: OperatorProcess, conn: Any, ns: str, host: str, name: str,
                       disks: list[dict[str, Any]] | None = None) -> str:
    """The operator's inactive domain XML for a VM of this shape (defined Halted, then deleted)."""
    import libvirt

    obj = await api.create(VM_PLURAL, vm_body(name, host, "Halted", disks), ns)
    uid = obj["metadata"]["uid"]

    async def defined() -> bool:
        try:
            await asyncio.to_thread(conn.lookupByUUIDString, uid)
            return True
        except libvirt.libvirtError:
            return False
    await wait_for(defined, 60, f"the domain of {name} defined", op)
    xml = await asyncio.to_thread(lambda: conn.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    await api.delete(VM_PLURAL, ns, name)

    async def gone() -> bool:
        return not (await api.list(VM_PLURAL, ns))["items"] and not await defined()
    await wait_for(gone, 60, f"{name} deleted", op)
    return xml


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------

async def raw_phase(raw: RawClient, conn: Any, template: str, n: int, tag: str, serial_dir: Path,
                    cpu: MachineCpu) -> dict[str, Any]:
    names = [f"raw-{tag}-{i:04d}" for i in range(n)]
    xmls = [raw_xml(template, nm, str(serial_dir / f"{nm}-serial.log")) for nm in names]
    c0 = cpu.snapshot()
    create = await asyncio.to_thread(raw.create, xmls)
    cpu_create = cpu.spent(c0, cpu.snapshot())
    running = await asyncio.to_thread(domains_with_prefix, conn, f"raw-{tag}-", True)
    if running != n:
        raise BenchError(f"raw: {running}/{n} domains running after create")
    await asyncio.sleep(3.0)  # as for ours: let the guests get past their firmware before tearing down
    delete = await asyncio.to_thread(raw.delete, names)
    mean_teardown = statistics.mean(raw.teardown_seconds)
    left = await asyncio.to_thread(domains_with_prefix, conn, f"raw-{tag}-")
    if left:
        raise BenchError(f"raw: {left} domains left after delete")
    return {"create_seconds": create, "delete_seconds": delete, "destroy_undefine_mean_seconds": mean_teardown,
            "cpu_seconds_create": cpu_create}


async def ours_phase(api: Api, op: OperatorProcess, conn: Any, n: int, host: str, tag: str,
                     cpu: MachineCpu) -> dict[str, Any]:
    ns = f"bench-{tag}"
    await api.create_namespace(ns)
    bodies = [vm_body(f"vm-{i:04d}", host) for i in range(n)]
    prefix = f"{ns}_"
    # Readiness and deletion are seen through one watch (as `kubectl wait` does), not LIST polls: a
    # LIST of 100 VMs every 0.5 s cost the API server more CPU than the operator's own requests, on
    # the 2 cores the guests and libvirtd need, and the raw side pays no such observer.
    rv = (await api.list(VM_PLURAL, ns))["metadata"]["resourceVersion"]
    watch = vsb.WriteWatch(api, ns, rv)
    watch.start()

    def seen(times: dict[str, float]) -> Any:
        async def check() -> bool:
            if watch.error is not None:
                raise BenchError(f"watch failed: {watch.error!r}")
            return len(times) >= n
        return check

    try:
        m0 = op.metrics()
        served0 = await api.requests_served()  # outside the CPU window: a scrape costs the API server too
        c0 = cpu.snapshot()
        t0 = time.monotonic()
        created = await vsb.create_all(api, bodies, ns)
        uids = {o["metadata"]["uid"] for o in created}
        t_created = time.monotonic()

        async def all_running() -> bool:
            return await asyncio.to_thread(domains_with_prefix, conn, prefix, True) >= n

        timeout = max(300.0, n * 3.0)
        await wait_for(seen(watch.ready_at), timeout, f"{n} VMs Ready=True", op, interval=0.05)
        t_ready = max(watch.ready_at.values())
        t_running = await wait_for(all_running, 60, f"{n} domains running", op)
        create = max(t_ready, t_running) - t0
        cpu_create = cpu.spent(c0, cpu.snapshot())
        served = {k: v for k, v in sorted(((await api.requests_served()) - served0).items()) if v}
        ready_s = t_ready - t0
        log(f"  ours: created (API) in {t_created - t0:.2f}s, all Ready=True {t_ready - t0:.2f}s, "
            f"domains running {t_running - t0:.2f}s")
        await asyncio.sleep(3.0)
        m1 = op.metrics()

        t0 = time.monotonic()
        await asyncio.gather(*(api.delete(VM_PLURAL, ns, b["metadata"]["name"]) for b in bodies))

        async def domains_gone() -> bool:
            return await asyncio.to_thread(domains_with_prefix, conn, prefix) == 0

        await wait_for(seen(watch.deleted_at), timeout, f"{n} VMs deleted", op, interval=0.05)
        t_objs = max(watch.deleted_at.values())
        t_doms = await wait_for(domains_gone, 60, f"{n} domains gone", op)
    finally:
        await watch.stop()
    vols = await asyncio.to_thread(volumes_of, conn, uids)
    if vols:
        raise BenchError(f"ours: {vols} volumes of the bench VMs left after delete")
    delete = max(t_objs, t_doms) - t0
    m2 = op.metrics()
    log(f"  ours: deleted: objects gone {t_objs - t0:.2f}s, domains gone {t_doms - t0:.2f}s")
    return {"create_seconds": create, "ready_seconds": ready_s, "cpu_seconds_create": cpu_create,
            "requests_create": served,
            "delete_seconds": delete, "objects_gone_seconds": t_objs - t0, "domains_gone_seconds": t_doms - t0,
            "failed_calls_create": dict(call_outcomes(m1) - call_outcomes(m0)),
            "failed_calls_delete": dict(call_outcomes(m2) - call_outcomes(m1)),
            "calls_create": call_seconds(m0, m1), "calls_delete": call_seconds(m1, m2)}


def marker_in(path: Path, marker: str) -> bool:
    try:
        return marker in path.read_text(errors="replace")
    except OSError:
        return False


async def serial_phase(api: Api, op: OperatorProcess, conn: Any, raw: RawClient, host: str, log_dir: Path,
                       reps: int, iso_url: str, iso_sha: str) -> dict[str, Any]:
    from libvirt_operator.devenv.testiso import KERNEL_MARKER

    ns = "bench-serial"
    await api.create_namespace(ns)
    await api.create(ISO_PLURAL, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ISOImage",
                                  "metadata": {"name": "boot"},
                                  "spec": {"source": {"url": iso_url}, "checksum": f"sha256:{iso_sha}",
                                           "targets": {"hostNames": [host]}}}, ns)

    async def iso_ready() -> bool:
        obj = await api.request("GET", Api.path(ISO_PLURAL, ns, "boot"))
        return vsb.is_ready(obj)
    await wait_for(iso_ready, 120, "ISOImage Ready", op)
    disks = [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot"}}}]
    template = await template_xml(api, op, conn, ns, host, "serial-template", disks)
    ours: list[float] = []
    raws: list[float] = []
    try:
        for r in range(reps):
            # raw: define+start of the operator's XML (cdrom = the same ISO volume), until the marker
            name = f"rawserial-{r}"
            serial = log_dir / f"{name}-serial.log"
            xml = raw_xml(template, name, str(serial))
            t0 = time.monotonic()
            await asyncio.to_thread(lambda: raw.conn().defineXML(xml).create())
            t1 = await wait_for(lambda: asyncio.to_thread(marker_in, serial, KERNEL_MARKER), 60,
                                f"{name}: marker on serial", interval=0.02)
            raws.append(t1 - t0)
            await asyncio.to_thread(raw.delete, [name])
            # ours: create of the VirtualMachine (ISOImage imported already), until the marker
            vm = f"serial-{r}"
            serial = log_dir / f"{ns}_{vm}-serial.log"
            t0 = time.monotonic()
            await api.create(VM_PLURAL, vm_body(vm, host, "Always", disks), ns)
            t1 = await wait_for(lambda: asyncio.to_thread(marker_in, serial, KERNEL_MARKER), 60,
                                f"{vm}: marker on serial", op, interval=0.02)
            ours.append(t1 - t0)
            await api.delete(VM_PLURAL, ns, vm)

            async def vm_gone(vm: str = vm) -> bool:
                return not any(o["metadata"]["name"] == vm for o in (await api.list(VM_PLURAL, ns))["items"])
            await wait_for(vm_gone, 60, f"{vm} deleted", op)
            log(f"  serial rep {r + 1}: raw {raws[-1]:.2f}s, ours {ours[-1]:.2f}s")
    finally:
        with contextlib.suppress(Exception):
            await api.delete(ISO_PLURAL, ns, "boot")
    return {"raw_seconds": raws, "ours_seconds": ours, "raw_median": statistics.median(raws),
            "ours_median": statistics.median(ours), "ratio": statistics.median(ours) / statistics.median(raws)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import libvirt

    from libvirt_operator.devenv.libvirtd import LibvirtDaemon
    from libvirt_operator.devenv.testiso import build_test_iso
    from tests.harness.controlplane import ControlPlane
    from tests.harness.http_server import TestHTTPServer
    from tests.harness.kube import Kube

    libvirt.registerErrorHandler(lambda *_a: None, None)
    workdir = Path(tempfile.mkdtemp(prefix="vm-libvirtd-bench-", dir=args.workdir))
    result: dict[str, Any] = {"vms": args.vms, "threads": args.threads, "workdir": str(workdir),
                              "loadavg_start": os.getloadavg(), "nproc": os.cpu_count()}
    daemon = LibvirtDaemon(name="bench", root=workdir / "libvirtd", cpu=args.libvirtd_cpus)
    cp = ControlPlane(workdir / "cp")
    op: OperatorProcess | None = None
    api: Api | None = None
    raw: RawClient | None = None
    http: TestHTTPServer | None = None
    conn: Any = None
    try:
        log(f"starting libvirtd and the control plane in {workdir}")
        daemon.start()
        log_dir = daemon.log_dir / "qemu"
        log_dir.mkdir(parents=True, exist_ok=True)
        cp.start()
        Kube(cp.kubeconfig_path).apply_crds()
        api = Api(cp.server_url, cp.ssl_context(), args.concurrency)
        op = OperatorProcess(cp.kubeconfig_path, workdir, args.log_level)
        op.wait_metrics()
        conn = daemon.connect()
        host_spec: dict[str, Any] = {"uri": daemon.uri, "insecure": True}
        if args.max_concurrent_calls:
            host_spec["maxConcurrentCalls"] = args.max_concurrent_calls
        await api.create(HOST_PLURAL, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LibvirtHost",
                                       "metadata": {"name": "bench"}, "spec": host_spec})
        await vsb.wait_all(api, HOST_PLURAL, None, 1, 60, "LibvirtHost Ready=True", op=op)
        host_obj = (await api.list(HOST_PLURAL))["items"][0]
        result["max_concurrent_calls"] = host_obj["spec"].get("maxConcurrentCalls")
        await api.create_namespace("bench-template")
        template = await template_xml(api, op, conn, "bench-template", "bench", "template")
        result["template_xml"] = template
        raw = RawClient(daemon.uri, args.threads)
        cpu = MachineCpu({"libvirtd": libvirtd_pid(daemon.proc.pid), "etcd": cp._etcd.pid,
                          "kube-apiserver": cp._apiserver.pid, "operator": op.proc.pid})
        offset = op.log_path.stat().st_size  # count only what the measured phases log
        reps = []
        for r in range(args.reps):
            res: dict[str, Any] = {"loadavg": os.getloadavg()}
            log(f"rep {r + 1}: raw, {args.vms} domains, {args.threads} threads")
            res["raw"] = await raw_phase(raw, conn, template, args.vms, f"r{r}", log_dir, cpu)
            log(f"  raw: create {res['raw']['create_seconds']:.2f}s, delete {res['raw']['delete_seconds']:.2f}s")
            log(f"rep {r + 1}: ours, {args.vms} VirtualMachines")
            res["ours"] = await ours_phase(api, op, conn, args.vms, "bench", f"r{r}", cpu)
            problems, offset = log_problems(op.log_path, offset)
            res["ours"]["log_problems"] = dict(problems)
            res["create_ratio"] = res["ours"]["create_seconds"] / res["raw"]["create_seconds"]
            res["delete_ratio"] = res["ours"]["delete_seconds"] / res["raw"]["delete_seconds"]
            res["loadavg_end"] = os.getloadavg()
            log(f"  create ours/raw {res['create_ratio']:.2f}x, delete ours/raw {res['delete_ratio']:.2f}x; "
                f"failed calls {res['ours']['failed_calls_create']} / {res['ours']['failed_calls_delete']}; "
                f"log problems {sum(problems.values())}")
            reps.append(res)
        result["reps"] = reps
        if args.serial_reps:
            iso_path, _markers = build_test_iso(workdir / "iso")
            iso_sha = hashlib.sha256(iso_path.read_bytes()).hexdigest()
            http = TestHTTPServer(iso_path).start()
            log(f"apply → serial: {args.serial_reps} repeats")
            result["serial"] = await serial_phase(api, op, conn, raw, "bench", log_dir, args.serial_reps,
                                                  http.url("/image"), iso_sha)
            problems, offset = log_problems(op.log_path, offset)
            result["serial"]["log_problems"] = dict(problems)
        result["loadavg_end"] = os.getloadavg()
        with contextlib.suppress(Exception):
            await api.delete(HOST_PLURAL, None, "bench")
        return result
    except BaseException:
        if op is not None:
            log(f"operator log tail:\n{op.tail()}")
        raise
    finally:
        if raw is not None:
            raw.close()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if api is not None:
            await api.close()
        if op is not None:
            op.stop()
        if http is not None:
            http.stop()
        cp.stop()
        daemon.stop()  # destroys and undefines every domain, stops QEMU, virtlogd, libvirtd
        if args.keep:
            log(f"kept {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    print(f"\n=== N={r['vms']} on one real libvirtd (QEMU/TCG); raw: {r['threads']} threads, one connection each; "
          f"LibvirtHost maxConcurrentCalls {r['max_concurrent_calls']}; {r['nproc']} CPUs ===")
    print("| rep | load | raw create s | ours create s | ratio | raw delete s | ours delete s | ratio | "
          "failed calls (create/delete) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, x in enumerate(r["reps"]):
        print(f"| {i + 1} | {x['loadavg'][0]:.1f} | {x['raw']['create_seconds']:.1f} | {x['ours']['create_seconds']:.1f} "
              f"| {x['create_ratio']:.2f} | {x['raw']['delete_seconds']:.1f} | {x['ours']['delete_seconds']:.1f} | "
              f"{x['delete_ratio']:.2f} | {x['ours']['failed_calls_create'] or 0} / {x['ours']['failed_calls_delete'] or 0} |")
    for i, x in enumerate(r["reps"]):
        print(f"rep {i + 1}: raw destroy+undefine mean {x['raw']['destroy_undefine_mean_seconds']:.3f}s; ours: "
              f"calls create {x['ours']['calls_create']}; delete {x['ours']['calls_delete']}; "
              f"log problems {x['ours']['log_problems'] or 0}")
        print(f"rep {i + 1}: CPU seconds during create: raw {x['raw']['cpu_seconds_create']}; "
              f"ours {x['ours']['cpu_seconds_create']}")
        print(f"rep {i + 1}: API requests during ours' create (every client): {x['ours'].get('requests_create')}")
    s = r.get("serial")
    if s:
        print(f"apply → serial: raw median {s['raw_median']:.2f}s {[round(v, 2) for v in s['raw_seconds']]}, ours median "
              f"{s['ours_median']:.2f}s {[round(v, 2) for v in s['ours_seconds']]} -> ratio {s['ratio']:.2f}; "
              f"log problems {s['log_problems'] or 0}")
    print(f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']}")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--operator-child":
        operator_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2, help="raw+ours create/delete pairs in this run")
    ap.add_argument("--serial-reps", type=int, default=5, help="apply → serial repeats (0: skip)")
    ap.add_argument("--threads", type=int, default=16, help="raw libvirt threads (one connection each)")
    ap.add_argument("--concurrency", type=int, default=100, help="API requests in flight for the bench client")
    ap.add_argument("--max-concurrent-calls", type=int, default=0,
                    help="set spec.maxConcurrentCalls on the LibvirtHost (default: leave the CRD default)")
    ap.add_argument("--libvirtd-cpus", default="0", help="taskset CPU list for libvirtd (as the tests: 0)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = asyncio.run(run(args))
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
