"""ISOImage end to end: the real operator on a real apiserver imports the test ISO from a loopback
HTTP server into a real libvirtd's dir pool (stream upload over qemu+tcp)."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import time
import uuid
from pathlib import Path

import pytest

from libvirt_operator.adapters.libvirt.volumes import volume_name
from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import GROUP, condition
from tests.harness.pytest_operator import loopback_downloads

try:
    import libvirt
except ImportError:  # the libvirtd fixture skips (or fails under CI=true)
    libvirt = None
else:
    libvirt.registerErrorHandler(lambda *_a: None, None)

IMPORT_TIMEOUT = 90


@pytest.fixture(scope="module")
def iso_bytes(test_iso) -> bytes:
    return Path(test_iso.path).read_bytes()


@pytest.fixture(scope="module")
def iso_sha(iso_bytes: bytes) -> str:
    return hashlib.sha256(iso_bytes).hexdigest()


@pytest.fixture(scope="module")
def http(test_iso):
    with TestHTTPServer(Path(test_iso.path)) as srv:
        yield srv


@pytest.fixture(scope="module")
def cache_dir(operator, tmp_path_factory) -> Path:
    """The in-process operator downloads into a temp cache and may reach loopback (the test server)."""
    with loopback_downloads(operator, tmp_path_factory.mktemp("iso-cache"), iso_resync_seconds=2.0) as path:
        yield path


@pytest.fixture(scope="module")
def host(libvirtd_host: str) -> str:
    return libvirtd_host


@pytest.fixture
def conn(libvirtd):
    c = libvirt.open(libvirtd.uri)
    yield c
    c.close()


def iso_body(name: str, url: str, checksum: str, host: str) -> dict:
    return {"kind": "ISOImage", "metadata": {"name": name},
            "spec": {"source": {"url": url}, "checksum": f"sha256:{checksum}",
                     "targets": {"hostNames": [host]}}}


def pool_volumes(conn) -> list[str]:
    pool = conn.storagePoolLookupByName("default")
    try:
        pool.refresh(0)
    except libvirt.libvirtError:
        pass  # "pool has asynchronous jobs running": an upload is in flight; libvirt already knows its volume
    return pool.listVolumes()


def _sha256_of(conn, vol_name: str) -> str | None:
    """None while the upload is still in flight (libvirt refuses a download then, or it is short)."""
    try:
        return hashlib.sha256(download_volume(conn, vol_name)).hexdigest()
    except libvirt.libvirtError:
        return None


def download_volume(conn, vol_name: str) -> bytes:
    vol = conn.storagePoolLookupByName("default").storageVolLookupByName(vol_name)
    size = vol.info()[1]
    stream = conn.newStream(0)
    vol.download(stream, 0, size, 0)
    chunks = []
    while True:
        data = stream.recv(1024 * 1024)
        if data in (b"", -2) or data is None:
            break
        chunks.append(data)
    stream.finish()
    return b"".join(chunks)


def test_import_makes_the_volume_on_the_host(kube, namespace, operator, host, http, cache_dir, conn,
                                             iso_bytes, iso_sha) -> None:
    kube.create("isoimages", iso_body("boot", http.url("/image"), iso_sha, host), namespace)
    obj = kube.wait_condition("isoimages", "boot", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    status = obj["status"]
    vol = volume_name(namespace, "boot", f"sha256:{iso_sha}")
    assert status["phase"] == "Ready" and status["observedGeneration"] == 1
    assert status["verifiedChecksum"] == f"sha256:{iso_sha}" and status["sizeBytes"] == len(iso_bytes)
    assert status["progress"] == {"bytesDone": len(iso_bytes), "bytesTotal": len(iso_bytes), "percent": 100}
    [entry] = status["hosts"]
    assert entry == {"host": host, "phase": "Ready", "pool": "default", "volume": vol, "sizeBytes": len(iso_bytes)}
    assert condition(obj, "Reconciling") is None and condition(obj, "Stalled") is None
    assert "error" not in status and "retry" not in status
    # the bytes on the host are the ISO's
    assert vol in pool_volumes(conn)
    assert conn.storagePoolLookupByName("default").storageVolLookupByName(vol).info()[1] == len(iso_bytes)
    assert hashlib.sha256(download_volume(conn, vol)).hexdigest() == iso_sha
    # the cache is emptied once every host has it
    assert list(cache_dir.iterdir()) == []
    # deletion removes the volume
    kube.delete("isoimages", "boot", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "boot", namespace) is None, timeout=30, what="ISOImage gone")
    assert vol not in pool_volumes(conn)


def test_an_image_left_by_an_older_version_with_kopfs_finalizer_is_imported_torn_down_and_released(
        kube, namespace, operator, host, http, cache_dir, conn, iso_sha) -> None:
    """Upgrade path: older operators put kopf's finalizer on every ISOImage. This one keeps no kopf state
    on ISOImages; such an image must neither stay Terminating forever nor lose its teardown."""
    kopf_finalizer = f"{GROUP}/finalizer"
    body = iso_body("legacy", http.url("/image"), iso_sha, host)
    body["metadata"]["finalizers"] = [kopf_finalizer]
    kube.create("isoimages", body, namespace)
    kube.wait_condition("isoimages", "legacy", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    vol = volume_name(namespace, "legacy", f"sha256:{iso_sha}")
    assert vol in pool_volumes(conn)
    kube.wait_for(lambda: kube.get("isoimages", "legacy", namespace)["metadata"].get("finalizers") ==
                  [f"{GROUP}/teardown"], timeout=15, what="kopf's finalizer removed by kopf, ours holds the image")
    kube.delete("isoimages", "legacy", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "legacy", namespace) is None, timeout=30, what="ISOImage gone")
    assert vol not in pool_volumes(conn)  # torn down, not just released


def test_wrong_checksum_stalls_and_leaves_nothing(kube, namespace, operator, host, http, cache_dir, conn,
                                                  iso_sha) -> None:
    wrong = hashlib.sha256(b"not the image").hexdigest()
    before = set(pool_volumes(conn))
    kube.create("isoimages", iso_body("bad", http.url("/image"), wrong, host), namespace)
    obj = kube.wait_condition("isoimages", "bad", "Stalled", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ChecksumMismatch"
    assert condition(obj, "Reconciling") is None
    status = obj["status"]
    assert status["error"]["code"] == "ISO_CHECKSUM_MISMATCH" and status["phase"] == "Failed"
    assert status["error"]["context"]["actual"] == iso_sha
    assert "nextRetryTime" not in status["retry"]  # permanent: waits for a spec change
    assert set(pool_volumes(conn)) == before
    assert not any(v.startswith(f"iso-{namespace}") for v in pool_volumes(conn))
    assert list(cache_dir.iterdir()) == []
    kube.delete("isoimages", "bad", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "bad", namespace) is None, timeout=30, what="ISOImage gone")


def test_missing_url_is_a_download_failure(kube, namespace, operator, host, http, cache_dir, iso_sha) -> None:
    kube.create("isoimages", iso_body("gone", http.url("/missing"), iso_sha, host), namespace)
    obj = kube.wait_condition("isoimages", "gone", "Stalled", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    assert condition(obj, "Ready")["reason"] == "ISODownloadFailed"
    assert obj["status"]["error"]["context"]["status"] == "404"
    assert "?" not in obj["status"]["error"]["context"]["url"]
    kube.delete("isoimages", "gone", namespace)


def test_failed_download_is_retried_with_backoff(kube, namespace, operator, host, http, cache_dir, conn,
                                                 iso_sha) -> None:
    http.reset()
    http.flaky_failures = 3  # every attempt of the first try (3 requests) gets HTTP 500
    kube.create("isoimages", iso_body("flaky", http.url("/flaky"), iso_sha, host), namespace)

    def retried():
        obj = kube.get("isoimages", "flaky", namespace)
        retry = (obj.get("status") or {}).get("retry") or {}
        return obj if retry.get("count") == 1 and retry.get("nextRetryTime") else None

    obj = kube.wait_for(retried, timeout=IMPORT_TIMEOUT, what="first failure recorded")
    assert condition(obj, "Reconciling")["status"] == "True" and condition(obj, "Stalled") is None
    assert obj["status"]["error"]["code"] == "ISO_DOWNLOAD_FAILED"
    obj = kube.wait_condition("isoimages", "flaky", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    assert "retry" not in obj["status"] and "error" not in obj["status"]
    assert http.count("/flaky") == 4
    kube.delete("isoimages", "flaky", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "flaky", namespace) is None, timeout=30, what="ISOImage gone")


def test_deletion_is_blocked_while_a_vm_uses_the_image(kube, namespace, operator, host, http, cache_dir, conn,
                                                       iso_sha) -> None:
    kube.create("isoimages", iso_body("media", http.url("/image"), iso_sha, host), namespace)
    kube.wait_condition("isoimages", "media", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    vol = volume_name(namespace, "media", f"sha256:{iso_sha}")
    kube.create("virtualmachines", {"kind": "VirtualMachine", "metadata": {"name": "installer"},
                                    "spec": {"hostRef": host, "runStrategy": "Halted",
                                             "disks": [{"name": "cd", "cdrom": {"isoImageRef": {"name": "media"}}}]}},
                namespace)
    kube.delete("isoimages", "media", namespace)

    def blocked():
        obj = kube.get("isoimages", "media", namespace)
        cond = condition(obj, "Ready") if obj else None
        return obj if cond and cond["reason"] == "DeletionBlocked" else None

    obj = kube.wait_for(blocked, timeout=30, what="DeletionBlocked")
    assert obj["status"]["error"]["code"] == "ISO_IN_USE" and "installer" in obj["status"]["error"]["message"]
    assert obj["status"]["phase"] == "Deleting"
    assert vol in pool_volumes(conn)  # still there: the VM may be using it
    kube.delete("virtualmachines", "installer", namespace)
    kube.wait_for(lambda: kube.get("virtualmachines", "installer", namespace) is None, timeout=60, what="VM gone")
    kube.wait_for(lambda: kube.get("isoimages", "media", namespace) is None, timeout=60, what="ISOImage gone")
    assert vol not in pool_volumes(conn)


def test_deleting_during_a_download_stops_it_and_leaves_nothing(kube, namespace, operator, host, http,
                                                                 cache_dir, conn, iso_sha) -> None:
    http.slow_delay = 0.25  # the test ISO in 40 slices: ~10 s
    try:
        kube.create("isoimages", iso_body("slow", http.url("/slow"), iso_sha, host), namespace)

        def downloading():
            obj = kube.get("isoimages", "slow", namespace)
            progress = (obj.get("status") or {}).get("progress") or {}
            return obj if 0 < progress.get("bytesDone", 0) < progress.get("bytesTotal", 0) else None

        obj = kube.wait_for(downloading, timeout=30, what="download in progress")
        assert obj["status"]["phase"] == "Downloading"
        assert condition(obj, "Reconciling")["status"] == "True"
        assert condition(obj, "Ready")["status"] == "False"
        started = time.monotonic()
        kube.delete("isoimages", "slow", namespace)
        kube.wait_for(lambda: kube.get("isoimages", "slow", namespace) is None, timeout=15, what="ISOImage gone")
        assert time.monotonic() - started < 8  # not waiting for the ~10 s download to finish
    finally:
        http.slow_delay = 0.05
    kube.wait_for(lambda: list(cache_dir.iterdir()) == [], timeout=5, what="cache emptied")
    assert not any(v.startswith(f"iso-{namespace}") for v in pool_volumes(conn))


def test_selector_targets_every_matching_host(kube, namespace, operator, host, libvirtd_factory, http,
                                              cache_dir, iso_sha, iso_bytes) -> None:
    second = libvirtd_factory("iso-second")
    label = uuid.uuid4().hex[:8]
    other = f"iso-host2-{label}"
    kube.patch("libvirthosts", host, {"metadata": {"labels": {"iso-test": label}}})
    kube.create("libvirthosts", {"metadata": {"name": other, "labels": {"iso-test": label}},
                                 "spec": {"uri": second.uri, "insecure": True, "probeIntervalSeconds": 5}})
    try:
        kube.wait_condition("libvirthosts", other, "Ready", "True", timeout=60)
        before = http.count("/image")
        kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "both"},
                                  "spec": {"source": {"url": http.url("/image")}, "checksum": f"sha256:{iso_sha}",
                                           "targets": {"hostSelector": {"matchLabels": {"iso-test": label}}}}},
                    namespace)
        obj = kube.wait_condition("isoimages", "both", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
        vol = volume_name(namespace, "both", f"sha256:{iso_sha}")
        assert [(h["host"], h["phase"], h["volume"], h["sizeBytes"]) for h in obj["status"]["hosts"]] == sorted(
            [(host, "Ready", vol, len(iso_bytes)), (other, "Ready", vol, len(iso_bytes))])
        assert http.count("/image") == before + 1  # downloaded once for both hosts
        for daemon in (second,):
            c = libvirt.open(daemon.uri)
            try:
                assert vol in pool_volumes(c)
                assert hashlib.sha256(download_volume(c, vol)).hexdigest() == iso_sha
            finally:
                c.close()
        kube.delete("isoimages", "both", namespace)
        kube.wait_for(lambda: kube.get("isoimages", "both", namespace) is None, timeout=30, what="ISOImage gone")
        c = libvirt.open(second.uri)
        try:
            assert vol not in pool_volumes(c)
        finally:
            c.close()
    finally:
        kube.delete("libvirthosts", other)


def test_a_volume_deleted_behind_the_operators_back_is_uploaded_again(kube, namespace, operator, host, http,
                                                                      cache_dir, conn, iso_sha) -> None:
    kube.create("isoimages", iso_body("heal", http.url("/image"), iso_sha, host), namespace)
    kube.wait_condition("isoimages", "heal", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    vol = volume_name(namespace, "heal", f"sha256:{iso_sha}")
    before = http.count("/image")
    conn.storagePoolLookupByName("default").storageVolLookupByName(vol).delete(0)
    kube.wait_for(lambda: vol in pool_volumes(conn) and _sha256_of(conn, vol) == iso_sha, timeout=60,
                  what="volume uploaded again, whole")
    assert http.count("/image") == before + 1
    kube.wait_condition("isoimages", "heal", "Ready", "True", namespace=namespace, timeout=30)
    kube.delete("isoimages", "heal", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "heal", namespace) is None, timeout=30, what="ISOImage gone")


def test_authorization_secret_and_skipped_verification(kube, namespace, operator, host, http, cache_dir, conn,
                                                        iso_sha) -> None:
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "mirror-auth"},
                                                   "stringData": {"authorization": http.auth_value}})
    kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "private"},
                              "spec": {"source": {"url": http.url("/auth"), "authSecretRef": {"name": "mirror-auth"}},
                                       "skipChecksumVerification": True, "targets": {"hostNames": [host]}}},
                namespace)
    obj = kube.wait_condition("isoimages", "private", "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    assert obj["status"]["verifiedChecksum"] == f"sha256:{iso_sha}"  # computed, since none was declared
    assert http.requests_for("/auth")[-1]["authorization"] == http.auth_value
    assert http.auth_value not in str(obj)
    vol = obj["status"]["hosts"][0]["volume"]
    assert vol == volume_name(namespace, "private", f"sha256:{iso_sha}") and vol in pool_volumes(conn)
    kube.delete("isoimages", "private", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "private", namespace) is None, timeout=30, what="ISOImage gone")
    assert vol not in pool_volumes(conn)


def test_a_missing_pool_fails_that_host_and_is_retried(kube, namespace, operator, host, http, cache_dir,
                                                       iso_sha) -> None:
    body = iso_body("nopool", http.url("/image"), iso_sha, host)
    body["spec"]["pool"] = "no-such-pool"
    kube.create("isoimages", body, namespace)

    def failed():
        obj = kube.get("isoimages", "nopool", namespace)
        return obj if ((obj.get("status") or {}).get("retry") or {}).get("count") else None

    before = http.count("/image")
    obj = kube.wait_for(failed, timeout=IMPORT_TIMEOUT, what="a failed attempt")
    status = obj["status"]
    assert condition(obj, "Ready")["reason"] == "StoragePoolNotFound"
    assert condition(obj, "Reconciling")["status"] == "True"  # retryable: backing off, not stalled yet
    [entry] = status["hosts"]
    assert entry["phase"] == "Failed" and entry["pool"] == "no-such-pool"
    assert entry["message"].startswith("[STORAGE_POOL_NOT_FOUND]")
    assert status["retry"]["nextRetryTime"] and status["error"]["context"]["host"] == host
    # the pools are checked before the download: nothing was fetched, nothing is cached
    assert http.count("/image") == before and "progress" not in status
    assert list(cache_dir.iterdir()) == []
    kube.delete("isoimages", "nopool", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "nopool", namespace) is None, timeout=30, what="ISOImage gone")
    assert list(cache_dir.iterdir()) == []


# --- SSRF guard and size limits (issue 9 defect 4, issue 15 defect 6) ---------------------------

@pytest.fixture
def settings(operator, cache_dir):
    """Change the in-process operator's settings for one test; restored afterwards."""
    rt = operator.runtime
    original = rt.settings

    def change(**changes):
        rt.settings = dataclasses.replace(rt.settings, **changes)
    yield change
    rt.settings = original


@pytest.fixture
def connects(monkeypatch) -> list:
    """Every address a socket in this process (the operator included) tries to connect to."""
    import socket

    seen: list = []
    real = socket.socket.connect

    def connect(self, address):  # type: ignore[no-untyped-def]
        seen.append(address)
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def _stalled(kube, name: str, namespace: str) -> dict:
    return kube.wait_condition("isoimages", name, "Stalled", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)


def test_private_and_loopback_sources_are_refused_by_default(kube, namespace, operator, host, http, cache_dir,
                                                            settings, connects, conn, iso_sha) -> None:
    """Default settings (no --download-allow): the test server on loopback and a private address are
    refused before any connection; the status says why and how to allow it."""
    settings(download_allowed_networks=())
    before = http.count("/image")
    kube.create("isoimages", iso_body("loop", http.url("/image"), iso_sha, host), namespace)
    kube.create("isoimages", iso_body("lan", "http://10.1.2.3/images/x.iso", iso_sha, host), namespace)
    kube.create("isoimages", iso_body("mapped", f"http://[::ffff:10.1.2.3]:{http.port}/x.iso", iso_sha, host),
                namespace)
    for name, address, why in (("loop", "127.0.0.1", "loopback"), ("lan", "10.1.2.3", "private (RFC 1918)"),
                               ("mapped", "::ffff:10.1.2.3", "private (RFC 1918)")):
        obj = _stalled(kube, name, namespace)
        status = obj["status"]
        assert condition(obj, "Ready")["reason"] == "ISODownloadFailed"
        assert status["phase"] == "Failed" and "nextRetryTime" not in status["retry"]  # waits for a change
        error = status["error"]
        assert error["code"] == "ISO_DOWNLOAD_FAILED"
        assert ipaddress.ip_address(error["context"]["address"]) == ipaddress.ip_address(address)
        assert why in error["context"]["refused"], error
        assert "denied destination" in error["message"] and "download.allow" in error["message"]
        assert "progress" not in status
    assert http.count("/image") == before  # the guard decided on the address
    assert not any(str(a[0]) in ("10.1.2.3", "::ffff:10.1.2.3", "::ffff:a01:203") for a in connects
                   if isinstance(a, tuple)), connects
    assert list(cache_dir.iterdir()) == []
    assert not any(v.startswith(f"iso-{namespace}") for v in pool_volumes(conn))
    for name in ("loop", "lan", "mapped"):
        kube.delete("isoimages", name, namespace)


BIG = 64 * 1024 * 1024


@pytest.mark.parametrize("path, max_size, operator_cap, source", [
    (f"/big/{BIG}", "1Mi", None, "spec.maxSize"),  # Content-Length declared: refused before the body
    (f"/big-chunked/{BIG}", "1Mi", None, "spec.maxSize"),  # no Content-Length: cut at the cap
    (f"/big-close/{BIG}", None, 1024 * 1024, "--download-max-size"),  # operator-wide cap, body until close
], ids=["content-length", "chunked", "until-close-operator-cap"])
def test_a_body_over_the_cap_stops_there_and_leaves_no_cache_file(kube, namespace, operator, host, http,
                                                                   cache_dir, settings, conn, path, max_size,
                                                                   operator_cap, source) -> None:
    if operator_cap is not None:
        settings(download_max_bytes=operator_cap)
    body = {"kind": "ISOImage", "metadata": {"name": "huge"},
            "spec": {"source": {"url": http.url(path)}, "skipChecksumVerification": True,
                     "targets": {"hostNames": [host]}}}
    if max_size:
        body["spec"]["maxSize"] = max_size
    kube.create("isoimages", body, namespace)
    obj = _stalled(kube, "huge", namespace)
    error = obj["status"]["error"]
    assert error["code"] == "ISO_DOWNLOAD_FAILED" and condition(obj, "Ready")["reason"] == "ISODownloadFailed"
    assert "larger than 1Mi" in error["message"] and source in error["message"], error["message"]
    assert error["context"]["limit"] == str(1024 * 1024)
    assert (obj["status"].get("progress") or {}).get("bytesDone", 0) <= 1024 * 1024
    assert http.sent_bytes(path) < BIG  # the operator hung up: it did not read (and cache) 64 MiB
    assert list(cache_dir.iterdir()) == []  # nothing cached after the failed import
    assert not any(v.startswith(f"iso-{namespace}") for v in pool_volumes(conn))
    kube.delete("isoimages", "huge", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "huge", namespace) is None, timeout=30, what="ISOImage gone")


def test_a_max_size_above_the_operators_cap_does_not_raise_it(kube, namespace, operator, host, http, cache_dir,
                                                              settings) -> None:
    settings(download_max_bytes=1024 * 1024)
    kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "greedy"},
                              "spec": {"source": {"url": http.url(f"/big/{BIG}")}, "skipChecksumVerification": True,
                                       "maxSize": "1Ti", "targets": {"hostNames": [host]}}}, namespace)
    obj = _stalled(kube, "greedy", namespace)
    assert "--download-max-size" in obj["status"]["error"]["message"]
    assert list(cache_dir.iterdir()) == []
    kube.delete("isoimages", "greedy", namespace)


def test_a_content_length_beyond_the_pools_free_space_is_refused_before_the_download(
        kube, namespace, operator, host, http, cache_dir, settings, conn) -> None:
    """The real libvirtd's dir pool reports its filesystem's free space; the server declares more
    (and never sends a body byte): STORAGE_FULL from the headers alone."""
    pool = conn.storagePoolLookupByName("default")
    pool.refresh(0)
    available = pool.info()[3]
    declared = available + 64 * 2**30
    settings(download_max_bytes=0)  # no operator-wide cap: the pool's free space is the limit
    path = f"/huge/{declared}"
    started = time.monotonic()
    kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "toobig"},
                              "spec": {"source": {"url": http.url(path)}, "skipChecksumVerification": True,
                                       "targets": {"hostNames": [host]}}}, namespace)

    def failed():
        obj = kube.get("isoimages", "toobig", namespace)
        return obj if ((obj.get("status") or {}).get("error") or {}).get("code") else None

    obj = kube.wait_for(failed, timeout=IMPORT_TIMEOUT, what="the import refused")
    assert time.monotonic() - started < http.stall_seconds  # decided on the headers, not a read timeout
    status = obj["status"]
    assert status["error"]["code"] == "STORAGE_FULL" and condition(obj, "Ready")["reason"] == "StorageFull"
    ctx = status["error"]["context"]
    assert ctx["host"] == host and ctx["pool"] == "default" and int(ctx["needed"]) == declared
    assert 0 < int(ctx["available"]) < declared
    assert "Content-Length" in status["error"]["message"]
    [entry] = status["hosts"]
    assert entry["phase"] == "Failed" and entry["message"].startswith("[STORAGE_FULL]")
    assert status["retry"]["nextRetryTime"]  # retryable: space may be freed
    assert (status.get("progress") or {}).get("bytesDone", 0) == 0
    assert http.count(path) == 1
    assert list(cache_dir.iterdir()) == []
    kube.delete("isoimages", "toobig", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "toobig", namespace) is None, timeout=30, what="ISOImage gone")


def test_concurrent_imports_are_bounded_operator_wide(kube, namespace, operator, host, http, cache_dir,
                                                      settings, iso_sha) -> None:
    settings(iso_max_concurrent_imports=1)
    http.slow_delay = 0.1  # the test ISO in 40 slices: ~4 s each
    try:
        for name in ("first", "second"):
            kube.create("isoimages", iso_body(name, http.url("/slow"), iso_sha, host), namespace)

        def one_queued():
            objs = [kube.get("isoimages", n, namespace) for n in ("first", "second")]
            reasons = [(condition(o, "Ready") or {}).get("reason") for o in objs]
            return objs if "Queued" in reasons and "Importing" in reasons else None

        objs = kube.wait_for(one_queued, timeout=30, what="one import running, one queued")
        queued = next(o for o in objs if condition(o, "Ready")["reason"] == "Queued")
        assert queued["status"]["phase"] == "Pending"
        assert condition(queued, "Reconciling")["status"] == "True"
        assert "import slot" in condition(queued, "Ready")["message"]
        assert "progress" not in queued["status"]  # not downloading while it waits
        for name in ("first", "second"):
            kube.wait_condition("isoimages", name, "Ready", "True", namespace=namespace, timeout=IMPORT_TIMEOUT)
    finally:
        http.slow_delay = 0.05
    for name in ("first", "second"):
        kube.delete("isoimages", name, namespace)
    for name in ("first", "second"):
        kube.wait_for(lambda n=name: kube.get("isoimages", n, namespace) is None, timeout=30, what="gone")


def test_max_size_is_validated_by_the_apiserver(kube, namespace) -> None:
    from kubernetes.client.exceptions import ApiException

    for bad in ("0", "8 GiB", "2Ei"):
        body = {"kind": "ISOImage", "metadata": {"name": "bad-size"},
                "spec": {"source": {"url": "https://mirror.example/x.iso"}, "skipChecksumVerification": True,
                         "maxSize": bad}}
        with pytest.raises(ApiException) as info:
            kube.create("isoimages", body, namespace)
        assert info.value.status == 422 and "maxSize" in info.value.body, info.value.body
