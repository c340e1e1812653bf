"""Timestamps in status, events and annotations: RFC 3339 in UTC with whole seconds and a 'Z', the
form Kubernetes writes (metav1.Time). The one place that formats and parses them."""

from __future__ import annotations

import datetime as dt
from typing import Any

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> dt.datetime:
    """Now in UTC, whole seconds (what a written timestamp can carry)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def timestamp(value: dt.datetime | None = None) -> str:
    """``value`` (default: now) as ``2026-01-02T03:04:05Z``; a naive value is taken as UTC."""
    value = value or now()
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime(FORMAT)


def parse_time(value: Any) -> dt.datetime | None:
    """A timezone-aware datetime from a written timestamp (any RFC 3339 / ISO 8601 form: 'Z' or an
    offset, fractional seconds); a naive one is taken as UTC. None when empty or unreadable: a
    status field we cannot read counts as absent, it does not fail the reconcile."""
    if isinstance(value, dt.datetime):
        parsed = value
    elif not value:
        return None
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
