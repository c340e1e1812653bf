"""pytest fixture: the knowledge base built once per session from a copy of rag/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rag_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"rag_dir", "db_dir", "stats"}: an index built from a copy of rag/ (tests may edit the copy)."""
    from libvirt_operator.adapters.rag import build_index

    root = tmp_path_factory.mktemp("rag-index")
    rag_dir = root / "rag"
    shutil.copytree(REPO / "rag", rag_dir)
    db_dir = root / "db"
    stats = build_index(rag_dir, db_dir)
    return {"rag_dir": rag_dir, "db_dir": db_dir, "stats": stats}
