"""ISO import throughput: the operator's download + upload path vs raw copies of the same bytes.

Starts a real libvirtd (tests.harness.libvirt_hosts, qemu+tcp on loopback, dir pool `default`) and
the test HTTP server (tests.harness.http_server) in a subprocess, writes an N MiB random file, then
measures in one run:

  raw cp            cp of the file (local disk copy; page cache warm)
  raw curl          curl -o of the file from the HTTP server (no hashing)
  raw httpx         plain httpx streaming into a file (the Python client's own cost)
  raw upload        a plain libvirt stream upload of the file (1 MiB sends, no thread pool)
  operator download Downloader.download (SSRF guard, sha256 while streaming, pipelined writes)
  operator upload   volumes.upload_volume through a HostConnection (the host's thread pool)

and the peak extra RSS of this process during the operator path (VmHWM reset via clear_refs).

Usage (root, libvirt packages installed; see hack/install-system-deps.sh):
    .venv/bin/python bench/iso_import_bench.py --size-mib 1024
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from libvirt_operator.adapters.http.download import DownloadPolicy, Downloader  # noqa: E402
from libvirt_operator.adapters.libvirt import ConnectOptions, HostConnection  # noqa: E402
from libvirt_operator.adapters.libvirt.volumes import delete_blocking, upload_volume  # noqa: E402
from libvirt_operator.core.settings import Settings  # noqa: E402
from tests.harness.libvirt_hosts import LibvirtDaemon  # noqa: E402

MIB = 1024 * 1024


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(8 * MIB)
    with open(path, "wb") as fh:
        left = size
        i = 0
        while left:
            chunk = block[: min(len(block), left)]
            chunk = i.to_bytes(8, "little") + chunk[8:] if len(chunk) > 8 else chunk  # no dedup
            fh.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return h.hexdigest()


def start_server(path: Path) -> tuple[subprocess.Popen, str]:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from tests.harness.http_server import TestHTTPServer;"
        "s = TestHTTPServer(sys.argv[2]).start(); print(s.port, flush=True);"
        "time.sleep(1e9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/image"


async def raw_httpx(url: str, dest: Path) -> float:
    """Plain httpx streaming into a file: the Python HTTP client's own cost, no hashing, no guard."""
    import httpx
    started = time.perf_counter()
    async with httpx.AsyncClient() as client, client.stream("GET", url) as response:
        with open(dest, "wb") as fh:
            async for piece in response.aiter_raw():
                fh.write(piece)
    return time.perf_counter() - started


def raw_upload(uri: str, path: Path, vol_name: str) -> float:
    conn = libvirt.open(uri)
    try:
        size = path.stat().st_size
        pool = conn.storagePoolLookupByName("default")
        started = time.perf_counter()
        vol = pool.createXML(f"<volume><name>{vol_name}</name><capacity unit='bytes'>{size}</capacity>"
                             "<target><format type='raw'/></target></volume>", 0)
        stream = conn.newStream(0)
        vol.upload(stream, 0, size, 0)
        with open(path, "rb") as fh:
            while chunk := fh.read(MIB):
                stream.send(chunk)
        stream.finish()
        seconds = time.perf_counter() - started
        vol.delete(0)
        return seconds
    finally:
        conn.close()


async def operator_path(uri: str, url: str, sha: str, cache: Path, vol_name: str) -> dict[str, float]:
    policy = DownloadPolicy.from_settings(Settings(knowledge_base_enabled=False),
                                          allowed=(ipaddress.ip_network("127.0.0.0/8"),))
    host = HostConnection("bench", ConnectOptions(uri=uri, call_timeout=600))
    await host.call("probe", lambda c: c.getLibVersion())
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(rss_kib())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        t0 = time.perf_counter()
        result = await Downloader(policy).download(url, cache, checksum=f"sha256:{sha}")
        t1 = time.perf_counter()
        uploaded = await upload_volume(host, "default", vol_name, cache)
        t2 = time.perf_counter()
    finally:
        sampler.cancel()
    assert result.verified and uploaded.size == result.size
    await host.call("delete", lambda c: delete_blocking(c, "default", vol_name))
    await host.close()
    return {"download_s": t1 - t0, "upload_s": t2 - t1, "total_s": t2 - t0,
            "sampled_peak_rss_kib": max(samples) if samples else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    work = Path(args.workdir or tempfile.mkdtemp(prefix="iso-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source.iso"
    print(f"writing {args.size_mib} MiB to {src} …", file=sys.stderr)
    sha = make_file(src, size)
    daemon = LibvirtDaemon(name="bench", root=work / "libvirtd").start()
    server, url = start_server(src)
    results: dict[str, object] = {"size_mib": args.size_mib, "python": sys.version.split()[0],
                                  "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        shutil.copyfile(src, work / "copy.iso")
        results["raw_cp_s"] = time.perf_counter() - t
        (work / "copy.iso").unlink()

        t = time.perf_counter()
        subprocess.run(["curl", "-sS", "-o", str(work / "curl.iso"), url], check=True)
        results["raw_curl_s"] = time.perf_counter() - t
        (work / "curl.iso").unlink()

        results["raw_httpx_s"] = asyncio.run(raw_httpx(url, work / "httpx.iso"))
        (work / "httpx.iso").unlink()

        results["raw_upload_s"] = raw_upload(daemon.uri, src, "bench-raw")

        base = rss_kib()
        reset_peak_rss()
        op = asyncio.run(operator_path(daemon.uri, url, sha, work / "cache" / "image.part", "bench-op"))
        peak = rss_kib("VmHWM")
        results.update(op)
        results["rss_before_kib"] = base
        results["peak_extra_rss_mib"] = round((max(peak, int(op["sampled_peak_rss_kib"])) - base) / 1024, 1)
    finally:
        server.terminate()
        server.wait()
        daemon.stop()
    mb = size / 1e6
    for key in ("raw_cp_s", "raw_curl_s", "raw_httpx_s", "raw_upload_s", "download_s", "upload_s", "total_s"):
        results[key.replace("_s", "_MBps")] = round(mb / float(results[key]), 1)  # type: ignore[arg-type]
        results[key] = round(float(results[key]), 2)  # type: ignore[arg-type]
    results["raw_total_s"] = round(float(results["raw_curl_s"]) + float(results["raw_upload_s"]), 2)  # type: ignore[arg-type]
    print(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
