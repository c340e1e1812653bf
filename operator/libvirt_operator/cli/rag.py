"""`libvirt-operator rag ...` (the runbook knowledge base) and `libvirt-operator explain`.

Importing this module is cheap; the model and LanceDB load when a command needs them.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from typing import Any

import click

from ..adapters.rag import (
    IndexMissingError,
    KnowledgeBase,
    build_index,
    get_document,
    search_documents,
)
from ..adapters.rag.settings import RagSettings
from ..core.errors import CATALOG, ErrorCode, redact

__all__ = ["explain", "rag"]

_CODES = click.Choice([c.value for c in ErrorCode], case_sensitive=False)
_db_option = click.option(
    "--db", "db_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
    help="Index directory [default: $LIBVIRT_OPERATOR_RAG_DB or ~/.cache/libvirt-operator/rag-db].")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _settings(db_dir: pathlib.Path | None = None, rag_dir: pathlib.Path | None = None,
              base_url: str | None = None) -> RagSettings:
    return RagSettings.from_env(db_dir=db_dir, rag_dir=rag_dir, base_url=base_url)


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _hit_url(s: RagSettings, hit: Any) -> str:
    url = hit.url or s.link(hit.path)
    return f"{url}#{hit.anchor}" if hit.anchor else url


@click.group("rag")
def rag() -> None:
    """The runbook knowledge base: index rag/, search it, show a document."""


@rag.command("index")
@click.option("--rag-dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path), default=None,
              help="Markdown source [default: $LIBVIRT_OPERATOR_RAG_DIR or the repository's rag/].")
@_db_option
@_json_option
def index_cmd(rag_dir: pathlib.Path | None, db_dir: pathlib.Path | None, as_json: bool) -> None:
    """Build or update the index (incremental: unchanged documents are not re-embedded)."""
    s = _settings(db_dir, rag_dir)
    try:
        stats = build_index(s.rag_dir, s.db_dir)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        _dump(stats.as_dict())
    else:
        click.echo(str(stats))


@rag.command("search")
@click.argument("query")
@click.option("--code", "codes", type=_CODES, multiple=True,
              help="Rank runbooks covering this error code first (repeatable).")
@click.option("--limit", default=5, show_default=True, type=click.IntRange(1, 50))
@click.option("--mode", type=click.Choice(["hybrid", "vector", "fts"]), default="hybrid", show_default=True)
@click.option("--engine", type=click.Choice(["snapshot", "lancedb"]), default="snapshot", show_default=True,
              help="snapshot: the numpy query snapshot the operator uses; lancedb: the LanceDB table.")
@click.option("--base-url", default=None, help="Link prefix [default: $LIBVIRT_OPERATOR_RAG_BASE_URL].")
@_db_option
@_json_option
def search_cmd(query: str, codes: tuple[str, ...], limit: int, mode: str, engine: str, base_url: str | None,
               db_dir: pathlib.Path | None, as_json: bool) -> None:
    """Search the runbooks and guides; one result per document, best first."""
    s = _settings(db_dir, base_url=base_url)
    try:
        hits = search_documents(query, limit, [c.upper() for c in codes], db_dir=s.db_dir, mode=mode,  # type: ignore[arg-type]
                                engine=engine)  # type: ignore[arg-type]
    except IndexMissingError as err:
        raise click.ClickException(f"{err}; build it with `libvirt-operator rag index`") from err
    if as_json:
        _dump([h.as_dict() | {"url": _hit_url(s, h)} for h in hits])
        return
    if not hits:
        click.echo("no results")
    for i, h in enumerate(hits, start=1):
        codes_txt = ",".join(h.codes) or "-"
        click.echo(f"{i}. [{h.score:.3f}] {h.title}")
        click.echo(f"   {_hit_url(s, h)}  codes={codes_txt}  best chunk: {h.heading}")


@rag.command("get")
@click.argument("path")
@click.option("--rag-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
              help="Markdown source [default: $LIBVIRT_OPERATOR_RAG_DIR or the repository's rag/].")
@_json_option
def get_cmd(path: str, rag_dir: pathlib.Path | None, as_json: bool) -> None:
    """Print one document, e.g. `runbooks/storage-full.md` (a full link works too)."""
    try:
        doc = get_document(path, rag_dir)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        _dump(doc.as_dict())
        return
    click.echo(f"# {doc.title}\n# codes: {', '.join(doc.codes) or '-'}  tags: {', '.join(doc.tags) or '-'}\n")
    click.echo(doc.body, nl=False)


@click.command("explain")
@click.argument("text")
@click.option("--limit", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--base-url", default=None, help="Link prefix [default: $LIBVIRT_OPERATOR_RAG_BASE_URL].")
@_db_option
@_json_option
def explain(text: str, limit: int, base_url: str | None, db_dir: pathlib.Path | None, as_json: bool) -> None:
    """Classify a raw error message and show the runbooks for it (TEXT "-" reads stdin)."""
    if text == "-":
        text = sys.stdin.read()
    message = redact(text.strip())
    # The warning below says it once, on stderr; keep the adapter's log line out of the way.
    logging.getLogger("libvirt_operator.adapters.rag").setLevel(logging.ERROR)
    kb = KnowledgeBase(settings=_settings(db_dir, base_url=base_url), retry_after=0)
    answer = kb.explain(message, limit)
    code, links = answer.code, answer.remediation
    info = CATALOG[code]
    if not kb.healthy:
        click.echo(f"warning: knowledge base unavailable ({kb.last_error}); showing the fixed runbook link",
                   err=True)
    if as_json:
        _dump({
            "code": code.value,
            "reason": info.reason,
            "retryable": info.retryable,
            "summary": info.summary,
            "message": message,
            "section": answer.section,
            "decided_by": answer.source,
            "remediation": [r.as_dict() for r in links],
        })
        return
    click.echo(f"{code.value} ({info.reason}, {'retryable' if info.retryable else 'not retryable'})")
    click.echo(f"  {info.summary}")
    if answer.section:
        click.echo(f"  section: {answer.section}")
    click.echo("Runbooks:")
    for r in links:
        click.echo(f"  [{r.score:.3f}] {r.title}\n          {r.url}")
