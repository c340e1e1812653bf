"""ISO uploads do not starve a host (a real libvirtd, real stream uploads): while as many uploads run
as the host has call slots, listing its domains still answers at once and within its timeout."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.adapters.libvirt import domains
from libvirt_operator.adapters.libvirt.volumes import delete_volume, upload_volume


async def test_four_uploads_leave_the_call_slots_free(libvirtd, tmp_path) -> None:
    image = tmp_path / "image.iso"
    image.write_bytes(b"\0" * (16 * 1024 * 1024))
    pool = HostPool()
    host = await pool.ensure("uploads", ConnectOptions(uri=libvirtd.uri, max_concurrent_calls=4, call_timeout=60))
    names = [f"starve-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    release = threading.Event()

    def slow_link(_sent: int) -> None:
        # A slow network to the host: each chunk takes a while, so the uploads stay in flight
        # (the stream and the bytes are real).
        release.wait(0.25)

    uploads = [asyncio.create_task(upload_volume(host, "default", name, image, progress=slow_link))
               for name in names]
    try:
        await asyncio.sleep(1.0)
        assert not any(u.done() for u in uploads), "the uploads finished too fast to overlap the listing"
        started = time.monotonic()
        listed = await host.call("list_domains", domains.list_domains, timeout=5)
        took = time.monotonic() - started
        assert listed is not None
        assert took < 2, f"listing domains took {took:.1f}s while uploads ran"
    finally:
        release.set()
        results = await asyncio.gather(*uploads, return_exceptions=True)
        for name in names:
            await delete_volume(host, "default", name)
        await pool.close_all()
    assert all(not isinstance(r, BaseException) for r in results), results
