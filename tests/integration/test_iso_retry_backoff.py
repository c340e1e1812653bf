"""ISOImage retries are decided from what the operator itself did, not from a stale status (issue 15,
defect 5): a permanent failure is final until the spec changes, and retries back off exponentially,
also against a dead host.

Under load a watch delivers a copy of the status older than the operator's own last write (no error,
an older observedGeneration); an earlier version started the import again on every such copy. The tests
write such a stale status themselves (that is the copy a lagging watch delivers) and count what the
operator does: requests on the loopback HTTP server, attempts recorded in status.retry.

Real parts: the session's apiserver and in-process operator, a libvirt test:// host, a loopback
HTTP server, a LibvirtHost whose URI nothing answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import GROUP, VERSION, Kube, condition

ISO = "isoimages"
HOST = "libvirthosts"
# What kopf's lagging copy looked like: the attempt's outcome not there yet.
STALE = {"phase": "Downloading", "observedGeneration": None, "error": None, "retry": None, "conditions": None}


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def http(tmp_path: Path):
    image = tmp_path / "image.iso"
    image.write_bytes(os.urandom(256 * 1024))
    with TestHTTPServer(image) as srv:
        yield srv


@pytest.fixture
def cache_dir(operator, tmp_path: Path) -> Path:
    rt = operator.runtime
    original = rt.settings
    rt.settings = dataclasses.replace(original, iso_cache_dir=str(tmp_path / "cache"))
    yield tmp_path / "cache"
    rt.settings = original


def write_stale_status(kube: Kube, namespace: str, name: str) -> None:
    kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, ISO, name, {"status": STALE})


def iso(name: str, url: str, host: str, checksum: str, **spec) -> dict:
    return {"metadata": {"name": name},
            "spec": {"source": {"url": url}, "checksum": f"sha256:{checksum}",
                     "targets": {"hostNames": [host]}, **spec}}


def test_a_permanent_failure_is_fetched_once_until_the_spec_changes(kube, operator, namespace, test_host_factory,
                                                                     http, cache_dir) -> None:
    host = uniq("hv-iso")
    kube.create(HOST, {"metadata": {"name": host}, "spec": {"uri": test_host_factory(host)}})
    kube.wait_condition(HOST, host, "Ready", "True", timeout=30)
    wrong = hashlib.sha256(b"not the image").hexdigest()
    kube.create(ISO, iso("bad", http.url("/image"), host, wrong, maxSize="1Gi"), namespace)
    try:
        obj = kube.wait_condition(ISO, "bad", "Stalled", "True", namespace=namespace, timeout=60)
        assert obj["status"]["error"]["code"] == "ISO_CHECKSUM_MISMATCH"
        assert http.count("/image") == 1

        # ~12 s of stale copies: none of them starts another download.
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            write_stale_status(kube, namespace, "bad")
            time.sleep(0.5)
        assert http.count("/image") == 1

        # A spec change (generation 2) is worth exactly one new attempt, which fails the same way.
        kube.patch(ISO, "bad", {"spec": {"maxSize": "2Gi"}}, namespace)
        obj = kube.wait_for(lambda: (o := kube.get(ISO, "bad", namespace)) and
                            (o.get("status") or {}).get("observedGeneration") == 2 and
                            (condition(o, "Stalled") or {}).get("status") == "True" and o,
                            timeout=30, what="the new generation attempted")
        assert obj["status"]["error"]["code"] == "ISO_CHECKSUM_MISMATCH"
        time.sleep(6)
        assert http.count("/image") == 2
    finally:
        kube.delete(ISO, "bad", namespace)
        kube.wait_for(lambda: kube.get(ISO, "bad", namespace) is None, timeout=30, what="ISOImage gone")
        kube.delete(HOST, host)


def test_retries_against_a_dead_host_back_off_exponentially(kube, operator, namespace, http, cache_dir) -> None:
    dead = uniq("hv-dead")
    kube.create(HOST, {"metadata": {"name": dead},
                       "spec": {"uri": "qemu+tcp://127.0.0.1:1/system", "insecure": True}})
    kube.create(ISO, iso("waits", http.url("/image"), dead, hashlib.sha256(b"x").hexdigest()), namespace)
    try:
        seen: dict[int, float] = {}   # retry.count → when it first showed
        tampered = False
        deadline = time.monotonic() + 22
        while time.monotonic() < deadline:
            status = (kube.get(ISO, "waits", namespace) or {}).get("status") or {}
            count = (status.get("retry") or {}).get("count")
            if count is not None and count not in seen:
                seen[count] = time.monotonic()
                assert status["error"]["code"] == "HOST_UNREACHABLE", status
            if 2 in seen and not tampered:  # a stale copy must not reset the count nor bring the retry forward
                write_stale_status(kube, namespace, "waits")
                tampered = True
            time.sleep(0.2)
        # Backoff 5 s, then 10 s (then 20 s: not within the window): 3 attempts, not one per tick.
        assert sorted(seen) == [1, 2, 3], seen
        first, second = seen[2] - seen[1], seen[3] - seen[2]
        assert 3.5 <= first <= 7.5 and 8.5 <= second <= 13, (first, second)
        assert http.count("/image") == 0  # nothing to import onto: never downloaded
    finally:
        kube.delete(ISO, "waits", namespace)
        kube.wait_for(lambda: kube.get(ISO, "waits", namespace) is None, timeout=30, what="ISOImage gone")
        kube.delete(HOST, dead)
