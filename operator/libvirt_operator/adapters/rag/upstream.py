"""Upstream knowledge: libvirt's own documentation, as Debian's ``libvirt-doc`` installs it.

At index-build time, pages of libvirt.org that explain what our errors are about (URIs, remote
access, TLS certificates, authentication, storage pools, firewalls, the QEMU driver, debug logs)
are read from the installed package — never copied into the repository — and indexed like our
Markdown: one ``<h2>`` section per chunk, each linked to its public page and anchor
(``https://libvirt.org/uri.html#configuring-uri-aliases``). They carry no error codes, so they
never decide a code and never take a runbook's place: links list runbooks first.

Environment: ``LIBVIRT_OPERATOR_UPSTREAM_DOCS`` = the html directory (default
``/usr/share/doc/libvirt-doc/html`` when it exists), or ``none`` to leave upstream pages out.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path

from libvirt_operator.adapters.rag.documents import Document, Section

__all__ = ["DEFAULT_UPSTREAM_DIR", "PAGES", "PUBLIC_BASE", "load_upstream_documents", "upstream_dir"]

ENV_UPSTREAM = "LIBVIRT_OPERATOR_UPSTREAM_DOCS"
DEFAULT_UPSTREAM_DIR = Path("/usr/share/doc/libvirt-doc/html")
PUBLIC_BASE = "https://libvirt.org"
PAGES = (
    "uri.html", "remote.html", "auth.html", "aclpolkit.html", "storage.html", "firewall.html",
    "drvqemu.html", "kbase/tlscerts.html", "kbase/debuglogs.html", "kbase/qemu-passthrough-security.html",
    "kbase/secureusage.html", "kbase/backing_chains.html",
)
_SKIP = {"nav", "script", "style", "header", "footer", "head"}
_BLOCK = {"p", "li", "pre", "br", "tr", "h3", "h4", "dt", "dd", "div", "table"}


class _Sections(HTMLParser):
    """Splits a docutils page into (heading, anchor, text) at each <h2>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.sections: list[tuple[str, str, list[str]]] = []
        self._skip = 0
        self._ids: list[str] = []
        self._in: str | None = None  # "h1" / "h2" while reading a heading
        self._heading: list[str] = []
        self._pre = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        if tag == "section":
            self._ids.append(dict(attrs).get("id") or "")
        if tag in ("h1", "h2") and not self._skip:
            self._in, self._heading = tag, []
        if tag == "pre":
            self._pre = True
        if tag in _BLOCK and self.sections:
            self.sections[-1][2].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self._skip:
            self._skip -= 1
        if tag == "section" and self._ids:
            self._ids.pop()
        if tag == "pre":
            self._pre = False
        if tag == self._in:
            text = " ".join("".join(self._heading).split())
            if tag == "h1":
                self.title = self.title or text
            else:
                self.sections.append((text, self._ids[-1] if self._ids else "", []))
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in:
            self._heading.append(data)
        elif self.sections:
            self.sections[-1][2].append(data if self._pre else re.sub(r"\s+", " ", data))


def upstream_dir(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    value = env.get(ENV_UPSTREAM, "")
    if value.lower() in ("none", "off", "0"):
        return None
    path = Path(value) if value else DEFAULT_UPSTREAM_DIR
    return path if path.is_dir() else None


def load_upstream_documents(root: Path | None = None, pages: tuple[str, ...] = PAGES) -> list[Document]:
    """The curated pages found under root (default: upstream_dir()), as Documents with a public url."""
    root = root if root is not None else upstream_dir()
    if root is None:
        return []
    docs = []
    for page in pages:
        path = root / page
        if not path.is_file():
            continue
        raw = path.read_bytes()
        parser = _Sections()
        parser.feed(raw.decode("utf-8", errors="replace"))
        sections = []
        for heading, anchor, parts in parser.sections:
            text = re.sub(r"\n\s*\n+", "\n\n", html.unescape("".join(parts))).strip()
            if text:
                sections.append(Section((heading,), text, anchor))
        title = f"libvirt: {parser.title or page}"
        docs.append(Document(
            path=f"upstream/libvirt/{page}", title=title, codes=(), tags=("upstream", "libvirt"),
            body="", sections=tuple(sections), content_hash=hashlib.sha256(raw).hexdigest(),
            url=f"{PUBLIC_BASE}/{page}"))
    return docs
