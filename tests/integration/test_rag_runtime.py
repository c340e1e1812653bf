"""The knowledge base's query path without torch: the ONNX export of all-MiniLM-L6-v2 run by
onnxruntime, and the numpy query snapshot instead of LanceDB.

Parity is checked against what still builds the index: sentence-transformers vectors and the
LanceDB table (vector and full-text search)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lancedb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("onnxruntime")

from libvirt_operator.adapters.rag import build_index  # noqa: E402
from libvirt_operator.adapters.rag.index import Index, default_embedder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
EVAL = [*yaml.safe_load((DATA / "error_eval.yaml").read_text()),
        *yaml.safe_load((DATA / "error_eval_after_rules.yaml").read_text())]
HEAVY = ("torch", "sentence_transformers", "transformers", "lancedb")


def _run(code: str, db: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "operator"), LIBVIRT_OPERATOR_RAG_DB=str(db), **env))


def test_onnx_vectors_match_sentence_transformers(rag_index: dict[str, Any]) -> None:
    from libvirt_operator.adapters.rag.snapshot import Snapshot

    index = Index(rag_index["db_dir"])
    snap = Snapshot.load(rag_index["db_dir"])  # every chunk with its sentence-transformers vector
    cos = (index.embedder.encode([r["text"] for r in snap.rows]) * snap.vectors).sum(axis=1)
    assert len(snap) > 150 and cos.min() > 0.9999, snap.rows[int(cos.argmin())]["id"]
    texts = [item["text"] for item in EVAL] + ["", "x" * 3000]  # empty and truncated inputs too
    cos = (index.embedder.encode(texts) * default_embedder().encode(texts)).sum(axis=1)
    assert cos.min() > 0.9999, texts[int(cos.argmin())][:80]


def test_rankings_match_sentence_transformers_and_lancedb(rag_index: dict[str, Any]) -> None:
    """Same top-5 chunks for every labelled error whichever embedder or engine answers."""
    st = default_embedder()
    snap = Index(rag_index["db_dir"])
    lance = Index(rag_index["db_dir"], engine="lancedb", embedder=snap.embedder)
    snap.open()
    lance.open()
    texts = [item["text"] for item in EVAL]
    for text, v_onnx, v_st in zip(texts, snap.embedder.encode(texts), st.encode(texts), strict=True):
        ids = [r["id"] for r in snap.vector_chunks(v_onnx, 5)]
        assert ids == [r["id"] for r in snap.vector_chunks(v_st, 5)], text[:80]
        assert ids == [r["id"] for r in lance.vector_chunks(v_onnx, 5)], text[:80]
    # Full text: our BM25 over the snapshot vs LanceDB's FTS index, same analysis; document
    # rankings agree at the top (BM25 variants differ in tie-breaking and rounding only).
    same = sum(snap.search(t, 1, mode="fts")[0].path == lance.search(t, 1, mode="fts")[0].path for t in texts)
    assert same / len(texts) >= 0.95
    same = sum(snap.search(t, 1)[0].path == lance.search(t, 1)[0].path for t in texts)
    assert same / len(texts) >= 0.95


def test_explain_loads_no_torch_and_stays_small(rag_index: dict[str, Any]) -> None:
    code = (
        "import re, sys, json\n"
        "from click.testing import CliRunner\n"
        "from libvirt_operator.cli.rag import explain\n"
        "res = CliRunner().invoke(explain, [\"unable to connect to server at 'h:16509': Connection refused\", '--json'])\n"
        "out = json.loads(res.stdout)\n"
        # VmHWM: this process's peak (ru_maxrss would carry the parent's peak across exec)
        "def peak_rss_mib(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 1024\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps({'out': out, 'heavy': heavy, 'rss_mib': peak_rss_mib()}))\n"
    )
    res = _run(code, rag_index["db_dir"])
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert got["out"]["code"] == "HOST_UNREACHABLE" and got["out"]["section"] == "Connection refused"
    assert got["out"]["remediation"][0]["score"] > 0  # ranked by the index, not the fixed link
    assert got["rss_mib"] <= 300, got["rss_mib"]


def test_export_is_cached_by_content_hash(tmp_path: Path) -> None:
    from libvirt_operator.adapters.rag.embed import export_onnx, packaged_model_path, source_model_key

    first = export_onnx()  # the session's index build exported it already: a cache hit
    assert first.name == source_model_key(packaged_model_path())
    code = ("import sys; from libvirt_operator.adapters.rag.embed import export_onnx; p = export_onnx(); "
            "print(p, 'torch' in sys.modules)")
    res = _run(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(first), "False"]  # no torch when the export exists
    # A different model (here: a changed config) gets its own export directory.
    model = tmp_path / "model"
    shutil.copytree(packaged_model_path(), model)
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert source_model_key(model) != first.name


def test_a_rebuilt_index_is_seen_without_restart(rag_index: dict[str, Any], tmp_path: Path) -> None:
    rag_dir, db_dir = tmp_path / "rag", tmp_path / "db"
    shutil.copytree(rag_index["rag_dir"], rag_dir)
    shutil.copytree(rag_index["db_dir"], db_dir)
    index = Index(db_dir, read_consistency_interval=timedelta(0))
    query = "zpool reports tank/vmstore DEGRADED with checksum errors on a vdev"
    assert "storage-full" not in index.search(query, 1, mode="fts")[0].path
    page = rag_dir / "runbooks" / "storage-full.md"
    page.write_text(page.read_text().replace(
        "## Symptoms\n", "## Symptoms\n\n```\nzpool reports tank/vmstore DEGRADED with checksum errors on a vdev\n```\n", 1))
    build_index(rag_dir, db_dir)
    assert index.search(query, 1, mode="fts")[0].path == "runbooks/storage-full.md"


def test_missing_query_model_falls_back_to_the_fixed_link(rag_index: dict[str, Any], tmp_path: Path) -> None:
    from libvirt_operator.adapters.rag import KnowledgeBase

    db_dir = tmp_path / "db"
    shutil.copytree(rag_index["db_dir"], db_dir)
    shutil.rmtree(db_dir / "model")
    kb = KnowledgeBase(db_dir)
    got = kb.remediation_sync("STORAGE_FULL", "No space left on device")
    assert got[0].score == 0.0 and got[0].url.endswith("/runbooks/storage-full.md")
    assert not kb.healthy and "query model not found" in (kb.last_error or "")
