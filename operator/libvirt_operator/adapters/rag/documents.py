"""Markdown runbooks and guides: front matter, sections, chunks and content hashes.

Pure and cheap (PyYAML only): no model, no database.

A document is a Markdown file under the rag directory with YAML front matter::

    ---
    title: "STORAGE_FULL: the storage pool has no room"
    codes: [STORAGE_FULL]
    tags: [storage]
    ---

Each ``##`` section (``###`` subsections stay inside it) becomes one chunk, or several if it is longer
than the embedding model reads (all-MiniLM-L6-v2 truncates at 256 word pieces). A chunk's text is
``title + heading path + section text``; the Symptoms section always comes first, because it
quotes the raw error texts that queries look like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CHUNKER_VERSION",
    "Chunk",
    "Document",
    "Section",
    "chunk_document",
    "GENERIC_SECTIONS",
    "estimate_word_pieces",
    "github_slug",
    "is_cause_section",
    "iter_document_paths",
    "load_documents",
    "parse_document",
]

# Bump when chunking changes: the index key of every document changes, so all are re-embedded.
CHUNKER_VERSION = "3"

# Budget for the body of one chunk, in estimated word pieces; the title and heading path add
# ~15-30 more. On our runbooks the estimate is within 0.8-1.21x of the real WordPiece count,
# so chunks stay under the model's 256.
MAX_CHUNK_PIECES = 180

_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")
_SYMPTOMS = re.compile(r"^symptoms?\b", re.IGNORECASE)
_SLUG_DROP = re.compile(r"[^\w\- ]", re.UNICODE)

# Sections every runbook may have that describe no particular cause: a search answers with the
# best *cause* section of a document and with these only when the document has no other.
GENERIC_SECTIONS = frozenset({"symptoms", "likely causes", "causes", "diagnosis", "fix", "see also",
                              "overview", "background", "related"})


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (before de-duplication): lower case, inline
    code/emphasis markers and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return _SLUG_DROP.sub("", text).replace(" ", "-")


def is_cause_section(heading: str) -> bool:
    return bool(heading) and heading.strip().lower() not in GENERIC_SECTIONS


@dataclasses.dataclass(frozen=True)
class Section:
    headings: tuple[str, ...]  # heading path below the title, e.g. ("Diagnosis", "On the host")
    text: str
    anchor: str = ""  # GitHub-style anchor of the ## heading ("" before the first one)


@dataclasses.dataclass(frozen=True)
class Document:
    path: str  # relative to the rag directory, POSIX separators: "runbooks/storage-full.md"
    title: str
    codes: tuple[str, ...]
    tags: tuple[str, ...]
    body: str  # Markdown without front matter
    sections: tuple[Section, ...]
    content_hash: str  # sha256 of the file's bytes
    url: str = ""  # a public page (upstream documentation); "" = linked under the base URL

    @property
    def is_runbook(self) -> bool:
        return self.path.startswith("runbooks/")

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "title": self.title,
            "codes": list(self.codes),
            "tags": list(self.tags),
            "content_hash": self.content_hash,
            "body": self.body,
        }


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: str  # "<path>#<n>"
    path: str
    ordinal: int
    title: str
    heading: str  # "Symptoms", "Connection refused (2/3)"
    codes: tuple[str, ...]
    tags: tuple[str, ...]
    text: str  # what is embedded and full-text indexed
    section: str = ""  # the ## heading this chunk belongs to ("" for text before any)
    anchor: str = ""  # its GitHub-style anchor: links point at <path>#<anchor>


def estimate_word_pieces(text: str) -> int:
    """Rough WordPiece count: words, digits and punctuation count separately, long words more."""
    n = 0
    for tok in _PIECE.findall(text):
        n += 1 + (len(tok) - 1) // 5 if tok.isalpha() else 1
    return n


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    return tuple(str(v).strip() for v in value if str(v).strip())


def parse_document(raw: str | bytes, path: str) -> Document:
    """Parse one Markdown file (front matter optional; the first H1 is the fallback title)."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
    text = data.decode("utf-8").replace("\r\n", "\n")
    meta: dict[str, Any] = {}
    m = _FRONT_MATTER.match(text)
    if m:
        loaded = yaml.safe_load(m.group(1))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: front matter must be a mapping")
        meta = loaded or {}
        text = text[m.end():]
    body = text.strip("\n") + "\n"
    sections, h1 = _split_sections(body)
    title = str(meta.get("title") or h1 or Path(path).stem).strip()
    return Document(
        path=path,
        title=title,
        codes=_as_tuple(meta.get("codes")),
        tags=_as_tuple(meta.get("tags")),
        body=body,
        sections=tuple(sections),
        content_hash=hashlib.sha256(data).hexdigest(),
    )


def _split_sections(body: str) -> tuple[list[Section], str | None]:
    sections: list[Section] = []
    h1: str | None = None
    path: list[tuple[int, str]] = []
    buf: list[str] = []
    in_fence = False
    seen: dict[str, int] = {}
    anchor = ""

    def slug(heading: str) -> str:  # GitHub de-duplicates anchors over all headings: x, x-1, x-2
        base = github_slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    def flush() -> None:
        txt = "\n".join(buf).strip()
        if txt:
            sections.append(Section(tuple(h for _, h in path), txt, anchor))
        buf.clear()

    for line in body.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            buf.append(line)
            continue
        hm = None if in_fence else _HEADING.match(line)
        if hm is None:
            buf.append(line)
            continue
        level, heading = len(hm.group(1)), hm.group(2).strip()
        heading_anchor = slug(heading)
        if level == 1:
            flush()
            h1 = h1 or heading
            path = []
            anchor = ""
            continue
        if level == 2:
            flush()
            path = [(2, heading)]
            anchor = heading_anchor
            continue
        # ###+ stays inside its ## section, as text.
        buf.append(line)
    flush()
    return sections, h1


def _split_long(text: str, budget: int) -> list[str]:
    """Split text on blank lines, then lines, so each part fits the budget (code fences kept)."""
    if estimate_word_pieces(text) <= budget:
        return [text]
    # Units: paragraphs outside fences; single lines inside fences (re-fenced per part).
    units: list[tuple[str, bool]] = []  # (text, in_code)
    in_fence = False
    para: list[str] = []
    for line in text.split("\n"):
        if _FENCE.match(line):
            if para:
                units.append(("\n".join(para), in_fence))
                para = []
            in_fence = not in_fence
            continue
        if in_fence:
            units.append((line, True))
        elif line.strip():
            para.append(line)
        elif para:
            units.append(("\n".join(para), False))
            para = []
    if para:
        units.append(("\n".join(para), in_fence))
    # A paragraph over budget on its own is split into its lines.
    split_units: list[tuple[str, bool]] = []
    for t, is_code in units:
        if not is_code and estimate_word_pieces(t) > budget:
            split_units.extend((ln, False) for ln in t.split("\n") if ln.strip())
        else:
            split_units.append((t, is_code))
    units = split_units

    parts: list[str] = []
    cur: list[tuple[str, bool]] = []
    size = 0

    def render(items: list[tuple[str, bool]]) -> str:
        out: list[str] = []
        code: list[str] = []
        for t, is_code in items:
            if is_code:
                code.append(t)
                continue
            if code:
                out.append("```\n" + "\n".join(code) + "\n```")
                code = []
            out.append(t)
        if code:
            out.append("```\n" + "\n".join(code) + "\n```")
        return "\n\n".join(out)

    for t, is_code in units:
        n = estimate_word_pieces(t)
        if cur and size + n > budget:
            parts.append(render(cur))
            cur, size = [], 0
        cur.append((t, is_code))
        size += n
    if cur:
        parts.append(render(cur))
    return [p for p in parts if p.strip()]


def chunk_document(doc: Document, max_pieces: int = MAX_CHUNK_PIECES) -> list[Chunk]:
    """Chunks of a document: Symptoms first, then the other sections in order."""
    ordered = sorted(
        doc.sections,
        key=lambda s: 0 if s.headings and _SYMPTOMS.match(s.headings[0]) else 1,
    )
    chunks: list[Chunk] = []
    for section in ordered:
        heading = " > ".join(section.headings) or "Overview"
        parts = _split_long(section.text, max_pieces)
        for i, part in enumerate(parts):
            label = heading if len(parts) == 1 else f"{heading} ({i + 1}/{len(parts)})"
            n = len(chunks)
            chunks.append(Chunk(
                id=f"{doc.path}#{n}",
                path=doc.path,
                ordinal=n,
                title=doc.title,
                heading=label,
                codes=doc.codes,
                tags=doc.tags,
                text=f"{doc.title}\n{label}\n{part}",
                section=section.headings[0] if section.headings else "",
                anchor=section.anchor,
            ))
    if not chunks:  # a document with a title only still gets found by title
        chunks.append(Chunk(f"{doc.path}#0", doc.path, 0, doc.title, "Overview",
                            doc.codes, doc.tags, doc.title))
    return chunks


def iter_document_paths(rag_dir: Path) -> Iterator[Path]:
    """All Markdown files under rag_dir, sorted, skipping hidden directories and README.md."""
    for p in sorted(rag_dir.rglob("*.md")):
        rel = p.relative_to(rag_dir)
        if any(part.startswith(".") for part in rel.parts) or p.name.lower() == "readme.md":
            continue
        if p.is_file():
            yield p


def load_documents(rag_dir: str | Path) -> list[Document]:
    root = Path(rag_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"rag directory not found: {root}")
    return [parse_document(p.read_bytes(), p.relative_to(root).as_posix())
            for p in iter_document_paths(root)]
