"""Knowledge-base benchmark: retrieval quality and lookup latency on tests/data/error_eval.yaml.

    PYTHONPATH=operator .venv/bin/python bench/rag_bench.py [--reps 5] [--json out.json]

Quality: a hit is a document whose front matter lists the expected code. Top-1/top-3 for
vector-only, FTS-only and hybrid search on the raw error text (no code), plus the pipeline the
operator runs (classify the text, then hybrid search preferring the classified code).
Latency: KnowledgeBase.remediation() as a reconcile calls it: warm (model loaded, cache cleared
before every call) and cached; plus the raw search per mode, and a cold first lookup in a fresh
process (imports + model load + index open).
"""

from __future__ import annotations

import argparse
import asyncio
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
sys.path.insert(0, str(ROOT / "operator"))
os.environ.setdefault("LANCEDB_LOG", "error")

import yaml  # noqa: E402

from libvirt_operator.adapters.rag import KnowledgeBase, build_index  # noqa: E402
from libvirt_operator.adapters.rag.index import Index  # noqa: E402
from libvirt_operator.core.classify import classify_text  # noqa: E402
from libvirt_operator.core.errors import ErrorCode  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f}" if v < 0.01 else f"{v * 1000:.1f}"


def quality(index: Index, data: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    runs: dict[str, Any] = {
        "vector": lambda t: index.search(t, 3, mode="vector"),
        "fts": lambda t: index.search(t, 3, mode="fts"),
        "hybrid": lambda t: index.search(t, 3, mode="hybrid"),
        "hybrid + classified code": lambda t: index.search(t, 3, [classify_text(t)], mode="hybrid"),
    }
    for name, run in runs.items():
        t1 = t3 = 0
        for item in data:
            ok = [item["code"] in h.codes for h in run(item["text"])]
            t1 += bool(ok and ok[0])
            t3 += any(ok)
        out[name] = {"top1": t1 / len(data), "top3": t3 / len(data)}
    return out


def cold_lookup(db_dir: Path) -> float:
    code = (
        "import time; t=time.perf_counter();"
        "from libvirt_operator.adapters.rag import KnowledgeBase;"
        f"kb=KnowledgeBase({str(db_dir)!r});"
        "r=kb.remediation_sync('STORAGE_FULL', 'No space left on device');"
        "assert kb.healthy, kb.last_error; print(time.perf_counter()-t)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "operator"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(res.stdout.strip().splitlines()[-1])


async def latency(kb: KnowledgeBase, data: list[dict[str, str]], reps: int) -> dict[str, list[float]]:
    items = [(classify_text(d["text"]), d["text"]) for d in data]
    await kb.remediation(ErrorCode.STORAGE_FULL, "warm up")
    warm: list[float] = []
    cached: list[float] = []
    for _ in range(reps):
        for code, text in items:
            kb.cache_clear()
            t = time.perf_counter()
            await kb.remediation(code, text)
            warm.append(time.perf_counter() - t)
    for code, text in items:  # fill the cache
        await kb.remediation(code, text)
    for _ in range(reps):
        for code, text in items:
            t = time.perf_counter()
            await kb.remediation(code, text)
            cached.append(time.perf_counter() - t)
    return {"warm": warm, "cached": cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rag-dir", type=Path, default=ROOT / "rag")
    ap.add_argument("--eval", type=Path, default=ROOT / "tests" / "data" / "error_eval.yaml")
    ap.add_argument("--reps", type=int, default=5, help="passes over the eval set per latency figure")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    data = yaml.safe_load(args.eval.read_text())
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

        index = Index(db_dir)
        index.open()
        q = quality(index, data)
        classify_acc = sum(classify_text(d["text"]).value == d["code"] for d in data) / len(data)

        search_lat: dict[str, list[float]] = {}
        for mode in ("vector", "fts", "hybrid"):
            index.search(data[0]["text"], 3, mode=mode)  # type: ignore[arg-type]
            vals = []
            for _ in range(args.reps):
                for d in data:
                    t = time.perf_counter()
                    index.search(d["text"], 3, mode=mode)  # type: ignore[arg-type]
                    vals.append(time.perf_counter() - t)
            search_lat[mode] = vals

        kb = KnowledgeBase(db_dir)
        lat = asyncio.run(latency(kb, data, args.reps))
        cold = cold_lookup(db_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "eval_items": len(data),
        "documents": stats.documents,
        "chunks": stats.chunks,
        "build_cold_s": round(build_cold, 2),
        "build_model_load_s": round(stats.model_load_seconds, 2),
        "build_embed_s": round(stats.embed_seconds, 2),
        "build_noop_s": round(build_noop, 2),
        "classify_accuracy": round(classify_acc, 4),
        "quality": {k: {m: round(v, 4) for m, v in d.items()} for k, d in q.items()},
        "search_ms": {m: {p: round(pct(v, q) * 1000, 3) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
                      | {"n": len(v)} for m, v in search_lat.items()},
        "remediation_ms": {k: {p: round(pct(v, q) * 1000, 3) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
                           | {"n": len(v)} for k, v in lat.items()},
        "cold_first_lookup_s": round(cold, 2),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }

    print(f"eval set: {len(data)} raw errors; corpus: {stats.documents} documents, {stats.chunks} chunks")
    print(f"index build, fresh db: {build_cold:.1f} s (model load {stats.model_load_seconds:.1f} s, embedding "
          f"{stats.chunks} chunks {stats.embed_seconds:.1f} s); no-op rebuild: {build_noop:.2f} s")
    print(f"classifier accuracy: {classify_acc:.1%}\n")
    print("| retrieval | top-1 | top-3 |\n| --- | --- | --- |")
    for name, d in q.items():
        print(f"| {name} | {d['top1']:.1%} | {d['top3']:.1%} |")
    print("\n| latency (n per row) | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- |")

    def row(label: str, v: list[float]) -> None:
        print(f"| {label} ({len(v)}) | {ms(pct(v, 50))} | {ms(pct(v, 95))} | {ms(pct(v, 99))} |")

    for mode, v in search_lat.items():
        row(f"search, {mode}" + (" incl. query embedding" if mode != "fts" else ""), v)
    row("KnowledgeBase.remediation, warm, uncached", lat["warm"])
    row("KnowledgeBase.remediation, cached", lat["cached"])
    print(f"\ncold first lookup in a fresh process (imports + model + index): {cold:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
