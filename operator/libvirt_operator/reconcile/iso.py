"""ISOImage: download once into the cache, verify, upload to every target host's pool, report.

One import attempt = resolve the target hosts → download (or reuse the verified cache file) →
upload concurrently to each host still missing the volume → status. A failed attempt is retried with
exponential backoff (status.retry); after `iso_retry_limit` attempts the image is Stalled=True (and
still retried, at the capped interval, so a recovered mirror or host heals it). Permanent failures
(checksum mismatch, refused destination, 404, invalid spec) stall at once and wait for a spec change.

Limits: at most `iso_max_concurrent_imports` imports run at once (the others wait, phase Pending,
reason Queued). Before anything is downloaded each target pool's free space is read; a declared
Content-Length larger than a pool's free space fails that host with STORAGE_FULL before the body is
read, and the body is cut at the smallest of the size cap (spec.maxSize, never above the operator's
`download_max_bytes`) and the largest free space among the target pools.

Nothing is left behind by a failed import: the downloader removes its partial file unless it is
resuming it within the same call, and the cache file is removed after any failure, once every target
host has the volume, and on deletion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from ..adapters.http import DownloadPolicy, Downloader
from ..adapters.libvirt.volumes import volume_name
from ..core.api.iso import ISOImageSpec
from ..core.conditions import summarize
from ..core.errors import AppError, ErrorCode, OperationAborted
from ..core.logs import get_logger
from ..core.metrics import ISO_DOWNLOAD_SECONDS, ISO_IMPORT_SECONDS
from .runtime import Runtime
from .iso_status import KIND, StatusWriter, failed_status, host_list, ready_status
from .iso_targets import Target, resolve_targets
from .iso_limits import ImportSlots, acquire_slot, over_cap, pool_rooms, size_cap, storage_full
from .iso_upload import upload_one, reupload_vanished, watch_stop
from .iso_cache import cache_paths, remove_cache

log = get_logger(__name__)


async def _secret_value(rt: Runtime, namespace: str, ref: Any, key: str, field: str) -> bytes | None:
    if ref is None:
        return None
    data = await rt.kube.read_secret(namespace, ref.name)
    if data is None or key not in data:
        raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND,
                       f"Secret {namespace}/{ref.name} named by {field} is missing or has no key {key}",
                       {"secret": f"{namespace}/{ref.name}", "field": field})
    return data[key]


@dataclasses.dataclass
class IsoOutcome:
    status: dict[str, Any]
    error: AppError | None
    ready: bool
    aborted: bool = False
    written: dict[str, Any] = dataclasses.field(default_factory=dict)  # status as last patched

    def final_patch(self, stale: dict[str, Any]) -> dict[str, Any]:
        """The whole new status (removed keys as null): safe whatever the handler's copy says."""
        patch: dict[str, Any] = {k: None for k in {*stale, *self.written} if k not in self.status}
        patch.update(self.status)
        return patch


def _expected_checksum(spec: ISOImageSpec, status: dict[str, Any]) -> str | None:
    return spec.checksum or status.get("verifiedChecksum")


def _host_done(entry: dict[str, Any] | None, target: Target, volume: str | None) -> bool:
    return bool(entry and volume and entry.get("phase") == "Ready" and entry.get("volume") == volume
                and entry.get("pool") == target.pool)


async def reconcile_iso(namespace: str, name: str, uid: str, generation: int, spec_body: dict[str, Any],
                        status: dict[str, Any] | None, rt: Runtime,
                        should_stop: Callable[[], bool] = lambda: False,
                        hosts: Mapping[str, Mapping[str, Any]] | None = None) -> IsoOutcome:
    status = dict(status or {})
    writer = StatusWriter(rt, namespace, name, status)
    conditions = list(status.get("conditions") or [])
    started = time.monotonic()
    hosts_status: dict[str, dict[str, Any]] | None = None
    slot: ImportSlots | None = None
    try:
        try:
            spec = ISOImageSpec.model_validate(spec_body)
        except pydantic.ValidationError as verr:
            raise AppError(ErrorCode.INVALID_SPEC, f"invalid ISOImage spec: {verr.errors()[0].get('msg')}",
                           {"kind": KIND}) from verr
        if spec.checksum is None and not spec.skip_checksum_verification:
            raise AppError(ErrorCode.INVALID_SPEC, "spec.checksum is required unless skipChecksumVerification "
                           "is true", {"field": "spec.checksum"})
        targets = await resolve_targets(spec, rt, namespace, hosts)
        hosts_status = {h.get("host"): dict(h) for h in status.get("hosts") or []}
        expected = _expected_checksum(spec, status)
        vol = volume_name(namespace, name, expected) if expected else None
        usable = [t for t in targets if t.problem is None]
        todo = [t for t in usable if not _host_done(hosts_status.get(t.host), t, vol)]
        if vol is not None:
            todo += await reupload_vanished(
                [t for t in usable if t not in todo and t.spec is not None], vol, hosts_status, rt)
        for t in targets:
            if t.problem is not None:
                hosts_status[t.host] = {"host": t.host, "phase": "Pending", "pool": t.pool,
                                        "message": t.problem.message}
        first_problem = next((t.problem for t in targets if t.problem is not None), None)
        if not todo:
            if first_problem is not None:
                raise first_problem
            remove_cache(rt, uid)
            new = ready_status(status, conditions, generation, hosts_status, targets)
            return IsoOutcome(new, None, True, written=writer.current)

        # -- one of the operator's import slots (bounded concurrency), then room in every target pool --
        slot = await acquire_slot(rt, should_stop, lambda running: writer.patch({
            "phase": "Pending", "conditions": summarize(
                conditions, ready=False, reason="Queued", generation=generation, reconciling=True,
                message=f"waiting for an import slot: {running} import(s) running, the operator's limit "
                        "(--max-concurrent-imports)")}))
        final, part = cache_paths(rt, uid)
        cap, cap_source = size_cap(spec, rt)
        rooms, refused = await pool_rooms(todo, rt)
        errors: list[AppError] = []
        failed: set[str] = set()

        def refuse(t: Target, err: AppError) -> None:
            hosts_status[t.host] = {"host": t.host, "phase": "Failed", "pool": t.pool,
                                    "message": f"[{err.code.value}] {err.message}"}
            errors.append(err)
            failed.add(t.host)
            todo.remove(t)

        for t, err in refused:
            refuse(t, err)

        def check_room(size: int, *, declared: bool) -> None:
            """Hosts whose pool cannot hold size bytes fail with STORAGE_FULL; raise when none is left."""
            for t in list(todo):
                if rooms[t.host] < size:
                    refuse(t, storage_full(t, size, rooms[t.host], declared=declared))
            if not todo:
                raise errors[0]

        if not todo:
            await writer.patch({"hosts": host_list(hosts_status)})
            raise errors[0]

        # -- download (or reuse the verified cache file) --
        await writer.patch({"phase": "Downloading", "conditions": summarize(
            conditions, ready=False, reason="Importing", message=f"importing onto {len(todo)} host(s)",
            generation=generation, reconciling=True)})
        cached_ok = (final.exists() and status.get("verifiedChecksum") and
                     status.get("sizeBytes") == final.stat().st_size)
        if not cached_ok:
            ca_bundle = await _secret_value(rt, namespace, spec.source.ca_bundle_secret_ref, "ca.crt",
                                            "spec.source.caBundleSecretRef")
            auth = await _secret_value(rt, namespace, spec.source.auth_secret_ref, "authorization",
                                       "spec.source.authSecretRef")
            downloader = Downloader(DownloadPolicy.from_settings(rt.settings), ca_bundle=ca_bundle,
                                    authorization=auth.decode().strip() if auth else None)

            async def progress(done: int, total: int | None) -> None:
                await writer.progress(done, total)

            async def check_total(total: int) -> None:  # Content-Length, before the body is read
                check_room(total, declared=True)  # raises when no target has room
                if failed:  # some hosts lack room: say so while the others download
                    await writer.patch({"hosts": host_list(hosts_status)})

            room = max(rooms[t.host] for t in todo)

            def too_large(size: int, declared: bool) -> AppError:
                if cap is not None and size > cap:
                    return over_cap(spec.source.url, size, cap, cap_source, declared=declared)
                check_room(size, declared=declared)  # raises: no target pool has room for size bytes
                raise AssertionError("unreachable")

            limit = room if cap is None else min(cap, room)
            result = await downloader.download(spec.source.url, part, checksum=spec.checksum,
                                               progress=progress, should_stop=should_stop, max_bytes=limit,
                                               too_large=too_large, check_total=check_total)
            os.replace(part, final)
            ISO_DOWNLOAD_SECONDS.observe(result.seconds)
            log.info("image downloaded", bytes=result.size, seconds=round(result.seconds, 2),
                     resumedBytes=result.resumed_bytes, attempts=result.attempts)
            await writer.progress(result.size, result.size, force=True)
            await writer.patch({"sizeBytes": result.size, "verifiedChecksum": result.checksum})
            expected = result.checksum if spec.checksum is None else spec.checksum
            if volume_name(namespace, name, expected) != vol:  # unverified content changed (or first time)
                vol = volume_name(namespace, name, expected)
                todo = [t for t in usable if t.host not in failed and not _host_done(hosts_status.get(t.host), t, vol)]
                more_rooms, more_refused = await pool_rooms([t for t in todo if t.host not in rooms], rt)
                rooms.update(more_rooms)
                for t, err in more_refused:
                    refuse(t, err)
        size = final.stat().st_size
        assert vol is not None
        if todo:
            check_room(size, declared=False)

        # -- uploads --
        for t in todo:
            hosts_status[t.host] = {"host": t.host, "phase": "Uploading", "pool": t.pool, "volume": vol}
        await writer.patch({"phase": "Uploading", "hosts": host_list(hosts_status)})
        abort = threading.Event()
        watcher = asyncio.create_task(watch_stop(should_stop, abort))
        try:
            results = await asyncio.gather(*(upload_one(t, final, vol, size, rt, abort) for t in todo))
        finally:
            watcher.cancel()
        if abort.is_set() and should_stop():
            raise OperationAborted("upload stopped on request")
        for entry, err in results:
            hosts_status[entry["host"]] = entry
            if err is not None:
                errors.append(err)
        if errors:
            await writer.patch({"hosts": host_list(hosts_status)})
            raise errors[0]
        if first_problem is not None:
            raise first_problem
        remove_cache(rt, uid)
        ISO_IMPORT_SECONDS.observe(time.monotonic() - started)
        new = ready_status(writer.current, conditions, generation, hosts_status, targets)
        return IsoOutcome(new, None, True, written=writer.current)
    except OperationAborted:
        log.info("import stopped on request")
        remove_cache(rt, uid)
        return IsoOutcome(writer.current, None, False, aborted=True, written=writer.current)
    except AppError as err:
        # Nothing stays in the cache after a failed import: a 10 GiB body must not sit there until
        # the ISOImage is deleted (partial files only live between the attempts of one download).
        remove_cache(rt, uid)
        new = await failed_status(err, writer.current, conditions, generation, rt, hosts_status)
        return IsoOutcome(new, err, False, written=writer.current)
    except BaseException:
        remove_cache(rt, uid)
        raise
    finally:
        if slot is not None:
            slot.release()
