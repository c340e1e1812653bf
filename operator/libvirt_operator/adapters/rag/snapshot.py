"""The query side of the index as one file: every chunk's metadata, text and vector.

``build_index`` writes ``<db>/snapshot.npz`` after each LanceDB commit (atomically: a new file
renamed over the old one). Lookups read it with numpy alone — no lancedb (a 2.4 s, 130 MiB import)
on the operator's or ``explain``'s path:

* vector search: exact cosine over all rows (one matrix-vector product; at runbook scale an
  ANN index only loses recall, and a flat scan of a few thousand rows takes well under 1 ms);
* full-text search: BM25 (k1 = 1.2, b = 0.75) with LanceDB's default FTS analysis — lower case,
  ASCII folding, split on non-alphanumerics, English stop words removed, Snowball stemming.

A test checks the two engines rank alike on the labelled error set.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SNAPSHOT_FILE", "Snapshot", "analyse", "write_snapshot"]

SNAPSHOT_FILE = "snapshot.npz"
FORMAT = 2  # 2: each row carries its analysed terms (no stemming of the corpus at load time)
K1, B = 1.2, 0.75
META_FIELDS = ("id", "path", "title", "heading", "section", "anchor", "url", "codes", "tags", "text")

# tantivy's English stop words (LanceDB's FTS default).
_STOP = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split())
_TOKEN = re.compile(r"[a-z0-9]+")
_stemmer: Any = None
_stems: dict[str, str] = {}


def analyse(text: str) -> list[str]:
    """Terms of a text as the FTS index sees them."""
    global _stemmer
    if _stemmer is None:
        import snowballstemmer  # type: ignore[import-untyped]

        _stemmer = snowballstemmer.stemmer("english")
    folded = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    out = []
    for w in _TOKEN.findall(folded):
        if w in _STOP or len(w) > 40:
            continue
        stem = _stems.get(w)
        if stem is None:
            stem = _stemmer.stemWord(w)
            if len(_stems) < 100_000:  # bounded: queries carry arbitrary words
                _stems[w] = stem
        out.append(stem)
    return out


def write_snapshot(db_dir: Path, rows: Sequence[dict[str, Any]], vectors: Any, *, model: str) -> Path:
    """Write rows (META_FIELDS) and their vectors as ``db_dir/snapshot.npz``, atomically."""
    import numpy as np

    meta = {"format": FORMAT, "model": model,
            "rows": [{k: r.get(k) for k in META_FIELDS} | {"terms": " ".join(analyse(r.get("text") or ""))}
                     for r in rows]}
    target = Path(db_dir) / SNAPSHOT_FILE
    tmp = target.with_name(f".{SNAPSHOT_FILE}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, vectors=np.asarray(vectors, dtype=np.float32).reshape(len(rows), -1),
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, target)
    return target


class Snapshot:
    """Loaded snapshot: exact vector search and BM25 over the same rows. Read-only, thread-safe."""

    def __init__(self, rows: list[dict[str, Any]], vectors: Any, model: str, mtime_ns: int = 0) -> None:
        self.rows = rows
        self.vectors = vectors
        self.model = model
        self.mtime_ns = mtime_ns
        self._postings: dict[str, list[tuple[int, int]]] = {}
        lengths: list[int] = []
        for i, r in enumerate(rows):
            terms = r.pop("terms").split() if "terms" in r else analyse(r["text"] or "")
            lengths.append(len(terms))
            for term, tf in Counter(terms).items():
                self._postings.setdefault(term, []).append((i, tf))
        self._lengths = lengths
        self._avg = (sum(lengths) / len(lengths)) if lengths else 1.0
        self._codes = [frozenset(r.get("codes") or ()) for r in rows]

    @classmethod
    def load(cls, db_dir: str | Path) -> Snapshot:
        import numpy as np

        path = Path(db_dir) / SNAPSHOT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"knowledge base snapshot not found at {path} (run `libvirt-operator rag index`)")
        mtime = path.stat().st_mtime_ns
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            vectors = np.ascontiguousarray(data["vectors"], dtype=np.float32)
        if meta.get("format") != FORMAT:
            raise ValueError(f"snapshot format {meta.get('format')} unsupported (rebuild the index)")
        return cls(meta["rows"], vectors, meta.get("model", ""), mtime)

    @staticmethod
    def changed_since(db_dir: str | Path, mtime_ns: int) -> bool:
        try:
            return (Path(db_dir) / SNAPSHOT_FILE).stat().st_mtime_ns != mtime_ns
        except OSError:
            return False

    def __len__(self) -> int:
        return len(self.rows)

    def _allowed(self, codes: Iterable[str] | None) -> list[int] | None:
        if not codes:
            return None
        wanted = set(codes)
        return [i for i, c in enumerate(self._codes) if c & wanted]

    def vector_chunks(self, vector: Any, k: int, codes: Iterable[str] | None = None) -> list[dict[str, Any]]:
        import numpy as np

        if not self.rows:
            return []
        sims = self.vectors @ np.asarray(vector, dtype=np.float32)
        allowed = self._allowed(codes)
        idx = np.arange(len(self.rows)) if allowed is None else np.asarray(allowed, dtype=np.int64)
        if idx.size == 0:
            return []
        order = idx[np.argsort(-sims[idx], kind="stable")[:k]]
        return [self.rows[i] | {"_distance": float(1.0 - sims[i])} for i in order]

    def fts_chunks(self, text: str, k: int, codes: Iterable[str] | None = None) -> list[dict[str, Any]]:
        terms = set(analyse(text))
        if not terms:
            return []
        allowed = self._allowed(codes)
        allowed_set = None if allowed is None else set(allowed)
        n = len(self.rows)
        scores: dict[int, float] = {}
        for term in terms:
            postings = self._postings.get(term)
            if not postings:
                continue
            idf = math.log(1 + (n - len(postings) + 0.5) / (len(postings) + 0.5))
            for i, tf in postings:
                if allowed_set is not None and i not in allowed_set:
                    continue
                norm = K1 * (1 - B + B * self._lengths[i] / self._avg)
                scores[i] = scores.get(i, 0.0) + idf * tf * (K1 + 1) / (tf + norm)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [self.rows[i] | {"_score": s} for i, s in best]

