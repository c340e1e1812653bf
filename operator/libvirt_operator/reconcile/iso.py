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
import contextlib
import dataclasses
import datetime as dt
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pydantic

from ..adapters.http import DownloadPolicy, Downloader
from ..adapters.http.download import safe_url
from ..adapters.libvirt.volumes import (
    delete_volume, is_volume_of, pool_space, upload_volume, volume_info, volume_name,
)
from ..core.api.host import LibvirtHostSpec
from ..core.api.iso import ISOImageSpec
from ..core.conditions import READY, is_true, summarize
from ..core.errors import AppError, ErrorCode, OperationAborted
from ..core.labels import labels_match
from ..core.logs import get_logger
from ..core.metrics import ISO_DOWNLOAD_SECONDS, ISO_FAILURES, ISO_IMPORT_SECONDS, ISO_UPLOAD_SECONDS
from ..core.quantity import format_bytes, parse_quantity
from ..core.timestamps import parse_time, timestamp
from .failures import error_status, human_message, retry_delay
from .host import host_connection
from . import plan
from .runtime import Runtime
from .tenancy import namespace_labels_of
from .status import merge_patch

log = get_logger(__name__)
PLURAL = "isoimages"
KIND = "ISOImage"
PROGRESS_INTERVAL = 1.0  # at most one progress patch per second
SLOT_POLL_SECONDS = 0.25  # how often an import waiting for a slot looks again (and for deletion)


# --- status writing -----------------------------------------------------------------------------

class StatusWriter:
    """Merge-patches the status subresource and remembers what it wrote (the handler's copy is stale)."""

    def __init__(self, rt: Runtime, namespace: str, name: str, current: dict[str, Any]) -> None:
        self.rt, self.namespace, self.name = rt, namespace, name
        self.current = dict(current)
        self._last_progress = 0.0
        self.patches = 0

    async def patch(self, changes: dict[str, Any]) -> None:
        changes = {k: v for k, v in changes.items() if self.current.get(k) != v}
        if not changes:
            return
        await self.rt.kube.patch_status(PLURAL, self.namespace, self.name, changes)
        self.patches += 1
        for key, value in changes.items():
            if value is None:
                self.current.pop(key, None)
            else:
                self.current[key] = value

    async def replace(self, new: dict[str, Any]) -> None:
        await self.patch(merge_patch(self.current, new))

    async def progress(self, done: int, total: int | None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        await self.patch({"progress": progress_value(done, total)})


def progress_value(done: int, total: int | None) -> dict[str, Any]:
    value: dict[str, Any] = {"bytesDone": done}
    if total:
        value["bytesTotal"] = total
        value["percent"] = min(100, int(done * 100 / total))
    return value


# --- targets ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    host: str
    pool: str
    spec: LibvirtHostSpec | None
    problem: AppError | None = None  # named explicitly but missing or not Ready


async def resolve_targets(spec: ISOImageSpec, rt: Runtime, namespace: str = "",
                          hosts: Mapping[str, Mapping[str, Any]] | None = None) -> list[Target]:
    """The hosts to import onto, with their pools. Tenancy (LibvirtHost allowedNamespaces,
    namespaceSelector, allowedPools): a named host that refuses the image's namespace or pool is a
    target with a problem; selected hosts that refuse it are skipped. `hosts`: the watch-fed view
    (handlers.iso's index); listed from the apiserver only without one."""
    if hosts is None:
        hosts = {h["metadata"]["name"]: h for h in await rt.kube.list_objects("libvirthosts")}
    views = {n: plan.HostView.from_object(h) for n, h in hosts.items()}
    ns_labels = (await namespace_labels_of(rt).get(namespace)
                 if namespace and plan.needs_namespace_labels(views.values(), namespace) else None)
    refused: list[AppError] = []

    def refusal(t: Target) -> AppError | None:
        return plan.image_denial(views[t.host], namespace, ns_labels, t.pool)

    targets = spec.targets
    names = list(targets.host_names) if targets else []
    selector = dict(targets.host_selector.match_labels) if targets and targets.host_selector else None
    chosen: dict[str, Target] = {}

    def ready(obj: dict[str, Any]) -> bool:
        return is_true((obj.get("status") or {}).get("conditions"), READY)

    def target(name: str, obj: dict[str, Any]) -> Target:
        host_spec = LibvirtHostSpec.model_validate(obj.get("spec") or {})
        return Target(name, spec.pool or host_spec.default_pool, host_spec)

    for name in names:
        obj = hosts.get(name)
        if obj is None:
            chosen[name] = Target(name, spec.pool or "default", None, AppError(
                ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {name} named in spec.targets.hostNames does not exist",
                {"host": name}))
        elif (denied := refusal(t := target(name, obj))) is not None:
            t.problem = denied
            chosen[name] = t
        elif not ready(obj):
            t.problem = AppError(ErrorCode.HOST_UNREACHABLE, f"LibvirtHost {name} is not Ready", {"host": name})
            chosen[name] = t
        else:
            chosen[name] = target(name, obj)
    if selector is not None or not names:
        for name, obj in hosts.items():
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if name in chosen or not ready(obj):
                continue
            if selector is None or labels_match(selector, labels):
                if (denied := refusal(t := target(name, obj))) is not None:
                    refused.append(denied)
                else:
                    chosen[name] = t
    if not chosen:
        if refused:
            raise AppError(refused[0].code, f"no Ready LibvirtHost matching the ISOImage's targets admits it "
                           f"({len(refused)} refuse it); e.g. {refused[0].message}", refused[0].context)
        raise AppError(ErrorCode.NO_SCHEDULABLE_HOST,
                       "no Ready LibvirtHost matches the ISOImage's targets", {"kind": KIND})
    return [chosen[n] for n in sorted(chosen)]


# --- the cache ----------------------------------------------------------------------------------

def cache_paths(rt: Runtime, uid: str) -> tuple[Path, Path]:
    base = Path(rt.settings.iso_cache_dir)
    return base / f"{uid}.img", base / f"{uid}.part"


def remove_cache(rt: Runtime, uid: str) -> None:
    for path in cache_paths(rt, uid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _secret_value(rt: Runtime, namespace: str, ref: Any, key: str, field: str) -> bytes | None:
    if ref is None:
        return None
    data = await rt.kube.read_secret(namespace, ref.name)
    if data is None or key not in data:
        raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND,
                       f"Secret {namespace}/{ref.name} named by {field} is missing or has no key {key}",
                       {"secret": f"{namespace}/{ref.name}", "field": field})
    return data[key]


# --- one reconcile ------------------------------------------------------------------------------

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
    slot: _ImportSlots | None = None
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
            todo += await _vanished(
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
            new = _ready_status(status, conditions, generation, hosts_status, targets)
            return IsoOutcome(new, None, True, written=writer.current)

        # -- one of the operator's import slots (bounded concurrency), then room in every target pool --
        slot = await _acquire_slot(rt, should_stop, lambda running: writer.patch({
            "phase": "Pending", "conditions": summarize(
                conditions, ready=False, reason="Queued", generation=generation, reconciling=True,
                message=f"waiting for an import slot: {running} import(s) running, the operator's limit "
                        "(--max-concurrent-imports)")}))
        final, part = cache_paths(rt, uid)
        cap, cap_source = _size_cap(spec, rt)
        rooms, refused = await _pool_rooms(todo, rt)
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
                    refuse(t, _storage_full(t, size, rooms[t.host], declared=declared))
            if not todo:
                raise errors[0]

        if not todo:
            await writer.patch({"hosts": _host_list(hosts_status)})
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
                    await writer.patch({"hosts": _host_list(hosts_status)})

            room = max(rooms[t.host] for t in todo)

            def too_large(size: int, declared: bool) -> AppError:
                if cap is not None and size > cap:
                    return _over_cap(spec.source.url, size, cap, cap_source, declared=declared)
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
                more_rooms, more_refused = await _pool_rooms([t for t in todo if t.host not in rooms], rt)
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
        await writer.patch({"phase": "Uploading", "hosts": _host_list(hosts_status)})
        abort = threading.Event()
        watcher = asyncio.create_task(_watch_stop(should_stop, abort))
        try:
            results = await asyncio.gather(*(_upload_one(t, final, vol, size, rt, abort) for t in todo))
        finally:
            watcher.cancel()
        if abort.is_set() and should_stop():
            raise OperationAborted("upload stopped on request")
        for entry, err in results:
            hosts_status[entry["host"]] = entry
            if err is not None:
                errors.append(err)
        if errors:
            await writer.patch({"hosts": _host_list(hosts_status)})
            raise errors[0]
        if first_problem is not None:
            raise first_problem
        remove_cache(rt, uid)
        ISO_IMPORT_SECONDS.observe(time.monotonic() - started)
        new = _ready_status(writer.current, conditions, generation, hosts_status, targets)
        return IsoOutcome(new, None, True, written=writer.current)
    except OperationAborted:
        log.info("import stopped on request")
        remove_cache(rt, uid)
        return IsoOutcome(writer.current, None, False, aborted=True, written=writer.current)
    except AppError as err:
        # Nothing stays in the cache after a failed import: a 10 GiB body must not sit there until
        # the ISOImage is deleted (partial files only live between the attempts of one download).
        remove_cache(rt, uid)
        new = await _failed_status(err, writer.current, conditions, generation, rt, hosts_status)
        return IsoOutcome(new, err, False, written=writer.current)
    except BaseException:
        remove_cache(rt, uid)
        raise
    finally:
        if slot is not None:
            slot.release()


# --- limits: import slots, sizes, pool space ------------------------------------------------------

class _ImportSlots:
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


async def _acquire_slot(rt: Runtime, should_stop: Callable[[], bool],
                        waiting: Callable[[int], Awaitable[None]]) -> _ImportSlots:
    limit = max(1, rt.settings.iso_max_concurrent_imports)
    slots = rt.extras.get("iso_import_slots")
    if not isinstance(slots, _ImportSlots) or slots.limit != limit:  # new settings: new counter
        slots = rt.extras["iso_import_slots"] = _ImportSlots(limit)
    told = False
    while not slots.try_acquire():
        if should_stop():
            raise OperationAborted("stopped while waiting for an import slot")
        if not told:
            await waiting(slots.running)
            told = True
        await asyncio.sleep(SLOT_POLL_SECONDS)
    return slots


def _size_cap(spec: ISOImageSpec, rt: Runtime) -> tuple[int | None, str]:
    """The largest image accepted and where that limit comes from."""
    operator_cap = rt.settings.download_max_bytes or None
    own = parse_quantity(spec.max_size) if spec.max_size else None
    if own is not None and (operator_cap is None or own <= operator_cap):
        return own, "spec.maxSize"
    return operator_cap, "the operator's --download-max-size"


def _over_cap(url: str, size: int, cap: int, source: str, *, declared: bool) -> AppError:
    what = (f"the server declares {size} bytes (Content-Length)" if declared
            else f"the download was stopped at the limit ({size}+ bytes received)")
    return AppError(ErrorCode.ISO_DOWNLOAD_FAILED,
                    f"the image is larger than {format_bytes(cap)}, the limit set by {source}: {what}",
                    {"url": safe_url(url), "limit": cap, "bytes": size, "permanent": "true"})


def _storage_full(t: Target, size: int, available: int, *, declared: bool) -> AppError:
    need = f"{size} bytes (Content-Length)" if declared else f"at least {size} bytes"
    return AppError(ErrorCode.STORAGE_FULL,
                    f"the image needs {need} but storage pool {t.pool} on host {t.host} has only "
                    f"{available} bytes ({available / 2**30:.1f} GiB) free",
                    {"host": t.host, "pool": t.pool, "needed": size, "available": available})


async def _pool_rooms(todo: list[Target], rt: Runtime) -> tuple[dict[str, int], list[tuple[Target, AppError]]]:
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


async def _vanished(done: list[Target], vol: str, hosts_status: dict[str, dict[str, Any]],
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


async def _watch_stop(should_stop: Callable[[], bool], abort: threading.Event) -> None:
    while not abort.is_set():
        if should_stop():
            abort.set()
            return
        await asyncio.sleep(0.2)


async def _upload_one(t: Target, path: Path, vol: str, size: int, rt: Runtime,
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


def _host_list(hosts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [hosts[k] for k in sorted(hosts)]


def _ready_status(status: dict[str, Any], conditions: list[dict[str, Any]], generation: int,
                  hosts: dict[str, dict[str, Any]], targets: list[Target]) -> dict[str, Any]:
    new = {k: v for k, v in status.items() if k not in ("error", "retry")}
    new.update({
        "observedGeneration": generation,
        "phase": "Ready",
        "hosts": _host_list(hosts),
        "conditions": summarize(conditions, ready=True, reason="Imported",
                                message=f"available on {len(targets)} host(s)", generation=generation),
    })
    size = status.get("sizeBytes")
    if size:
        new["progress"] = progress_value(size, size)
    return new


async def _failed_status(err: AppError, status: dict[str, Any], conditions: list[dict[str, Any]],
                         generation: int, rt: Runtime, hosts: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    ISO_FAILURES.labels(err.reason).inc()
    permanent = not err.retryable or err.context.get("permanent") == "true"
    count = int((status.get("retry") or {}).get("count") or 0) + 1
    retry: dict[str, Any] = {"count": count}
    if not permanent:
        next_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=retry_delay(count))
        retry["nextRetryTime"] = timestamp(next_at)
    stalled = permanent or count >= rt.settings.iso_retry_limit
    err_status = await error_status(err, status.get("error"), KIND, rt.remediator)
    message = human_message(err, err_status)
    new = dict(status)
    new.update({
        "observedGeneration": generation,
        "phase": "Failed",
        "retry": retry,
        "error": err_status,
        "conditions": summarize(conditions, ready=False, reason=err.reason, message=message,
                                generation=generation, reconciling=not stalled, stalled=stalled),
    })
    if hosts is not None:
        new["hosts"] = _host_list(hosts)
    if err.code == ErrorCode.ISO_CHECKSUM_MISMATCH:
        new.pop("progress", None)
    log.warning("ISO import failed", code=err.code.value, error=err.message, attempt=count,
                permanent=permanent, stalled=stalled)
    return new


def due(status: dict[str, Any] | None, generation: int, *, resync_due: bool) -> bool:
    """Whether the timer should run an attempt now."""
    status = status or {}
    if status.get("observedGeneration") != generation:
        return True
    retry = status.get("retry") or {}
    if status.get("error"):
        next_at = retry.get("nextRetryTime")
        if not next_at:
            return False  # permanent: waits for a spec change
        at = parse_time(next_at)
        return at is None or dt.datetime.now(dt.timezone.utc) >= at
    return resync_due


# --- deletion -----------------------------------------------------------------------------------

async def referencing_vms(namespace: str, name: str, rt: Runtime) -> list[str]:
    users = []
    for vm in await rt.kube.list_objects("virtualmachines", namespace):
        for disk in (vm.get("spec") or {}).get("disks") or []:
            ref = ((disk or {}).get("cdrom") or {}).get("isoImageRef") or {}
            if ref.get("name") == name:
                users.append(vm["metadata"]["name"])
                break
    return sorted(users)


async def delete_iso(namespace: str, name: str, uid: str, status: dict[str, Any] | None, rt: Runtime,
                     *, force: bool = False) -> None:
    """Remove the volumes and the cache file; AppError(ISO_IN_USE) while a VM references the image.

    Only volumes whose names are this ISOImage's own (`is_volume_of`: derived from its namespace and
    name) are deleted: status lists where the image went, but a volume name written into status by
    someone else never makes another image's or tenant's volume a deletion target."""
    users = await referencing_vms(namespace, name, rt)
    if users:
        raise AppError(ErrorCode.ISO_IN_USE,
                       f"ISOImage {name} is used by VirtualMachine {', '.join(users[:5])}"
                       f"{' and others' if len(users) > 5 else ''}; remove the cdrom first",
                       {"virtualMachines": ",".join(users)[:200]})
    hosts = {h["metadata"]["name"]: h for h in await rt.kube.list_objects("libvirthosts")}
    errors: list[AppError] = []
    for entry in (status or {}).get("hosts") or []:
        host, pool, vol = entry.get("host"), entry.get("pool"), entry.get("volume")
        if not (host and pool and vol):
            continue
        if not is_volume_of(namespace, name, vol):
            log.warning("status names a volume that is not this ISOImage's: left in place", host=host,
                        pool=pool, volume=vol)
            continue
        obj = hosts.get(host)
        if obj is None:
            log.warning("host gone, volume left in place", host=host, pool=pool, volume=vol)
            continue
        try:
            conn = await host_connection(rt, host, LibvirtHostSpec.model_validate(obj.get("spec") or {}))
            deleted = await delete_volume(conn, pool, vol)
            log.info("volume deleted" if deleted else "volume already gone", host=host, pool=pool, volume=vol)
        except AppError as err:
            errors.append(err)
    if errors and not force:
        raise errors[0]
    remove_cache(rt, uid)


async def deletion_blocked_status(err: AppError, status: dict[str, Any] | None, generation: int,
                                  rt: Runtime) -> dict[str, Any]:
    status = dict(status or {})
    err_status = await error_status(err, status.get("error"), KIND, rt.remediator)
    message = human_message(err, err_status)
    new = dict(status)
    new.update({"phase": "Deleting", "error": err_status, "conditions": summarize(
        list(status.get("conditions") or []), ready=False, reason=err.reason, message=message,
        generation=generation, reconciling=True)})
    return new
