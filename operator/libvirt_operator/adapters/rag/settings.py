"""Where the knowledge base reads Markdown, keeps its index, and what its links point at.

Environment:

* ``LIBVIRT_OPERATOR_RAG_DB``: index directory (default ``~/.cache/libvirt-operator/rag-db``).
* ``LIBVIRT_OPERATOR_RAG_DIR``: Markdown source (default: the repository's ``rag/`` found
  above this package; a wheel install has none, so set it or ship the index only).
* ``LIBVIRT_OPERATOR_RAG_BASE_URL``: prefix of remediation links, ``<base>/<relative path>``.
  Air-gapped sites point it at their mirror of ``rag/``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_BASE_URL",
    "ENV_DB",
    "ENV_DIR",
    "RagSettings",
    "default_db_dir",
    "default_paths",
    "default_rag_dir",
]

ENV_DB = "LIBVIRT_OPERATOR_RAG_DB"
ENV_DIR = "LIBVIRT_OPERATOR_RAG_DIR"
ENV_BASE_URL = "LIBVIRT_OPERATOR_RAG_BASE_URL"
DEFAULT_BASE_URL = "https://github.com/libvirt-operator/libvirt-operator/blob/main/rag"
TABLE_NAME = "chunks"


def default_db_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = env.get(ENV_DB)
    return Path(value).expanduser() if value else Path("~/.cache/libvirt-operator/rag-db").expanduser()


def default_rag_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = env.get(ENV_DIR)
    if value:
        return Path(value).expanduser()
    # operator/libvirt_operator/adapters/rag/settings.py -> look for <ancestor>/rag/runbooks
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "rag"
        if (candidate / "runbooks").is_dir():
            return candidate
    return Path.cwd() / "rag"


def default_paths(env: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """(rag_dir, db_dir) from the environment and defaults."""
    return default_rag_dir(env), default_db_dir(env)


@dataclasses.dataclass(frozen=True)
class RagSettings:
    rag_dir: Path
    db_dir: Path
    base_url: str = DEFAULT_BASE_URL
    table: str = TABLE_NAME

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        rag_dir: str | Path | None = None,
        db_dir: str | Path | None = None,
        base_url: str | None = None,
    ) -> RagSettings:
        env = os.environ if env is None else env
        return cls(
            rag_dir=Path(rag_dir).expanduser() if rag_dir else default_rag_dir(env),
            db_dir=Path(db_dir).expanduser() if db_dir else default_db_dir(env),
            base_url=(base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
        )

    def link(self, relative_path: str) -> str:
        return f"{self.base_url}/{relative_path.lstrip('/')}"
