"""structlog setup: JSON in production, readable console on a TTY; stdlib logging (kopf's) is routed
through the same processors so every line has one shape."""

from __future__ import annotations

import logging
import re
import sys
from typing import Literal

import structlog

from .errors import redact

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _kopf_object_fields, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redact_event, renderer],
    )
    handler = _CurrentStderr()
    handler.setFormatter(formatter)
    handler.addFilter(_RoutineSuccess())
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record is emitted (as logging's own last-resort
    handler does), never to stdout: `explain --json | jq` must get JSON only, and a stream swapped
    by an embedding program (click's test runner, a daemon redirecting fds) is followed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _RoutineSuccess(logging.Filter):
    """kopf logs every periodic timer run and every watch-event handler at INFO ("Timer 'probe_host'
    succeeded." every few seconds per object); at INFO level those drown what matters."""

    _ROUTINE = re.compile(r"^(Timer '[^']+'|Handler 'watch_[^']+') succeeded\.$")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not record.name.startswith("kopf."):
            return True
        return not self._ROUTINE.match(record.getMessage())


class _Redact(logging.Filter):
    """Scrub credentials (core.errors.redact) from a record before any handler sees it. On the
    `kopf.objects` logger this covers kopf's own Events too: its K8sPoster handler turns that
    logger's warnings ("Handler ... failed temporarily: <exception text>") into Events."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # structlog's event dict
            record.msg = {k: redact(v) if isinstance(v, str) else v for k, v in record.msg.items()}
        elif not getattr(record, "_redacted", False):
            record.msg, record.args = redact(record.getMessage()), None
            if record.exc_info and not record.exc_text:  # the traceback an Event or a log line shows
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record._redacted = True  # type: ignore[attr-defined]
        return True


def _redact_event(_logger: object, _name: str, event: dict) -> dict:
    """Last structlog step before rendering: no credentials in any string field (tracebacks included)."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


REDACT = _Redact()
# Routine successes are dropped on the logger itself, before the redaction of every record (about 12
# per VM in a burst: ~3 % of the event loop at 1000 VMs, mostly redaction and handler calls).
logging.getLogger("kopf.objects").addFilter(_RoutineSuccess())
logging.getLogger("kopf.objects").addFilter(REDACT)  # also without configure(): in-process operators


def _kopf_object_fields(_logger: object, _name: str, event: dict) -> dict:
    """kopf's per-object loggers carry `k8s_ref` in the record: lift it to kind/namespace/name."""
    record = event.get("_record")
    ref = getattr(record, "k8s_ref", None)
    if isinstance(ref, dict):
        event.setdefault("kind", ref.get("kind"))
        if ref.get("namespace"):
            event.setdefault("namespace", ref.get("namespace"))
        event.setdefault("name", ref.get("name"))
    return event


def get_logger(name: str = "libvirt_operator", **bound: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name).bind(**bound)
