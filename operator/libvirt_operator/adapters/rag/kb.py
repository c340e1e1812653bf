"""KnowledgeBase: runbook links for a classified error, safe to call from a reconcile.

* Lazy: nothing heavy is imported or loaded until the first lookup, and then in a worker thread
  (``asyncio.to_thread``), never on the event loop. Lookups from one event loop are serialised by
  an asyncio lock, so the model loads once and a burst of failing VMs occupies one worker thread,
  not the whole default executor; a threading lock does the same for synchronous callers.
* Cached per (code, normalised message, limit): digits, UUIDs, hex ids and paths are stripped, so
  "VM web-1 on kvm-01 ..." and "VM web-2 on kvm-07 ..." share an entry.
* Never raises (except cancellation): on any failure (no index, LanceDB error, model missing, the
  rag extra not installed) it returns the fixed runbook link for the code, sets ``healthy=False``
  and ``last_error``, and retries the index only after ``retry_after`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from libvirt_operator.adapters.rag.settings import DEFAULT_BASE_URL, RagSettings
from libvirt_operator.core.classify import classify_text, explicit_code, is_generic, match_rule
from libvirt_operator.core.errors import CATALOG, ErrorCode, redact
from libvirt_operator.core.metrics import KNOWLEDGE_BASE_HEALTHY, KNOWLEDGE_BASE_LOOKUP_SECONDS

__all__ = [
    "Explanation",
    "KnowledgeBase",
    "Remediation",
    "fallback_path",
    "fallback_remediation",
    "normalise_message",
]

# stdlib logging: the operator routes it through structlog (core.logs); a bare CLI gets stderr.
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Remediation:
    title: str
    url: str  # with the section's anchor when one section answers: .../host-unreachable.md#no-route-to-host
    score: float
    codes: tuple[str, ...] = ()
    section: str = ""  # the answering section's heading ("" = the whole document)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "url": self.url, "score": self.score, "codes": list(self.codes)}

    def as_status(self) -> dict[str, Any]:
        """The shape of ``status.error.remediation[]``."""
        return {"title": self.title, "url": self.url, "score": self.score}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What ``explain`` prints: the code, how it was decided, and the ranked links."""

    code: ErrorCode
    source: str  # "named" (the text names its code), "rule", "retrieval" or "fallback"
    remediation: tuple[Remediation, ...]

    @property
    def section(self) -> str:
        return self.remediation[0].section if self.remediation else ""


def _coerce_code(code: Any) -> ErrorCode:
    try:
        return ErrorCode(getattr(code, "value", code))
    except ValueError:
        return ErrorCode.LIBVIRT_ERROR


def fallback_path(code: ErrorCode | str) -> str:
    """The runbook every code has: ``runbooks/<code in kebab case>.md``."""
    return f"runbooks/{_coerce_code(code).value.lower().replace('_', '-')}.md"


def fallback_remediation(code: ErrorCode | str, base_url: str = DEFAULT_BASE_URL) -> Remediation:
    c = _coerce_code(code)
    return Remediation(
        title=f"{c.value}: {CATALOG[c].summary}",
        url=f"{base_url.rstrip('/')}/{fallback_path(c)}",
        score=0.0,
        codes=(c.value,),
    )


_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX = re.compile(r"\b(0x)?[0-9a-f]*\d[0-9a-f]*[a-f][0-9a-f]*\b|\b[0-9a-f]*[a-f][0-9a-f]*\d[0-9a-f]*\b", re.I)
_PATH = re.compile(r"(?<![\w.])(~|\.{1,2})?/[^\s'\",;:)]*")
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


def normalise_message(message: str) -> str:
    """Cache key text: lower case, UUIDs/paths/hex ids/digits stripped, whitespace collapsed."""
    s = redact(message or "").lower()
    s = _UUID.sub(" ", s)
    s = _PATH.sub(" ", s)
    s = _HEX.sub(lambda m: m.group(0) if len(m.group(0)) < 8 else " ", s)
    s = _DIGITS.sub("", s)
    return _SPACE.sub(" ", s).strip()[:500]


_TAG = re.compile(r"\[[A-Z][A-Z0-9_]+\]")


def _vote(hits: Iterable[Any]) -> ErrorCode | None:
    """The code the top documents agree on: each document's score split among its codes."""
    votes: dict[str, float] = collections.defaultdict(float)
    for rank, h in enumerate(hits):
        codes = [c for c in h.codes if c in ErrorCode.__members__]
        for c in codes:
            votes[c] += float(h.score) / len(codes) / (1 + 0.5 * rank)
    if not votes:
        return None
    return ErrorCode(max(votes.items(), key=lambda kv: (kv[1], kv[0]))[0])


class KnowledgeBase:
    """Remediation links for errors, from the runbook index (see module docstring)."""

    def __init__(
        self,
        db_dir: str | Path | None = None,
        *,
        base_url: str | None = None,
        settings: RagSettings | None = None,
        cache_size: int = 1024,
        retry_after: float = 300.0,
        warmup_wait: float = 2.0,
        index_factory: Callable[[Path], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RagSettings.from_env(db_dir=db_dir, base_url=base_url)
        self.retry_after = retry_after
        # A reconcile that fails while the index loads (~0.5 s without torch) waits this long for
        # it, so even the first status carries ranked, section-level links.
        self.warmup_wait = warmup_wait
        self._warm_done: asyncio.Event | None = None
        self._index_factory = index_factory
        self._clock = clock
        self._index: Any = None
        self._lock = threading.Lock()  # blocking side: open/load once, one search at a time
        self._cache: collections.OrderedDict[tuple[str, str, int], tuple[Remediation, ...]] = (
            collections.OrderedDict())
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())
        self._retry_at = 0.0
        self.healthy = True  # until something fails; see .loaded for "has answered once"
        self.last_error: str | None = None
        self.loaded = False
        self._loading = False  # a warm-up is opening the index / loading the model right now
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> KnowledgeBase:
        """From the operator's core.settings.Settings (duck-typed): ``remediation_base_url`` and,
        if present, ``rag_db_dir``; the rest from the environment (see adapters.rag.settings)."""
        return cls(
            db_dir=getattr(settings, "rag_db_dir", None),
            base_url=getattr(settings, "remediation_base_url", None),
            **kwargs,
        )

    # -- public -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def fallback(self, code: ErrorCode | str) -> list[Remediation]:
        return [fallback_remediation(code, self.base_url)]

    def _without_lookup(self, code: ErrorCode | str, message: str,
                        limit: int) -> tuple[ErrorCode, Any, list[Remediation] | None]:
        """(code, cache key, answer) — the answer when it needs no search: cached, or the fallback
        while the index is in its retry pause; None when a search is due."""
        c = _coerce_code(code)
        key = self._key(c, message, limit)
        cached = self._cache_get(key)
        if cached is not None:
            return c, key, cached
        if not self._may_try():
            return c, key, self.fallback(c)
        return c, key, None

    async def remediation(self, code: ErrorCode | str, message: str, limit: int = 3) -> list[Remediation]:
        """Best runbook links for this error; never raises (the fallback link on any failure)."""
        try:
            c, key, early = self._without_lookup(code, message, limit)
            if early is not None:
                return early
            if self._loading and not self.loaded and not await self._warmed_within(self.warmup_wait):
                # Never make a reconcile wait long for the load (seconds on a busy node): answer
                # with the fixed link now, uncached, and the ranked links on a later pass.
                return self.fallback(c)
            async with self._async_lock():
                cached = self._cache_get(key)  # filled while we waited?
                if cached is not None:
                    return cached
                with KNOWLEDGE_BASE_LOOKUP_SECONDS.time():  # the lookup itself, not the lock wait
                    return await asyncio.to_thread(self._lookup, c, message, limit, key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - must never break a reconcile
            self._mark_unhealthy(exc)
            return self.fallback(code)

    def remediation_sync(self, code: ErrorCode | str, message: str, limit: int = 3) -> list[Remediation]:
        """Blocking variant for the CLI and threads; never raises."""
        try:
            c, key, early = self._without_lookup(code, message, limit)
            if early is not None:
                return early
            return self._lookup(c, message, limit, key)
        except Exception as exc:  # noqa: BLE001
            self._mark_unhealthy(exc)
            return self.fallback(code)

    async def _warmed_within(self, seconds: float) -> bool:
        done = self._warm_done
        if done is None or seconds <= 0:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(done.wait()), seconds)
        except TimeoutError:
            return False
        return self.loaded

    async def warm_up(self) -> bool:
        """Open the index and load the model in a worker thread; returns healthy."""
        self._loading = True
        self._warm_done = asyncio.Event()
        try:
            await asyncio.to_thread(self._ensure_index)
            self._mark_healthy()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._mark_unhealthy(exc)
        finally:
            self._loading = False
            self._warm_done.set()
        return self.healthy

    def search(self, query: str, limit: int = 5, codes: Iterable[Any] | None = None, **kw: Any) -> list[Any]:
        """Blocking document search (raises on failure; for the CLI and benchmarks)."""
        with self._lock:
            return list(self._ensure_index().search(query, limit, codes, **kw))

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # -- internals --------------------------------------------------------------------------

    def _async_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    @staticmethod
    def _key(code: ErrorCode, message: str, limit: int) -> tuple[str, str, int]:
        return (code.value, normalise_message(message), int(limit))

    def _cache_get(self, key: tuple[str, str, int]) -> list[Remediation] | None:
        with self._cache_lock:
            got = self._cache.get(key)
            if got is None:
                self.misses += 1
                return None
            self._cache.move_to_end(key)
            self.hits += 1
            return list(got)

    def _cache_put(self, key: tuple[str, str, int], value: list[Remediation]) -> None:
        with self._cache_lock:
            self._cache[key] = tuple(value)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _may_try(self) -> bool:
        return self.healthy or self._clock() >= self._retry_at

    def _ensure_index(self) -> Any:
        if self._index is None:
            if self._index_factory is not None:
                index = self._index_factory(self.settings.db_dir)
            else:
                from libvirt_operator.adapters.rag.index import Index

                index = Index(self.settings.db_dir, table=self.settings.table)
            index.open()
            self._index = index
            self.loaded = True
        return self._index

    def _lookup(self, code: ErrorCode, message: str, limit: int, key: tuple[str, str, int]) -> list[Remediation]:
        """Blocking: runs in a worker thread when called from remediation()."""
        try:
            rest = _TAG.sub(" ", redact(message or "")).strip()
            whole = not rest or explicit_code(rest) is not None  # only a code: no symptom to go by
            query = f"{code.value} {CATALOG[code].summary}" if whole else rest
            # A generic code says nothing about the cause: let retrieval rank every document.
            codes = [] if is_generic(code) else [code.value]
            with self._lock:
                hits = self._ensure_index().search(query, limit, codes)
            # Our runbooks first where one fits; upstream pages (public url) follow.
            hits = sorted(hits[:limit], key=lambda h: bool(h.url))
            out = [self._link(h, whole=whole) for h in hits] or self.fallback(code)
        except Exception as exc:  # noqa: BLE001
            self._mark_unhealthy(exc)
            return self.fallback(code)
        self._mark_healthy()
        self._cache_put(key, out)
        return list(out)

    def _link(self, hit: Any, *, whole: bool = False) -> Remediation:
        """A search hit as a link: to its answering section (anchor), or to the whole document
        when the query named only a code (no symptom to pick a section by)."""
        section = "" if whole else hit.section
        url = hit.url or self.settings.link(hit.path)
        if section and hit.anchor:
            url = f"{url}#{hit.anchor}"
        title = f"{hit.title} › {section}" if section else hit.title
        return Remediation(title=title, url=url, score=float(hit.score), codes=tuple(hit.codes), section=section)

    def explain(self, text: str, limit: int = 3) -> Explanation:
        """Code and links for any error text (blocking; for the CLI). Never raises.

        The code comes from the text itself when it names one (``ISO_CHECKSUM_MISMATCH``,
        ``HostUnreachable``, ``[CODE] message``), else from the classifier's rules, else from
        the best-ranked documents' codes; the classifier's generic fallback only when the index
        cannot answer."""
        message = redact(text or "").strip()
        named = explicit_code(message)
        rule = None if named else match_rule(message)
        if named is not None:
            code, source = named, "named"
        elif rule is not None:
            code, source = rule.code, "rule"
        else:
            code, source = classify_text(message), "fallback"
            try:
                with self._lock:
                    hits = [h for h in self._ensure_index().search(message, 6) if h.codes][:3]
                voted = _vote(hits)
                if voted is not None:
                    code, source = voted, "retrieval"
                self._mark_healthy()
            except Exception as exc:  # noqa: BLE001
                self._mark_unhealthy(exc)
        links = self.remediation_sync(code, message, limit)
        return Explanation(code=code, source=source, remediation=tuple(links))

    def _mark_healthy(self) -> None:
        if not self.healthy:
            log.info("knowledge base available again (db_dir=%s)", self.settings.db_dir)
        self.healthy = True
        self.last_error = None
        KNOWLEDGE_BASE_HEALTHY.set(1)

    def _mark_unhealthy(self, exc: BaseException) -> None:
        message = redact(f"{type(exc).__name__}: {exc}")[:500]
        if self.healthy or message != self.last_error:
            log.warning("knowledge base unavailable, serving fixed runbook links (db_dir=%s, "
                        "retry in %.0fs): %s", self.settings.db_dir, self.retry_after, message)
        KNOWLEDGE_BASE_HEALTHY.set(0)
        self.healthy = False
        self.last_error = message
        self._retry_at = self._clock() + self.retry_after
        self._index = None  # reopen from scratch on the next try


class FixedLinks:
    """The remediator when the knowledge base is disabled: one fixed runbook link per code."""

    healthy = True
    last_error: str | None = None

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")

    async def remediation(self, code: ErrorCode | str, message: str, limit: int = 3) -> list[Remediation]:
        return [fallback_remediation(code, self.base_url)]
