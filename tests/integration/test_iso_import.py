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
from tests.harness.kube import condition

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
    rt = operator.runtime
    original = rt.settings
    path = tmp_path_factory.mktemp("iso-cache")
    rt.settings = dataclasses.replace(
        original, iso_cache_dir=str(path), iso_resync_seconds=2.0,
        download_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    yield path
    rt.settings = original


@pytest.fixture(scope="module")
def host(kube, libvirtd, operator) -> str:
    name = f"iso-host-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": name},
                                 "spec": {"uri": libvirtd.uri, "insecure": True, "probeIntervalSeconds": 5}})
    kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    yield name
    kube.delete("libvirthosts", name)


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
    pool.refresh(0)
    return pool.listVolumes()


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
    kube.wait_for(lambda: vol in pool_volumes(conn), timeout=60, what="volume uploaded again")
    assert hashlib.sha256(download_volume(conn, vol)).hexdigest() == iso_sha
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

    obj = kube.wait_for(failed, timeout=IMPORT_TIMEOUT, what="a failed attempt")
    status = obj["status"]
    assert condition(obj, "Ready")["reason"] == "StoragePoolNotFound"
    assert condition(obj, "Reconciling")["status"] == "True"  # retryable: backing off, not stalled yet
    [entry] = status["hosts"]
    assert entry["phase"] == "Failed" and entry["pool"] == "no-such-pool"
    assert entry["message"].startswith("[STORAGE_POOL_NOT_FOUND]")
    assert status["retry"]["nextRetryTime"] and status["error"]["context"]["host"] == host
    # the verified download stays cached for the retry
    assert [p.suffix for p in cache_dir.iterdir()] == [".img"]
    kube.delete("isoimages", "nopool", namespace)
    kube.wait_for(lambda: kube.get("isoimages", "nopool", namespace) is None, timeout=30, what="ISOImage gone")
    assert list(cache_dir.iterdir()) == []
