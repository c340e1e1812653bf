"""VM scale: time until N VirtualMachines are Ready=True, against the floor of a bare API client.

    .venv/bin/python bench/vm_scale_bench.py --vms 100 [--vms 1000] [--hosts 10] [--json out.json]

For each N (a fresh control plane each time, so runs do not share etcd history):

1. Starts etcd + kube-apiserver (tests.harness.controlplane) in a temp dir and applies crds/.
2. Writes H libvirt test-driver host files (each sized for all N VMs, so placement never runs out)
   and starts the operator in a **separate process** (``run_blocking``, knowledge base off, JSON
   logs to a file, /metrics on a loopback port). Its RSS is read from /proc/<pid>/status.
3. Creates H LibvirtHosts and waits until all are Ready=True.
4. Creates N VirtualMachines (runStrategy Always, 1 CPU, 64Mi; even ones pinned with hostRef
   round-robin, odd ones placed by hostSelector) with a bare aiohttp client, ``--concurrency``
   requests in flight, and LISTs them every 0.5 s until all report Ready=True. A watch running
   alongside counts every write the operator makes to each VM (finalizer/annotation patches vs
   status patches) and when each VM first turned Ready.
5. Steady state: ``--steady-seconds`` with nothing changing; counts libvirt calls by operation
   (from the operator's /metrics) and VM writes (should be 0: status is patched only on change).
6. Deletes all VMs (timed until the LIST is empty: the finalizer tears the domains down), checks
   the operator's delete counter, deletes the hosts, stops the operator.
7. The floor, with no operator running: the same bare client creates N fresh VirtualMachines and
   does, per object and in sequence, the writes the operator must do for it: one merge patch
   adding the finalizer and one status merge patch carrying a Ready=True status of the size the
   operator writes ("floor (min)"). Then again with every object write the operator was seen to
   make plus the Events it posted ("floor (observed)"). Timed from the first create to the last
   write, same concurrency.

Everything runs on loopback; the temp dir is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP, VERSION = "virt.libvirt-operator.io", "v1alpha1"
FINALIZER = f"{GROUP}/finalizer"
VM_PLURAL, HOST_PLURAL = "virtualmachines", "libvirthosts"
VM_MEMORY_MIB = 64


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The operator in its own process
# --------------------------------------------------------------------------------------------

def operator_child(kubeconfig: str, metrics_port: int, log_level: str) -> None:
    """Entry point of the operator process (re-executed from this file)."""
    os.environ["KUBECONFIG"] = kubeconfig
    from libvirt_operator.cli.operator_main import OperatorOptions
    from libvirt_operator.core.settings import Settings

    options = OperatorOptions(metrics_port=metrics_port, metrics_address="127.0.0.1", liveness_port=0,
                              log_format="json", log_level=log_level, knowledge_base=False,
                              settings=Settings(knowledge_base_enabled=False, allow_test_driver=True,
                                                # the host files: <workdir>/hosts, kubeconfig: <workdir>/cp/
                                                test_driver_dirs=(str(Path(kubeconfig).parent.parent / "hosts"),)))
    run_operator(options)


def run_operator(options: Any) -> None:
    """run_blocking(options), under cProfile when VM_SCALE_BENCH_PROFILE names a file (the event
    loop's thread only: libvirt calls run in the hosts' threads)."""
    from libvirt_operator.cli.operator_main import run_blocking

    profile = os.environ.get("VM_SCALE_BENCH_PROFILE")
    if not profile:
        run_blocking(options)
        return
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(run_blocking, options)
    finally:
        prof.dump_stats(profile)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, workdir: Path, log_level: str) -> None:
        self.metrics_port = free_port()
        self.log_path = workdir / "operator.log"
        env = dict(os.environ)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env.pop(var, None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--operator-child", str(kubeconfig), str(self.metrics_port), log_level],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            preexec_fn=_die_with_parent)  # noqa: PLW1509
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the operator process exited with code {self.proc.returncode}; "
                             f"last lines of {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        fields = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024
        return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        self.check()
        with self._opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())

    def wait_metrics(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check()
            try:
                self.metrics()
                return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise BenchError(f"operator /metrics did not answer within {timeout:.0f}s ({last})\n{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"operator did not stop within {timeout:.0f}s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text -> {sample name: {sorted labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def libvirt_calls(metrics: dict[str, Any]) -> Counter[str]:
    """libvirt_operator_libvirt_calls_total summed over hosts, by operation (ok) / op:outcome."""
    out: Counter[str] = Counter()
    for labels, value in metrics.get("libvirt_operator_libvirt_calls_total", {}).items():
        d = dict(labels)
        key = d["operation"] if d.get("outcome") == "ok" else f"{d['operation']}:{d.get('outcome')}"
        out[key] += int(value)
    return out


def metric_sum(metrics: dict[str, Any], name: str, **match: str) -> float:
    return sum(v for labels, v in metrics.get(name, {}).items()
               if all(dict(labels).get(k) == val for k, val in match.items()))


# --------------------------------------------------------------------------------------------
# A bare async API client (aiohttp), used for the burst, the LIST polls, the watch and the floor
# --------------------------------------------------------------------------------------------

CONNECTIONS = 8


class Api:
    def __init__(self, server: str, ssl_ctx: ssl.SSLContext, concurrency: int) -> None:
        import aiohttp

        self.server = server
        self.sem = asyncio.Semaphore(concurrency)
        # A few keep-alive connections, as a user's client has (kubectl multiplexes one HTTP/2
        # connection): one per request in flight made every burst pay ~2.6 ms of TLS handshake CPU
        # per request on this machine, apiserver and client together. +1: the watch holds one.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=min(concurrency, CONNECTIONS) + 1), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def close(self) -> None:
        await self.session.close()

    @staticmethod
    def path(plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        p = f"/apis/{GROUP}/{VERSION}"
        if namespace:
            p += f"/namespaces/{namespace}"
        p += f"/{plural}"
        if name:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    async def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                      ok: tuple[int, ...] = (200, 201), limited: bool = True, timeout: float = 60) -> Any:
        import aiohttp

        async def go() -> Any:
            data = json.dumps(body) if body is not None else None
            headers = {"Content-Type": content_type} if body is not None else {}
            for attempt in range(10):
                async with self.session.request(method, self.server + path, data=data, headers=headers,
                                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    text = await resp.text()
                    if resp.status == 429 and attempt < 9:
                        # "storage is (re)initializing": a resource's watch cache right after its CRD
                        # is applied; the server says when to come back
                        await asyncio.sleep(float(resp.headers.get("Retry-After") or 1))
                        continue
                    if resp.status not in ok:
                        raise BenchError(f"{method} {path}: HTTP {resp.status}: {text[:300]}")
                    return json.loads(text) if text else None

        if not limited:
            return await go()
        async with self.sem:
            return await go()

    async def create(self, plural: str, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        return await self.request("POST", self.path(plural, namespace), obj)

    async def merge_patch(self, plural: str, namespace: str | None, name: str, body: dict[str, Any],
                          sub: str | None = None) -> dict[str, Any]:
        return await self.request("PATCH", self.path(plural, namespace, name, sub), body,
                                  content_type="application/merge-patch+json")

    async def delete(self, plural: str, namespace: str | None, name: str) -> None:
        await self.request("DELETE", self.path(plural, namespace, name), ok=(200, 202, 404))

    async def list(self, plural: str, namespace: str | None = None) -> dict[str, Any]:
        return await self.request("GET", self.path(plural, namespace), limited=False, timeout=120)

    async def create_namespace(self, name: str) -> None:
        await self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": name}})

    async def requests_served(self) -> Counter[str]:
        """The API server's own count of the requests it served (apiserver_request_total), by
        "VERB resource[/subresource]": what every client, the operator included, asked of it."""
        import aiohttp

        async with self.session.get(self.server + "/metrics", timeout=aiohttp.ClientTimeout(total=60)) as resp:
            samples = parse_metrics(await resp.text()).get("apiserver_request_total", {})
        out: Counter[str] = Counter()
        for labels, value in samples.items():
            d = dict(labels)
            out[f"{d.get('verb')} {d.get('resource', '')}" + (f"/{d['subresource']}" if d.get("subresource") else "")] \
                += int(value)
        return out

    async def list_events(self, namespace: str) -> list[dict[str, Any]]:
        return (await self.request("GET", f"/api/v1/namespaces/{namespace}/events", limited=False,
                                   timeout=120))["items"]


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def summary_of_not_ready(items: list[dict[str, Any]], limit: int = 8) -> str:
    reasons: Counter[str] = Counter()
    for obj in items:
        if is_ready(obj):
            continue
        st = obj.get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
        reasons[f"{st.get('printableStatus') or 'no status'} / {(ready or {}).get('reason', '-')}"] += 1
    return ", ".join(f"{k}: {v}" for k, v in reasons.most_common(limit)) or "-"


class WriteWatch:
    """Watches the VMs of a namespace and classifies every MODIFIED event by what changed."""

    def __init__(self, api: Api, namespace: str, resource_version: str) -> None:
        self.api, self.namespace, self.rv = api, namespace, resource_version
        self.last: dict[str, dict[str, Any]] = {}
        self.created_at: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self.deleted_at: dict[str, float] = {}
        self.before_ready: dict[str, Counter[str]] = defaultdict(Counter)
        self.after_ready: dict[str, Counter[str]] = defaultdict(Counter)
        self.window: Counter[str] | None = None  # counts only while set (steady-state window)
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        import aiohttp

        path = Api.path(VM_PLURAL, self.namespace) + f"?watch=1&allowWatchBookmarks=false&resourceVersion={self.rv}"
        try:
            while True:
                async with self.api.session.get(self.api.server + path,
                                                timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    if resp.status != 200:
                        raise BenchError(f"watch: HTTP {resp.status}: {(await resp.text())[:300]}")
                    async for line in resp.content:
                        if line.strip():
                            self._event(json.loads(line))
                path = (Api.path(VM_PLURAL, self.namespace) +
                        f"?watch=1&resourceVersion={self.rv}")  # the server closed it: resume
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    def _event(self, ev: dict[str, Any]) -> None:
        obj = ev.get("object") or {}
        meta = obj.get("metadata") or {}
        if ev.get("type") == "ERROR":
            self.error = BenchError(f"watch error: {obj}")
            return
        self.rv = meta.get("resourceVersion", self.rv)
        name = meta.get("name", "")
        now = time.monotonic()
        prev = self.last.get(name)
        self.last[name] = obj
        if ev["type"] == "ADDED":
            self.created_at.setdefault(name, now)
        elif ev["type"] == "DELETED":
            self.deleted_at.setdefault(name, now)
        elif ev["type"] == "MODIFIED" and prev is not None:
            pm, m = prev.get("metadata") or {}, meta
            what = []
            if pm.get("finalizers") != m.get("finalizers"):
                what.append("finalizers")
            if pm.get("annotations") != m.get("annotations"):
                what.append("annotations")
            if prev.get("status") != obj.get("status"):
                what.append("status")
            if prev.get("spec") != obj.get("spec"):
                what.append("spec")
            if pm.get("deletionTimestamp") != m.get("deletionTimestamp"):
                what.append("deletion")
            kind = "+".join(what) or "other"
            (self.after_ready if name in self.ready_at else self.before_ready)[name][kind] += 1
            if self.window is not None:
                self.window[kind] += 1
        if name not in self.ready_at and is_ready(obj):
            self.ready_at[name] = now


# --------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------

def vm_body(i: int, hosts: list[str], tag: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"runStrategy": "Always", "cpu": 1, "memory": f"{VM_MEMORY_MIB}Mi"}
    if i % 2 == 0:
        spec["hostRef"] = hosts[(i // 2) % len(hosts)]
    else:
        spec["hostSelector"] = {"matchLabels": {"bench": tag}}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine",
            "metadata": {"name": f"vm-{i:05d}", "labels": {"bench": tag}}, "spec": spec}


def ready_status(name: str, namespace: str, uid: str, host: str, variant: int = 0) -> dict[str, Any]:
    """A status shaped like the one the operator writes when a VM is Running."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cond = lambda t, r, m: {"type": t, "status": "True", "reason": r, "message": m,  # noqa: E731
                            "lastTransitionTime": now, "observedGeneration": 1}
    return {
        "conditions": [cond("Scheduled", "Scheduled", f"placed on LibvirtHost {host}"),
                       cond("Ready", "Running", f"the domain is running (write {variant + 1})")],
        "host": host, "domainName": f"{namespace}_{name}", "domainUUID": uid, "runStrategy": "Always",
        "domainType": "qemu", "volumes": [], "printableStatus": "Running",
        "observedGeneration": 1, "interfaces": [], "firstBootTime": now, "lastStartTime": now,
    }


async def create_all(api: Api, bodies: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(api.create(VM_PLURAL, b, namespace) for b in bodies)))


async def wait_all(api: Api, plural: str, namespace: str | None, n: int, timeout: float, what: str,
                   check: Any = is_ready, op: OperatorProcess | None = None, interval: float = 0.5,
                   on_poll: Any = None) -> tuple[float, int]:
    """LIST every `interval` s until `check` holds for n objects; returns (monotonic time, polls)."""
    deadline = time.monotonic() + timeout
    polls = 0
    items: list[dict[str, Any]] = []
    while True:
        if op is not None:
            op.check()
        items = (await api.list(plural, namespace))["items"]
        polls += 1
        if on_poll is not None:
            on_poll()
        good = sum(1 for o in items if check(o))
        if good >= n:
            return time.monotonic(), polls
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}: {good}/{n} "
                             f"({len(items)} listed); not ready: {summary_of_not_ready(items)}"
                             + (f"\n--- operator log tail:\n{op.tail()}" if op else ""))
        await asyncio.sleep(interval)


class CpuMeter:
    """CPU seconds (user + system, all threads) of the processes that share the machine's cores: who
    spent the time of a phase. `bench` is this process (the client of the burst, the watch, the polls)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)

    def snapshot(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        out = {"bench": time.process_time()}
        for name, pid in self.pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 2) for k in after if k in before}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] if s else float("nan")


# --------------------------------------------------------------------------------------------
# One N
# --------------------------------------------------------------------------------------------

async def operator_phase(api: Api, op: OperatorProcess, n: int, hosts: list[str], host_uris: list[str],
                         tag: str, args: argparse.Namespace, cpu: CpuMeter) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for i, (name, uri) in enumerate(zip(hosts, host_uris)):
        await api.create(HOST_PLURAL, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LibvirtHost",
                                       "metadata": {"name": name, "labels": {"bench": tag, "index": str(i)}},
                                       "spec": {"uri": uri}})
    t = time.monotonic()
    await wait_all(api, HOST_PLURAL, None, len(hosts), 60, f"{len(hosts)} LibvirtHosts Ready=True", op=op)
    log(f"{len(hosts)} hosts Ready in {time.monotonic() - t:.1f}s")
    await asyncio.sleep(1.0)
    res["rss_before_mib"] = op.rss_mib()[0]
    m0 = op.metrics()

    ns = f"scale-{tag}"
    await api.create_namespace(ns)
    rv = (await api.list(VM_PLURAL, ns))["metadata"]["resourceVersion"]
    watch = WriteWatch(api, ns, rv)
    watch.start()
    rss_peak = [res["rss_before_mib"]]
    bodies = [vm_body(i, hosts, tag) for i in range(n)]

    log(f"creating {n} VirtualMachines (concurrency {args.concurrency})")
    served0 = await api.requests_served()
    cpu0 = cpu.snapshot()
    t0 = time.monotonic()
    await create_all(api, bodies, ns)
    t_created = time.monotonic()
    log(f"  created in {t_created - t0:.2f}s; waiting for Ready=True (LIST every {args.poll_seconds:g} s)")
    timeout = args.ready_timeout or max(120.0, n * 0.6)
    t_ready, polls = await wait_all(api, VM_PLURAL, ns, n, timeout, f"{n} VirtualMachines Ready=True", op=op,
                                    interval=args.poll_seconds, on_poll=lambda: rss_peak.append(op.rss_mib()[0]))
    res.update(created_seconds=t_created - t0, ready_seconds=t_ready - t0, list_polls=polls)
    res["cpu_seconds_until_ready"] = CpuMeter.spent(cpu0, cpu.snapshot())
    # every client's requests (the bench's own LIST polls and watch included), per VM
    res["api_requests_per_vm_until_ready"] = {k: round(v / n, 2) for k, v in sorted(
        ((await api.requests_served()) - served0).items()) if v}
    log(f"  all {n} Ready=True {t_ready - t0:.2f}s after the first create")
    await asyncio.sleep(2.0)  # let trailing writes (kopf annotations, Events) land
    m1 = op.metrics()
    res["rss_all_ready_mib"] = op.rss_mib()[0]
    res["rss_peak_sampled_mib"] = max(rss_peak)
    lat = [watch.ready_at[b["metadata"]["name"]] - t0 for b in bodies if b["metadata"]["name"] in watch.ready_at]
    res["ready_latency_p50"], res["ready_latency_p90"] = pct(lat, 50), pct(lat, 90)
    res["ready_last_by_watch"] = max(lat) if lat else None

    # writes per VM as the watch saw them (until Ready, and after Ready up to now)
    def per_vm(table: dict[str, Counter[str]]) -> dict[str, float]:
        kinds: Counter[str] = Counter()
        for c in table.values():
            kinds.update(c)
        return {k: v / n for k, v in sorted(kinds.items())}

    res["writes_per_vm_until_ready"] = per_vm(watch.before_ready)
    res["writes_per_vm_after_ready"] = per_vm(watch.after_ready)
    events = await api.list_events(ns)
    res["events_per_vm"] = len(events) / n
    res["events_by_reason"] = dict(Counter(e.get("reason") for e in events).most_common())
    res["libvirt_calls_burst"] = dict(sorted((libvirt_calls(m1) - libvirt_calls(m0)).items()))
    placed = Counter()
    for obj in (await api.list(VM_PLURAL, ns))["items"]:
        if "hostSelector" in obj["spec"]:
            placed[(obj.get("status") or {}).get("host")] += 1
    res["selector_placement"] = dict(sorted(placed.items(), key=lambda kv: str(kv[0])))
    managers = Counter()
    for obj in (await api.list(VM_PLURAL, ns))["items"][:50]:
        for e in obj["metadata"].get("managedFields") or []:
            managers[f"{e['manager']}/{e.get('subresource') or 'main'}/{e['operation']}"] += 1
    res["managed_fields_sample50"] = dict(managers)

    # steady state
    log(f"  steady state: {args.steady_seconds:.0f}s with nothing changing")
    watch.window = Counter()
    m2a = op.metrics()
    await asyncio.sleep(args.steady_seconds)
    m2 = op.metrics()
    res["steady_seconds"] = args.steady_seconds
    res["steady_vm_writes"] = dict(watch.window)
    watch.window = None
    res["libvirt_calls_steady"] = dict(sorted((libvirt_calls(m2) - libvirt_calls(m2a)).items()))
    res["vm_resync_rounds_steady"] = (metric_sum(m2, "libvirt_operator_vm_resync_duration_seconds_count")
                                      - metric_sum(m2a, "libvirt_operator_vm_resync_duration_seconds_count"))
    rs, rc = (metric_sum(m2, "libvirt_operator_vm_resync_duration_seconds_sum")
              - metric_sum(m2a, "libvirt_operator_vm_resync_duration_seconds_sum"), res["vm_resync_rounds_steady"])
    res["vm_resync_mean_ms"] = 1000 * rs / rc if rc else None
    res["rss_steady_mib"], res["rss_hwm_mib"] = op.rss_mib()
    res["reconciles_burst"] = {k: metric_sum(m1, "controller_runtime_reconcile_total", controller="virtualmachine",
                                             result=k) for k in ("success", "requeue", "error")}
    await watch.stop()
    if watch.error is not None:
        log(f"  (the write-counting watch failed: {watch.error!r}; counts may be partial)")

    # deletion
    log(f"  deleting {n} VMs")
    served_del = await api.requests_served()
    t0 = time.monotonic()
    await asyncio.gather(*(api.delete(VM_PLURAL, ns, b["metadata"]["name"]) for b in bodies))
    deadline = time.monotonic() + max(120.0, n * 0.5)
    while True:
        op.check()
        items = (await api.list(VM_PLURAL, ns))["items"]
        if not items:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{len(items)} VMs still present after deletion: {summary_of_not_ready(items)}\n"
                             f"--- operator log tail:\n{op.tail()}")
        await asyncio.sleep(0.5)
    res["delete_seconds"] = time.monotonic() - t0
    res["api_requests_per_vm_deletion"] = {k: round(v / n, 2) for k, v in sorted(
        ((await api.requests_served()) - served_del).items()) if v}
    m3 = op.metrics()
    res["vm_deletes_counted"] = int(metric_sum(m3, "libvirt_operator_vm_operations_total", operation="delete")
                                    - metric_sum(m0, "libvirt_operator_vm_operations_total", operation="delete"))
    res["teardown_calls"] = (libvirt_calls(m3) - libvirt_calls(m2)).get("teardown", 0)
    log(f"  deleted in {res['delete_seconds']:.2f}s; domains torn down: {res['vm_deletes_counted']}/{n}")
    for name in hosts:
        await api.delete(HOST_PLURAL, None, name)
    deadline = time.monotonic() + 60
    while (await api.list(HOST_PLURAL))["items"]:
        if time.monotonic() > deadline:
            raise BenchError("LibvirtHosts not gone 60 s after deletion")
        await asyncio.sleep(0.5)
    return res


async def floor_phase(api: Api, n: int, hosts: list[str], tag: str, *, meta_patches: int, status_patches: int,
                      events: int, label: str, cpu: CpuMeter) -> dict[str, Any]:
    """No operator: per object, create then the given writes in sequence; same concurrency."""
    ns = f"floor-{label}-{tag}"
    await api.create_namespace(ns)
    bodies = [vm_body(i, hosts, tag) for i in range(n)]
    writes = Counter()

    async def one(i: int, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        obj = await api.create(VM_PLURAL, body, ns)
        uid = obj["metadata"]["uid"]
        await api.merge_patch(VM_PLURAL, ns, name, {"metadata": {"finalizers": [FINALIZER]}})
        writes["finalizer"] += 1
        for k in range(meta_patches - 1):  # what kopf keeps in annotations (last-handled-configuration)
            await api.merge_patch(VM_PLURAL, ns, name, {"metadata": {"annotations": {
                f"{GROUP}/last-handled-configuration": json.dumps({"spec": body["spec"], "k": k})}}})
            writes["annotations"] += 1
        host = hosts[i % len(hosts)]
        for k in range(status_patches):
            await api.merge_patch(VM_PLURAL, ns, name, {"status": ready_status(name, ns, uid, host, k)},
                                  sub="status")
            writes["status"] += 1
        for k in range(events):
            await api.request("POST", f"/api/v1/namespaces/{ns}/events", {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{name}.", "namespace": ns},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine",
                                   "name": name, "namespace": ns, "uid": uid},
                "reason": f"Bench{k}", "message": f"benchmark event {k} for {name}", "type": "Normal",
                "source": {"component": "kopf"}, "firstTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "lastTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "count": 1})
            writes["events"] += 1

    cpu0 = cpu.snapshot()
    t0 = time.monotonic()
    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    took = time.monotonic() - t0
    spent = CpuMeter.spent(cpu0, cpu.snapshot())
    # clean up: release the finalizer, delete
    await asyncio.gather(*(api.merge_patch(VM_PLURAL, ns, b["metadata"]["name"], {"metadata": {"finalizers": None}})
                           for b in bodies))
    await asyncio.gather(*(api.delete(VM_PLURAL, ns, b["metadata"]["name"]) for b in bodies))
    return {"seconds": took, "writes_per_vm": {k: v / n for k, v in writes.items()}, "cpu_seconds": spent,
            "meta_patches": meta_patches, "status_patches": status_patches, "events": events}


async def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    from tests.harness.controlplane import ControlPlane
    from tests.harness.kube import Kube
    from tests.harness.libvirt_hosts import write_test_host

    tag = f"n{n}"
    workdir = Path(tempfile.mkdtemp(prefix=f"vm-scale-bench-{tag}-", dir=args.workdir))
    result: dict[str, Any] = {"vms": n, "hosts": args.hosts, "concurrency": args.concurrency, "workdir": str(workdir)}
    cp = ControlPlane(workdir / "cp")
    op: OperatorProcess | None = None
    api: Api | None = None
    try:
        log(f"N={n}: starting the control plane in {workdir}")
        cp.start()
        Kube(cp.kubeconfig_path).apply_crds()
        api = Api(cp.server_url, cp.ssl_context(), args.concurrency)
        hosts = [f"bench-{tag}-h{i}" for i in range(args.hosts)]
        uris = [write_test_host(workdir / "hosts" / f"{h}.xml", name=h, cpus=n + 8,
                                memory_mib=n * VM_MEMORY_MIB + 1024) for h in hosts]
        if args.profile:
            os.environ["VM_SCALE_BENCH_PROFILE"] = f"{args.profile}.{n}"
        op = OperatorProcess(cp.kubeconfig_path, workdir, args.log_level)
        op.wait_metrics()
        cpu = CpuMeter({"etcd": cp._etcd.pid, "kube-apiserver": cp._apiserver.pid, "operator": op.proc.pid})
        result["operator"] = await operator_phase(api, op, n, hosts, uris, tag, args, cpu)
        op.stop()
        result["operator_log"] = str(op.log_path)
        op = None

        opr = result["operator"]
        if args.skip_floor:
            return result
        until = opr["writes_per_vm_until_ready"]
        after = opr["writes_per_vm_after_ready"]
        meta_obs = round(sum(v for k, v in {**until}.items() if "status" not in k and k != "other")
                         + sum(v for k, v in after.items() if "status" not in k and k != "other"))
        status_obs = round(sum(v for k, v in until.items() if "status" in k))
        ev_obs = round(opr["events_per_vm"])
        log("floor (min): create + finalizer patch + 1 status patch per VM, no operator")
        result["floor_min"] = await floor_phase(api, n, hosts, tag, meta_patches=1, status_patches=1, events=0,
                                                label="min", cpu=cpu)
        log(f"  {result['floor_min']['seconds']:.2f}s")
        log(f"floor (observed): create + {max(1, meta_obs)} metadata patch(es) + {max(1, status_obs)} status "
            f"patch(es) + {ev_obs} Event(s) per VM")
        result["floor_observed"] = await floor_phase(api, n, hosts, tag, meta_patches=max(1, meta_obs),
                                                     status_patches=max(1, status_obs), events=ev_obs,
                                                     label="obs", cpu=cpu)
        log(f"  {result['floor_observed']['seconds']:.2f}s")
        result["ratio_min"] = opr["ready_seconds"] / result["floor_min"]["seconds"]
        result["ratio_observed"] = opr["ready_seconds"] / result["floor_observed"]["seconds"]
        return result
    except BaseException:
        if op is not None:
            log(f"operator log tail:\n{op.tail()}")
        raise
    finally:
        if api is not None:
            await api.close()
        if op is not None:
            op.stop()
        cp.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    o = r["operator"]
    if "floor_min" not in r:
        r = {**r, "floor_min": {"seconds": float("nan")}, "floor_observed": {"seconds": float("nan"), "writes_per_vm": {}},
             "ratio_min": float("nan"), "ratio_observed": float("nan")}
    print(f"\n=== N={r['vms']} VMs on {r['hosts']} test-driver hosts, client concurrency {r['concurrency']} ===")
    print(f"operator: created in {o['created_seconds']:.2f}s, all Ready=True after {o['ready_seconds']:.2f}s "
          f"(LIST poll; watch: last {o['ready_last_by_watch']:.2f}s, p50 {o['ready_latency_p50']:.2f}s, "
          f"p90 {o['ready_latency_p90']:.2f}s)")
    fm, fo = r["floor_min"], r["floor_observed"]
    print(f"floor (min, create+finalizer+status = 3 writes/VM): {fm['seconds']:.2f}s  -> ratio {r['ratio_min']:.1f}x")
    print(f"floor (observed writes/VM {fo['writes_per_vm']}): {fo['seconds']:.2f}s  -> ratio {r['ratio_observed']:.1f}x")
    print(f"CPU seconds until all Ready: {o.get('cpu_seconds_until_ready')}; floor (min): "
          f"{fm.get('cpu_seconds')}; floor (observed): {fo.get('cpu_seconds')}")
    print(f"operator writes per VM until Ready: {o['writes_per_vm_until_ready']}; after Ready: "
          f"{o['writes_per_vm_after_ready']}; Events/VM {o['events_per_vm']:.2f} {o['events_by_reason']}")
    print(f"API server requests per VM until Ready (all clients): {o.get('api_requests_per_vm_until_ready')}")
    print(f"API server requests per VM during deletion: {o.get('api_requests_per_vm_deletion')}")
    print(f"managedFields (first 50 VMs): {o['managed_fields_sample50']}")
    print(f"libvirt calls during the burst: {o['libvirt_calls_burst']}")
    print(f"steady state {o['steady_seconds']:.0f}s: libvirt calls {o['libvirt_calls_steady']}, "
          f"resync rounds {o['vm_resync_rounds_steady']:.0f} (mean {o['vm_resync_mean_ms'] or 0:.1f} ms), "
          f"VM writes {o['steady_vm_writes'] or 0}")
    print(f"hostSelector placement: {o['selector_placement']}")
    print(f"reconciles (burst): {o['reconciles_burst']}")
    print(f"operator RSS (separate process): before VMs {o['rss_before_mib']:.0f} MiB, all Ready "
          f"{o['rss_all_ready_mib']:.0f} MiB, after steady {o['rss_steady_mib']:.0f} MiB, peak (VmHWM) "
          f"{o['rss_hwm_mib']:.0f} MiB")
    print(f"deletion: all gone after {o['delete_seconds']:.2f}s; domains torn down {o['vm_deletes_counted']}/{r['vms']} "
          f"(teardown calls {o['teardown_calls']})")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--operator-child":
        operator_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, action="append", help="number of VMs (repeatable); default 100")
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=100,
                    help="requests in flight for the bench client (kubernetes_asyncio's pool in the operator is 100)")
    ap.add_argument("--poll-seconds", type=float, default=0.5,
                    help="LIST interval while waiting for Ready (each LIST of N VMs costs the shared cores)")
    ap.add_argument("--steady-seconds", type=float, default=25.0)
    ap.add_argument("--ready-timeout", type=float, default=0.0, help="default max(120, 0.6*N) s")
    ap.add_argument("--log-level", default="INFO", help="the operator's log level")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--skip-floor", action="store_true", help="only the operator run")
    ap.add_argument("--profile", default=None,
                    help="cProfile the operator's event-loop thread into PATH.<N> (slows it down)")
    args = ap.parse_args()
    results = []
    for n in args.vms or [100]:
        r = asyncio.run(run_one(n, args))
        report(r)
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
