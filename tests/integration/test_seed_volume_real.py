"""The cloud-init seed volume on a real libvirtd: reused only when it holds the seed. An operator killed
with kill -9 during the seed upload leaves a volume with the right name (a digest of the content) and
size but partial content; the next reconcile must upload it again rather than boot a guest from it."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.adapters.libvirt.seed import build_seed_iso, ensure_seed, read_seed_iso
from libvirt_operator.adapters.libvirt.volumes import delete_volume, read_volume, upload_volume

FILES = [("meta-data", b"instance-id: seed-test\n"), ("user-data", b"#cloud-config\nhostname: seeded\n")]


async def test_a_seed_cut_short_is_uploaded_again_and_a_good_one_is_reused(libvirtd, tmp_path) -> None:
    pool = HostPool()
    host = await pool.ensure("seed", ConnectOptions(uri=libvirtd.uri, call_timeout=60))
    name = f"lvop-{uuid.uuid4()}--cidata-test"
    try:
        path, uploaded = await ensure_seed(host, "default", name, FILES)
        assert uploaded and path.endswith(name)
        # A second reconcile (or a restarted operator) builds the seed again (other timestamps inside)
        # and keeps the volume: a running guest's cdrom is never replaced under it.
        assert await ensure_seed(host, "default", name, FILES) == (path, False)

        # What kill -9 mid-upload leaves: the full-size volume, only its first part written.
        good = build_seed_iso(FILES)
        cut = tmp_path / "cut.iso"
        cut.write_bytes(good[: len(good) // 3] + bytes(len(good) - len(good) // 3))
        await upload_volume(host, "default", name, cut)
        assert read_seed_iso(await read_volume(host, "default", name, 2**20) or b"") != dict(FILES)

        path2, uploaded2 = await ensure_seed(host, "default", name, FILES)
        assert uploaded2 and path2 == path
        assert read_seed_iso(await read_volume(host, "default", name, 2**20) or b"") == dict(FILES)
        # user-data may hold secrets: the image was built in memory, no spool file is left anywhere
        assert list(Path(tempfile.gettempdir()).glob("lvop-seed-*")) == []
    finally:
        await delete_volume(host, "default", name)
        await pool.close_all()
