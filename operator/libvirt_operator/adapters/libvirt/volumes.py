"""Storage volumes for imported images: safe names, stream upload, deletion.

The blocking functions take a virConnect and run through `HostConnection.call` (the host's own
thread pool). An upload holds one of the host's call slots for its whole duration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import libvirt

from ...core.errors import AppError, ErrorCode, OperationAborted
from ...core.metrics import ISO_BYTES
from .connection import HostConnection
from .errors import classify_libvirt_error
from .pools import active_pool, find_pool, find_volume, pool_space_blocking, volume_xml

UPLOAD_CHUNK = 1024 * 1024
_SLUG = re.compile(r"[^a-z0-9]+")
VOLUME_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
MAX_NAME = 100


def volume_name(namespace: str, name: str, checksum: str) -> str:
    """`iso-<ns>-<name>-<id>-<digest>`: [a-z0-9-] only (no dots, no slashes: no path traversal).

    <id> is a hash of "namespace/name", so truncation or slug collisions ("a-b/c" vs "a/b-c") never
    make two ISOImages share a volume; <digest> is the image checksum's prefix, so new bytes never
    overwrite a volume a VM may be using.
    """
    digest = checksum.partition(":")[2] or checksum
    digest = _SLUG.sub("", digest.lower())[:16]
    if len(digest) < 8:
        raise ValueError("volume names need a hex checksum of at least 8 characters")
    result = f"{_volume_prefix(namespace, name, len(digest))}{digest}"
    assert VOLUME_NAME_RE.match(result) and len(result) <= MAX_NAME
    return result


def _volume_prefix(namespace: str, name: str, digest_len: int) -> str:
    ident = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]
    slug = _SLUG.sub("-", f"{namespace}-{name}".lower()).strip("-")
    budget = MAX_NAME - len("iso---") - len(ident) - digest_len
    slug = slug[:budget].strip("-") or "x"
    return f"iso-{slug}-{ident}-"


def is_volume_of(namespace: str, name: str, volume: str) -> bool:
    """Whether `volume` is a name `volume_name` gives this ISOImage (for any content checksum).

    The digest has no dashes and <id> a fixed length, so a name parses one way only: another
    ISOImage's volume never matches. Deletion uses this instead of trusting names from status."""
    for digest_len in range(8, 17):
        prefix = _volume_prefix(namespace, name, digest_len)
        rest = volume[len(prefix):]
        if volume.startswith(prefix) and len(rest) == digest_len and rest.isalnum() and rest == rest.lower():
            return True
    return False


def _check_name(name: str) -> None:
    if not VOLUME_NAME_RE.match(name) or len(name) > MAX_NAME:
        raise AppError(ErrorCode.INVALID_SPEC, f"unsafe volume name {name[:64]!r}", {"volume": name[:64]})


@dataclasses.dataclass(frozen=True)
class UploadedVolume:
    pool: str
    name: str
    path: str
    size: int


def upload_blocking(conn: libvirt.virConnect, pool_name: str, vol_name: str, path: Path, *,
                    abort: threading.Event | None = None,
                    progress: Callable[[int], None] | None = None,
                    chunk_size: int = UPLOAD_CHUNK) -> UploadedVolume:
    """(Re)create vol_name (raw, exactly the file's size) in pool_name and stream the file into it.

    An existing volume of that name is replaced (a previous attempt may have left a partial one).
    On any failure the new volume is deleted again.
    """
    _check_name(vol_name)
    size = os.path.getsize(path)
    pool = active_pool(conn, pool_name)
    try:
        pool.refresh(0)
    except libvirt.libvirtError:
        pass  # a refresh racing another one is harmless
    _delete_if_exists(pool, vol_name)
    vol = pool.createXML(volume_xml(vol_name, size, "raw"), 0)
    ok = False
    stream = conn.newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        sent = 0
        with open(path, "rb") as fh:
            while sent < size:
                if abort is not None and abort.is_set():
                    raise OperationAborted("upload stopped on request")
                chunk = fh.read(min(chunk_size, size - sent))
                if not chunk:
                    raise AppError(ErrorCode.LIBVIRT_ERROR, "the cached image shrank during the upload",
                                   {"volume": vol_name})
                offset = 0
                while offset < len(chunk):
                    n = stream.send(chunk[offset:] if offset else chunk)
                    if n < 0:
                        raise AppError(ErrorCode.LIBVIRT_ERROR, "libvirt stream refused data",
                                       {"volume": vol_name})
                    offset += n
                sent += len(chunk)
                ISO_BYTES.labels("uploaded").inc(len(chunk))
                if progress is not None:
                    progress(sent)
        stream.finish()
        info = vol.info()  # [type, capacity, allocation]
        if int(info[1]) != size:
            raise AppError(ErrorCode.LIBVIRT_ERROR,
                           f"volume {vol_name} has {info[1]} bytes after the upload, expected {size}",
                           {"volume": vol_name, "pool": pool_name})
        ok = True
        return UploadedVolume(pool=pool_name, name=vol_name, path=vol.path(), size=size)
    finally:
        if not ok:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            try:
                vol.delete(0)
            except libvirt.libvirtError:
                pass


def _delete_if_exists(pool: libvirt.virStoragePool, vol_name: str) -> bool:
    vol = find_volume(pool, vol_name)
    if vol is None:
        return False
    vol.delete(0)
    return True


def delete_blocking(conn: libvirt.virConnect, pool_name: str, vol_name: str) -> bool:
    """Delete the volume; False when it (or its whole pool) is already gone."""
    _check_name(vol_name)
    pool = find_pool(conn, pool_name)
    if pool is None:
        return False
    if pool.isActive():
        try:
            pool.refresh(0)
        except libvirt.libvirtError:
            pass
    return _delete_if_exists(pool, vol_name)


def volume_info_blocking(conn: libvirt.virConnect, pool_name: str, vol_name: str) -> tuple[int, str] | None:
    """(capacity bytes, path) or None when absent.

    The periodic check of every image on every host: the pool is rescanned (refresh) only when the
    volume is not found or cannot be read as libvirt last saw it (removed or changed out of band),
    not on every look."""
    pool = conn.storagePoolLookupByName(pool_name)
    vol = find_volume(pool, vol_name)
    if vol is not None:
        try:
            return int(vol.info()[1]), vol.path()  # info() re-reads the file itself (dir pools)
        except libvirt.libvirtError:
            pass
    try:
        pool.refresh(0)
    except libvirt.libvirtError:
        pass
    vol = find_volume(pool, vol_name)
    if vol is None:
        return None
    return int(vol.info()[1]), vol.path()


def read_volume_blocking(conn: libvirt.virConnect, pool_name: str, vol_name: str, limit: int) -> bytes | None:
    """The volume's bytes (at most `limit`), or None when the volume is absent or the driver cannot
    download (libvirt's test driver)."""
    pool = conn.storagePoolLookupByName(pool_name)
    vol = find_volume(pool, vol_name)
    if vol is None:
        return None
    size = min(int(vol.info()[1]), limit)
    stream = conn.newStream(0)
    try:
        vol.download(stream, 0, size, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return None
        raise
    chunks, got, done = [], 0, False
    try:
        while got < size:
            data = stream.recv(min(UPLOAD_CHUNK, size - got))
            if not data:
                break
            chunks.append(data)
            got += len(data)
        stream.finish()
        done = True
    finally:
        if not done:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
    return b"".join(chunks)


# --- async wrappers ---------------------------------------------------------------------------

def _upload_timeout(size: int) -> float:
    return 120.0 + size / (5 * 1024 * 1024)  # generous: ≥ 5 MB/s


async def upload_volume(host: HostConnection, pool_name: str, vol_name: str, path: Path, *,
                        abort: threading.Event | None = None,
                        progress: Callable[[int], None] | None = None) -> UploadedVolume:
    """Upload path into the host's pool, in the host's thread pool. Setting `abort` stops it."""
    abort = abort or threading.Event()
    size = os.path.getsize(path)
    try:
        return await host.call("volume.upload", lambda conn: upload_blocking(
            conn, pool_name, vol_name, path, abort=abort, progress=progress), timeout=_upload_timeout(size),
            stream=True)  # its own slots: an upload never holds one of the host's call slots
    except BaseException:
        abort.set()  # a timed-out or cancelled await leaves the thread running: stop it
        raise


async def delete_volume(host: HostConnection, pool_name: str, vol_name: str) -> bool:
    return await host.call("volume.delete", lambda conn: delete_blocking(conn, pool_name, vol_name))


async def volume_info(host: HostConnection, pool_name: str, vol_name: str) -> tuple[int, str] | None:
    return await host.call("volume.info", lambda conn: volume_info_blocking(conn, pool_name, vol_name))


async def read_volume(host: HostConnection, pool_name: str, vol_name: str, limit: int) -> bytes | None:
    return await host.call("volume.read", lambda conn: read_volume_blocking(conn, pool_name, vol_name, limit))


async def pool_space(host: HostConnection, pool_name: str) -> tuple[int, int]:
    """(capacity, available) bytes of the pool (see pools.pool_space_blocking)."""
    return await host.call("pool.info", lambda conn: pool_space_blocking(conn, pool_name))


__all__ = ["UploadedVolume", "classify_libvirt_error", "delete_volume", "is_volume_of", "upload_volume",
           "volume_info", "volume_name"]
