"""The runbook knowledge base: Markdown in ``rag/`` indexed into LanceDB, searched hybrid.

Importing this package is cheap: numpy/onnxruntime/tokenizers (the ``kb`` extra, for lookups)
and lancedb/pyarrow/sentence-transformers/torch (the ``rag`` extra, for building the index) are
imported on first use only, so the operator runs without them and then serves the fixed per-code
runbook links. Lookups never import torch or lancedb.

Public API::

    build_index(rag_dir=None, db_dir=None) -> IndexStats
    search_documents(query, limit=5, codes=None, *, db_dir=None, mode="hybrid") -> list[SearchHit]
    get_document(path, rag_dir=None) -> Document
    default_paths() -> (rag_dir, db_dir)
    KnowledgeBase(db_dir=None, *, base_url=None).remediation(code, message, limit=3) -> list[Remediation]
    KnowledgeBase(...).explain(text, limit=3) -> Explanation   # code (named / rule / retrieval) + links
"""

from libvirt_operator.adapters.rag.documents import Chunk, Document, Section, chunk_document, load_documents, parse_document
from libvirt_operator.adapters.rag.index import (
    Embedder,
    Index,
    IndexMissingError,
    IndexStats,
    SearchHit,
    build_index,
    get_document,
    search_documents,
)
from libvirt_operator.adapters.rag.kb import (
    Explanation,
    FixedLinks,
    KnowledgeBase,
    Remediation,
    fallback_path,
    fallback_remediation,
    normalise_message,
)
from libvirt_operator.adapters.rag.settings import DEFAULT_BASE_URL, RagSettings, default_paths

__all__ = [
    "DEFAULT_BASE_URL",
    "Chunk",
    "Document",
    "Embedder",
    "Explanation",
    "FixedLinks",
    "Index",
    "IndexMissingError",
    "IndexStats",
    "KnowledgeBase",
    "RagSettings",
    "Remediation",
    "SearchHit",
    "Section",
    "build_index",
    "chunk_document",
    "default_paths",
    "fallback_path",
    "fallback_remediation",
    "get_document",
    "load_documents",
    "normalise_message",
    "parse_document",
    "search_documents",
]
