"""Operator start-up: start() → first reconcile, with the knowledge base enabled vs disabled.

    .venv/bin/python bench/startup_bench.py [--repeats 2] [--json out.json]

Starts a control plane (tests.harness.controlplane) in a temp dir, applies crds/ and builds the
knowledge-base index from the repository's rag/ into a temp directory (timed). Then, for each
phase, in a **fresh Python process** (so every phase pays its own imports, like a new pod):

1. creates two LibvirtHosts: one on a libvirt test-driver host file (reachable) and one on
   ``qemu+tcp://127.0.0.1:1/system`` with ``insecure: true`` (nothing listens: unreachable);
2. starts ``InProcessOperator(kubeconfig, settings=Settings(knowledge_base_enabled=..., rag_db_dir=<db>))``
   and measures from the ``start()`` call:
     - ``start()`` returning (kopf's ready flag: login, start-up handlers),
     - the reachable host reporting Ready=True (the first successful reconcile),
     - the unreachable host reporting ``status.error`` at all, and ``status.error.remediation``
       non-empty (the first remediation lookup served),
     - (KB enabled) the knowledge base finishing its warm-up (index open + model loaded);
   and the worst event-loop lag seen by a 20 ms heartbeat on the operator's loop from ``start()``
   returning until the end of the phase (a blocked loop shows up here);
3. deletes both hosts and stops the operator.

Hosts are polled with GETs every 50 ms. Phases alternate (disabled, enabled, disabled, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LANCEDB_LOG", "error")

HOST = "libvirthosts"
UNREACHABLE_URI = "qemu+tcp://127.0.0.1:1/system"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# One phase, in its own process
# --------------------------------------------------------------------------------------------

def phase_child(kubeconfig: str, kb: bool, db_dir: str, host_uri: str, tag: str, timeout: float,
                remediation_timeout: float) -> dict[str, Any]:
    t_import = time.perf_counter()
    from libvirt_operator.core.settings import Settings
    from tests.harness.kube import Kube, condition
    from tests.harness.operator import InProcessOperator
    import_seconds = time.perf_counter() - t_import

    kube = Kube(kubeconfig)
    good, bad = f"good-{tag}", f"unreachable-{tag}"
    kube.create(HOST, {"metadata": {"name": good}, "spec": {"uri": host_uri}})
    kube.create(HOST, {"metadata": {"name": bad}, "spec": {"uri": UNREACHABLE_URI, "insecure": True}})

    try:
        settings = Settings(knowledge_base_enabled=kb, rag_db_dir=db_dir)
    except TypeError:  # an older Settings without rag_db_dir
        os.environ["LIBVIRT_OPERATOR_RAG_DB"] = db_dir
        settings = Settings(knowledge_base_enabled=kb)
    if hasattr(settings, "allow_test_driver"):  # test:// hosts need the flag since it exists
        settings = dataclasses.replace(settings, allow_test_driver=True,
                                       test_driver_dirs=(str(Path(host_uri[len("test://"):]).parent),))
    op = InProcessOperator(Path(kubeconfig), settings=settings)
    res: dict[str, Any] = {"kb": kb, "import_seconds": import_seconds}
    lag = {"max": 0.0, "at": 0.0, "stop": False}

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        while not lag["stop"]:
            t = loop.time()
            await asyncio.sleep(0.02)
            late = loop.time() - t - 0.02
            if late > lag["max"]:
                lag["max"], lag["at"] = late, time.monotonic() - t0

    t0 = time.monotonic()
    op.start(timeout=timeout)
    res["start_returned"] = time.monotonic() - t0
    assert op._loop is not None
    hb = asyncio.run_coroutine_threadsafe(heartbeat(), op._loop)
    try:
        deadline = t0 + timeout
        marks: dict[str, float] = {}
        want = {"good_ready", "bad_error"} | ({"bad_remediation", "kb_loaded"} if kb else set())
        while True:
            op.check()
            now = time.monotonic() - t0
            g, b = kube.get(HOST, good) or {}, kube.get(HOST, bad) or {}
            if "good_ready" not in marks and (condition(g, "Ready") or {}).get("status") == "True":
                marks["good_ready"] = now
            err = (b.get("status") or {}).get("error") or {}
            if "bad_error" not in marks and err:
                marks["bad_error"] = now
                res["bad_error_code"] = err.get("code")
            if "bad_remediation" not in marks and err.get("remediation"):
                marks["bad_remediation"] = now
                res["remediation_first"] = err["remediation"][0]
            rt = None
            try:
                rt = op.runtime
            except Exception:  # noqa: BLE001 - not there yet
                pass
            kbobj = getattr(rt, "remediator", None)
            if "kb_loaded" not in marks and kbobj is not None and getattr(kbobj, "loaded", False):
                marks["kb_loaded"] = now
            if want <= marks.keys():
                break
            if not kb and {"good_ready", "bad_error"} <= marks.keys() and now > marks["bad_error"] + remediation_timeout:
                break  # disabled: see whether any link shows up, then stop waiting
            if time.monotonic() > deadline:
                missing = sorted(want - marks.keys())
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {missing}; got {marks}; "
                                   f"good host status: {(g.get('status') or {}).get('conditions')}; "
                                   f"unreachable host error: {err}")
            time.sleep(0.05)
        res.update(marks)
        b = kube.get(HOST, bad) or {}
        res["bad_remediation_final"] = ((b.get("status") or {}).get("error") or {}).get("remediation")
    finally:
        lag["stop"] = True
        try:
            hb.result(2)
        except Exception:  # noqa: BLE001
            pass
        res["max_loop_lag"] = lag["max"]
        res["max_loop_lag_at"] = lag["at"]
        for name in (good, bad):
            kube.delete(HOST, name)
        try:
            kube.wait_for(lambda: kube.get(HOST, good) is None and kube.get(HOST, bad) is None,
                          timeout=30, what="hosts deleted")
        finally:
            op.stop()
    return res


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--phase-child":
        kubeconfig, kb, db, uri, tag, timeout, rtimeout = sys.argv[2:9]
        res = phase_child(kubeconfig, kb == "1", db, uri, tag, float(timeout), float(rtimeout))
        print("RESULT " + json.dumps(res), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="phases per setting (alternating)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per phase")
    ap.add_argument("--remediation-wait", type=float, default=10.0,
                    help="KB disabled: how long to wait for a link after the error appears")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tests.harness.controlplane import ControlPlane
    from tests.harness.kube import Kube
    from tests.harness.libvirt_hosts import write_test_host

    workdir = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    cp = ControlPlane(workdir / "cp")
    out: dict[str, Any] = {"phases": []}
    try:
        log(f"starting the control plane in {workdir}")
        cp.start()
        Kube(cp.kubeconfig_path).apply_crds()
        db = workdir / "rag-db"
        log("building the knowledge-base index from rag/")
        t = time.perf_counter()
        from libvirt_operator.adapters.rag import build_index
        stats = build_index(rag_dir=ROOT / "rag", db_dir=db)
        out["index_build_seconds"] = time.perf_counter() - t
        out["index"] = str(stats)
        log(f"  {out['index_build_seconds']:.1f}s: {stats}")
        order = [kb for _ in range(args.repeats) for kb in (False, True)]
        for i, kb in enumerate(order):
            uri = write_test_host(workdir / "hosts" / f"h{i}.xml", name=f"h{i}", cpus=4, memory_mib=4096)
            log(f"phase {i + 1}/{len(order)}: knowledge base {'enabled' if kb else 'disabled'} (fresh process)")
            proc = subprocess.run(
                [sys.executable, __file__, "--phase-child", str(cp.kubeconfig_path), "1" if kb else "0", str(db),
                 uri, f"p{i}", str(args.timeout), str(args.remediation_wait)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout + 120, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"phase {i + 1} failed (exit {proc.returncode}); stderr tail:\n"
                                 + "\n".join(proc.stderr.splitlines()[-30:]))
            res = json.loads(line[len("RESULT "):])
            out["phases"].append(res)
            log("  " + ", ".join(f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                                 if k not in ("remediation_first", "bad_remediation_final")))
    finally:
        cp.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def agg(kb: bool, key: str) -> str:
        vals = [p[key] for p in out["phases"] if p["kb"] == kb and isinstance(p.get(key), (int, float))]
        if not vals:
            return "never"
        return f"{statistics.median(vals):.2f}s" + (f" ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else "")

    print(f"\nindex build (rag/ → temp db, model load included): {out['index_build_seconds']:.1f}s")
    print(f"{'measured from InProcessOperator.start()':48} {'KB disabled':>20} {'KB enabled':>20}")
    for key, label in (("import_seconds", "imports before start (not in the times below)"),
                       ("start_returned", "start() returned (kopf ready)"),
                       ("good_ready", "reachable host Ready=True"),
                       ("bad_error", "unreachable host: status.error set"),
                       ("bad_remediation", "unreachable host: remediation non-empty"),
                       ("kb_loaded", "knowledge base warm-up done"),
                       ("max_loop_lag", "worst event-loop lag (20 ms heartbeat)"),
                       ("max_loop_lag_at", "... which happened at")):
        print(f"{label:48} {agg(False, key):>20} {agg(True, key):>20}")
    for p in out["phases"]:
        if p["kb"] and p.get("remediation_first"):
            print(f"first remediation link (KB enabled): {p['remediation_first']}")
            break
    off = [p.get("bad_remediation_final") for p in out["phases"] if not p["kb"]]
    print(f"remediation with the KB disabled, {args.remediation_wait:.0f}s after the error: {off}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
