"""Uploading an ISOImage's cache file to one host's pool (abortable), and noticing volumes that
vanished from hosts that had them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters.libvirt.volumes import upload_volume, volume_info
from ..core.errors import AppError
from ..core.logs import get_logger
from ..core.metrics import ISO_UPLOAD_SECONDS
from .host import host_connection
from .runtime import Runtime
from .iso_targets import Target

log = get_logger(__name__)


async def reupload_vanished(done: list[Target], vol: str, hosts_status: dict[str, dict[str, Any]],
                    rt: Runtime) -> list[Target]:
    """Hosts whose Ready volume disappeared (or changed size) out of band: upload again."""
    missing = []
    for t in done:
        try:
            assert t.spec is not None
            info = await volume_info(await host_connection(rt, t.host, t.spec), t.pool, vol)
        except AppError as err:  # unreachable now: keep the last known state, the host reports it
            log.info("could not check the volume", host=t.host, code=err.code.value)
            continue
        if info is None or info[0] != hosts_status[t.host].get("sizeBytes"):
            log.warning("volume missing on host, uploading again", host=t.host, pool=t.pool, volume=vol)
            missing.append(t)
    return missing


async def watch_stop(should_stop: Callable[[], bool], abort: threading.Event) -> None:
    while not abort.is_set():
        if should_stop():
            abort.set()
            return
        await asyncio.sleep(0.2)


async def upload_one(t: Target, path: Path, vol: str, size: int, rt: Runtime,
                      abort: threading.Event) -> tuple[dict[str, Any], AppError | None]:
    entry: dict[str, Any] = {"host": t.host, "pool": t.pool, "volume": vol}
    started = time.monotonic()
    try:
        assert t.spec is not None
        conn = await host_connection(rt, t.host, t.spec)
        uploaded = await upload_volume(conn, t.pool, vol, path, abort=abort)
    except AppError as err:
        log.warning("upload failed", host=t.host, pool=t.pool, code=err.code.value, error=err.message)
        return {**entry, "phase": "Failed", "message": f"[{err.code.value}] {err.message}"}, err
    ISO_UPLOAD_SECONDS.labels(t.host).observe(time.monotonic() - started)
    log.info("image uploaded", host=t.host, pool=t.pool, volume=vol, bytes=uploaded.size)
    return {**entry, "phase": "Ready", "sizeBytes": uploaded.size}, None
