"""Knowledge-base benchmark: remediation quality on the labelled error sets, and the cost of the
torch-free query path (ONNX query model + numpy snapshot) in `explain`, a lookup and the operator.

    PYTHONPATH=operator .venv/bin/python bench/rag_bench.py [--reps 5] [--explain-runs 5] [--operator] [--json out.json]

Quality, per labelled set (tests/data/error_eval_after_rules.yaml: written after the rules and
the runbooks' sections; tests/data/error_eval.yaml: the rules were written against it), on
``KnowledgeBase.explain`` — what `libvirt-operator explain` runs, cache cleared per string:
code accuracy, top-1 document (the first link's runbook), top-1 section (the first link's
section; items labelled ``section: null`` are left out). Beside it the fixed-link baseline: the
classifier's code and its fixed per-code runbook link (right on sections only where the runbook
has none to choose from).

Cost: index build (fresh, then no-op); warm ``KnowledgeBase.remediation()`` (cache cleared
before each call) and cached; `libvirt-operator explain --json` cold in a fresh process (wall
time, peak RSS = VmHWM, which modules got imported); with ``--operator``: a control plane, then
``libvirt-operator run`` with the knowledge base as a separate process: seconds from its start
to the first *ranked* link (score > 0) in an unreachable LibvirtHost's status.error, and its
RSS after 30 s idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LANCEDB_LOG", "error")

import yaml  # noqa: E402

from libvirt_operator.adapters.rag import KnowledgeBase, build_index, fallback_path  # noqa: E402
from libvirt_operator.core.classify import classify_text  # noqa: E402

SETS = ("error_eval_after_rules.yaml", "error_eval.yaml")
HEAVY = ("torch", "sentence_transformers", "transformers", "lancedb", "pyarrow")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def quality(kb: KnowledgeBase, items: list[dict[str, Any]]) -> dict[str, Any]:
    base = kb.base_url
    r = {"n": len(items), "code": 0, "doc": 0, "section": 0, "section_n": 0,
         "baseline_code": 0, "baseline_doc": 0, "baseline_section": 0, "by_source": {}}
    for item in items:
        kb.cache_clear()
        answer = kb.explain(item["text"])
        top = answer.remediation[0]
        want = f"{base}/{item.get('doc') or fallback_path(item['code'])}"
        ok_doc = top.url.split("#")[0] == want
        r["code"] += answer.code.value == item["code"]
        r["doc"] += ok_doc
        r["by_source"][answer.source] = r["by_source"].get(answer.source, 0) + 1
        fixed = classify_text(item["text"])
        fixed_doc = f"{base}/{fallback_path(fixed)}" == want
        r["baseline_code"] += fixed.value == item["code"]
        r["baseline_doc"] += fixed_doc
        if item["section"] is not None:
            r["section_n"] += 1
            r["section"] += ok_doc and top.section == item["section"]
            r["baseline_section"] += fixed_doc and item["section"] == ""
    for k in ("code", "doc", "baseline_code", "baseline_doc"):
        r[k] = round(r[k] / r["n"], 4)
    for k in ("section", "baseline_section"):
        r[k] = round(r[k] / r["section_n"], 4)
    return r


async def latency(kb: KnowledgeBase, items: list[dict[str, Any]], reps: int) -> dict[str, list[float]]:
    pairs = [(classify_text(d["text"]), d["text"]) for d in items]
    await kb.remediation(pairs[0][0], "warm up")
    warm: list[float] = []
    cached: list[float] = []
    for _ in range(reps):
        for code, text in pairs:
            kb.cache_clear()
            t = time.perf_counter()
            await kb.remediation(code, text)
            warm.append(time.perf_counter() - t)
    for code, text in pairs:
        await kb.remediation(code, text)
    for _ in range(reps):
        for code, text in pairs:
            t = time.perf_counter()
            await kb.remediation(code, text)
            cached.append(time.perf_counter() - t)
    return {"warm": warm, "cached": cached}


_EXPLAIN = """
import atexit, re, sys
def report():
    hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print(f"BENCH hwm_mib={{hwm}} heavy={{','.join(heavy) or '-'}}", file=sys.stderr)
atexit.register(report)
sys.argv = ['libvirt-operator', 'explain', {text!r}, '--json']
from libvirt_operator.cli import main
main()
"""


def explain_cold(db_dir: Path, runs: int) -> list[dict[str, Any]]:
    out = []
    text = "unable to connect to server at 'kvm-9.lab:16509': Connection refused"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "operator"), LIBVIRT_OPERATOR_RAG_DB=str(db_dir))
    for _ in range(runs):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _EXPLAIN.format(heavy=HEAVY, text=text)],
                             capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t
        m = re.search(r"BENCH hwm_mib=(\d+) heavy=(\S+)", res.stderr)
        answer = json.loads(res.stdout)
        out.append({"wall_s": round(wall, 3), "peak_rss_mib": int(m[1]) if m else None,
                    "heavy_imports": m[2] if m else "?", "section": answer["section"],
                    "top_url": answer["remediation"][0]["url"]})
    return out


def operator_phase(db_dir: Path, tmp: Path, *, knowledge_base: bool = True) -> dict[str, Any]:
    from kubernetes import client, config

    from tests.harness.controlplane import ControlPlane, ensure_binaries
    from tests.harness.kube import Kube

    tmp.mkdir(parents=True, exist_ok=True)
    with ControlPlane(tmp / "cp", bin_dir=ensure_binaries()) as cp:
        kube = Kube(cp.kubeconfig_path)
        kube.apply_crds()
        name = "bench-unreachable"
        kube.create("libvirthosts", {"metadata": {"name": name},
                                     "spec": {"uri": "qemu+tcp://127.0.0.1:1/system", "insecure": True,
                                              "probeIntervalSeconds": 5}})
        env = dict(os.environ, KUBECONFIG=str(cp.kubeconfig_path), PYTHONPATH=str(ROOT / "operator"))
        log = (tmp / "operator.log").open("wb")
        t0 = time.perf_counter()
        kb_args = ["--rag-db", str(db_dir)] if knowledge_base else ["--no-knowledge-base"]
        proc = subprocess.Popen([sys.executable, "-m", "libvirt_operator", "run", "--metrics-port", "0",
                                 "--liveness-port", "0", *kb_args, "--log-format", "json"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        first_link = first_ranked = None
        url = ""
        try:
            while time.perf_counter() - t0 < (120 if knowledge_base else 20) and first_ranked is None:
                error = ((kube.get("libvirthosts", name) or {}).get("status") or {}).get("error") or {}
                links = error.get("remediation") or []
                if links and first_link is None:
                    first_link = time.perf_counter() - t0
                if links and links[0]["score"] > 0:
                    first_ranked, url = time.perf_counter() - t0, links[0]["url"]
                time.sleep(0.05)
            time.sleep(max(0.0, 30 - (time.perf_counter() - t0)))
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024
            hwm = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        del client, config
    return {"first_link_s": round(first_link or -1, 2), "first_ranked_link_s": round(first_ranked or -1, 2),
            "first_ranked_url": url, "idle_rss_mib_after_30s": round(rss), "peak_rss_mib": round(hwm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rag-dir", type=Path, default=ROOT / "rag")
    ap.add_argument("--reps", type=int, default=5, help="passes over the eval sets per latency figure")
    ap.add_argument("--explain-runs", type=int, default=5)
    ap.add_argument("--operator", action="store_true", help="also start a control plane and the operator")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    sets = {name: yaml.safe_load((ROOT / "tests" / "data" / name).read_text()) for name in SETS}
    tmp = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    try:
        db_dir = tmp / "db"
        t = time.perf_counter()
        stats = build_index(args.rag_dir, db_dir)
        build_cold = time.perf_counter() - t
        t = time.perf_counter()
        again = build_index(args.rag_dir, db_dir)
        build_noop = time.perf_counter() - t
        assert again.embedded_chunks == 0

        kb = KnowledgeBase(db_dir)
        q = {name: quality(kb, items) for name, items in sets.items()}
        lat = asyncio.run(latency(KnowledgeBase(db_dir), [i for s in sets.values() for i in s], args.reps))
        cold = explain_cold(db_dir, args.explain_runs)
        op = None
        if args.operator:
            op = {"kb_on": operator_phase(db_dir, tmp / "on"), "kb_off": operator_phase(db_dir, tmp / "off", knowledge_base=False)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ms = {k: {p: round(pct(v, x) * 1000, 3) for p, x in (("p50", 50), ("p95", 95), ("p99", 99))} | {"n": len(v)}
          for k, v in lat.items()}
    result = {
        "documents": stats.documents, "chunks": stats.chunks,
        "build_cold_s": round(build_cold, 2), "build_embed_s": round(stats.embed_seconds, 2),
        "build_query_side_s": round(stats.query_side_seconds, 2), "build_noop_s": round(build_noop, 2),
        "quality": q, "remediation_ms": ms, "explain_cold": cold, "operator": op,
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
    }

    print(f"corpus: {stats.documents} documents, {stats.chunks} chunks (sections); index build, fresh db: "
          f"{build_cold:.1f} s (embedding {stats.embed_seconds:.1f} s, ONNX model + snapshot "
          f"{stats.query_side_seconds:.1f} s); no-op rebuild {build_noop:.2f} s\n")
    print("| set | n | code: retrieval / fixed | top-1 doc: retrieval / fixed | top-1 section: retrieval / fixed |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in q.items():
        print(f"| {name} | {r['n']} | {r['code']:.1%} / {r['baseline_code']:.1%} | {r['doc']:.1%} / "
              f"{r['baseline_doc']:.1%} | {r['section']:.1%} / {r['baseline_section']:.1%} (n={r['section_n']}) |")
    print("\n| lookup | n | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for k, v in ms.items():
        print(f"| KnowledgeBase.remediation, {k} | {v['n']} | {v['p50']} | {v['p95']} | {v['p99']} |")
    walls = sorted(c["wall_s"] for c in cold)
    print(f"\nexplain --json, cold process, {len(cold)} runs: wall {walls[0]:.2f}–{walls[-1]:.2f} s "
          f"(median {walls[len(walls) // 2]:.2f}), peak RSS {max(c['peak_rss_mib'] or 0 for c in cold)} MiB, "
          f"heavy imports: {cold[0]['heavy_imports']}, first link {cold[0]['top_url'].rsplit('/', 1)[-1]}")
    for phase, o in (op or {}).items():
        print(f"operator ({phase}): first link {o['first_link_s']} s, first ranked link {o['first_ranked_link_s']} s "
              f"after process start ({o['first_ranked_url'].rsplit('/', 1)[-1] or '-'}); RSS after 30 s "
              f"{o['idle_rss_mib_after_30s']} MiB (peak {o['peak_rss_mib']} MiB)")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
