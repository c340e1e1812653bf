"""ISOImage import limits: the import slots (at most iso_max_concurrent_imports at once), the size
cap, and each target pool's free space, read before anything is downloaded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..adapters.http.download import safe_url
from ..adapters.libvirt.volumes import pool_space
from ..core.api.iso import ISOImageSpec
from ..core.errors import AppError, ErrorCode, OperationAborted
from ..core.quantity import format_bytes, parse_quantity
from .host import host_connection
from .runtime import Runtime
from .iso_targets import Target

SLOT_POLL_SECONDS = 0.25  # how often an import waiting for a slot looks again (and for deletion)


class ImportSlots:
    """At most `limit` imports at once, operator-wide (one event loop: a plain counter is enough)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def try_acquire(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def release(self) -> None:
        self.running -= 1


async def acquire_slot(rt: Runtime, should_stop: Callable[[], bool],
                        waiting: Callable[[int], Awaitable[None]]) -> ImportSlots:
    limit = max(1, rt.settings.iso_max_concurrent_imports)
    slots = rt.extras.get("iso_import_slots")
    if not isinstance(slots, ImportSlots) or slots.limit != limit:  # new settings: new counter
        slots = rt.extras["iso_import_slots"] = ImportSlots(limit)
    told = False
    while not slots.try_acquire():
        if should_stop():
            raise OperationAborted("stopped while waiting for an import slot")
        if not told:
            await waiting(slots.running)
            told = True
        await asyncio.sleep(SLOT_POLL_SECONDS)
    return slots


def size_cap(spec: ISOImageSpec, rt: Runtime) -> tuple[int | None, str]:
    """The largest image accepted and where that limit comes from."""
    operator_cap = rt.settings.download_max_bytes or None
    own = parse_quantity(spec.max_size) if spec.max_size else None
    if own is not None and (operator_cap is None or own <= operator_cap):
        return own, "spec.maxSize"
    return operator_cap, "the operator's --download-max-size"


def over_cap(url: str, size: int, cap: int, source: str, *, declared: bool) -> AppError:
    what = (f"the server declares {size} bytes (Content-Length)" if declared
            else f"the download was stopped at the limit ({size}+ bytes received)")
    return AppError(ErrorCode.ISO_DOWNLOAD_FAILED,
                    f"the image is larger than {format_bytes(cap)}, the limit set by {source}: {what}",
                    {"url": safe_url(url), "limit": cap, "bytes": size, "permanent": "true"})


def storage_full(t: Target, size: int, available: int, *, declared: bool) -> AppError:
    need = f"{size} bytes (Content-Length)" if declared else f"at least {size} bytes"
    return AppError(ErrorCode.STORAGE_FULL,
                    f"the image needs {need} but storage pool {t.pool} on host {t.host} has only "
                    f"{available} bytes ({available / 2**30:.1f} GiB) free",
                    {"host": t.host, "pool": t.pool, "needed": size, "available": available})


async def pool_rooms(todo: list[Target], rt: Runtime) -> tuple[dict[str, int], list[tuple[Target, AppError]]]:
    """Free bytes in each target's pool (checked before any download), and the targets that failed."""
    async def one(t: Target) -> int | AppError:
        try:
            assert t.spec is not None
            _capacity, available = await pool_space(await host_connection(rt, t.host, t.spec), t.pool)
            return available
        except AppError as err:
            if "host" in err.context:
                return err
            return AppError(err.code, f"{err.message} on host {t.host}", {**err.context, "host": t.host,
                                                                          "pool": t.pool}, cause=err.cause or err)

    answers = await asyncio.gather(*(one(t) for t in todo))
    rooms: dict[str, int] = {}
    refused: list[tuple[Target, AppError]] = []
    for t, answer in zip(todo, answers, strict=True):
        if isinstance(answer, AppError):
            refused.append((t, answer))
        else:
            rooms[t.host] = answer
    return rooms, refused
