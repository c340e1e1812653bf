"""AppError → what users see: status.error, the Ready condition message, the Event text."""

from __future__ import annotations

from typing import Any, Protocol

from ..core.errors import AppError, ErrorCode, redact
from ..core.metrics import ERRORS
from ..core.timestamps import timestamp


MESSAGE_LIMIT = 4096  # error text can come from a hostile host or server: status stays small


class Remediator(Protocol):
    async def remediation(self, code: ErrorCode, message: str, limit: int = 3) -> list[Any]: ...


async def error_status(err: AppError, previous: dict[str, Any] | None, kind: str,
                       remediator: Remediator | None) -> dict[str, Any]:
    """status.error for err; `since` is kept while the same code persists."""
    ERRORS.labels(kind, err.code.value).inc()
    links: list[dict[str, Any]] = []
    if remediator is not None:
        for hit in await remediator.remediation(err.code, err.message, limit=3):
            links.append({"title": hit.title, "url": hit.url, "score": round(float(hit.score), 4)})
    since = previous.get("since") if previous and previous.get("code") == err.code.value else None
    return {
        "code": err.code.value,
        "message": redact(err.message)[:MESSAGE_LIMIT],
        "context": err.context,
        "since": since or timestamp(),
        "remediation": links,
    }


def human_message(err: AppError, status_error: dict[str, Any] | None = None) -> str:
    """One sentence for the condition message and the Event, ending with the top runbook link."""
    text = err.message.rstrip(".") + "."
    links = (status_error or {}).get("remediation") or []
    if links:
        text += f" See {links[0]['url']}"
    return redact(f"[{err.code.value}] {text}")


def retry_delay(attempt: int, base: float = 5.0, cap: float = 300.0) -> float:
    """Exponential backoff for retryable errors: 5 s, 10 s, 20 s, … capped at 5 min."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


