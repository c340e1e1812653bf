"""The one timestamp format of status, events and annotations (core/timestamps.py)."""

from __future__ import annotations

import datetime as dt

from libvirt_operator.core.timestamps import now, parse_time, timestamp

UTC = dt.timezone.utc


def test_written_as_kubernetes_writes_them_utc_whole_seconds_z() -> None:
    cest = dt.timezone(dt.timedelta(hours=2))
    assert timestamp(dt.datetime(2026, 3, 1, 12, 30, 5, 999_999, tzinfo=cest)) == "2026-03-01T10:30:05Z"
    assert timestamp(dt.datetime(2026, 3, 1, 12, 30, 5)) == "2026-03-01T12:30:05Z"  # naive: UTC
    assert now().microsecond == 0 and now().tzinfo is not None


def test_read_back_in_any_rfc3339_form_or_absent() -> None:
    want = dt.datetime(2026, 3, 1, 10, 30, 5, tzinfo=UTC)
    for text in ("2026-03-01T10:30:05Z", "2026-03-01T12:30:05+02:00", "2026-03-01T10:30:05", " 2026-03-01T10:30:05Z"):
        assert parse_time(text) == want, text
    assert parse_time("2026-03-01T10:30:05.250Z") == want + dt.timedelta(milliseconds=250)
    assert parse_time(timestamp(want)) == want
    assert parse_time(want) is want
    for unreadable in (None, "", "yesterday", 0):
        assert parse_time(unreadable) is None
