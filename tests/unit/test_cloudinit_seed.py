"""The cloud-init NoCloud seed: its files, its content-addressed volume name (owned by the VM, never a
disk's), and the ISO image itself as a reader sees it (label cidata, Rock Ridge and Joliet names)."""

from __future__ import annotations

import hashlib
import io

import pycdlib
import pytest

from libvirt_operator.adapters.libvirt.seed import build_seed_iso
from libvirt_operator.adapters.libvirt.volumes import _check_name
from libvirt_operator.core.domain import owns_volume, volume_name
from libvirt_operator.reconcile.cloudinit import SEED_DISK, is_seed_volume, plan_seed

UID = "0b7e4c2a-55f1-4d7e-9a0c-3f2b1e6d8c90"
OTHER = "9d1c1f3e-1111-4d7e-9a0c-3f2b1e6d8c90"


def test_files_and_meta_data() -> None:
    seed = plan_seed(UID, "web-1", b"#cloud-config\n", None)
    assert [n for n, _ in seed.files] == ["user-data", "meta-data"]
    assert seed.file("meta-data") == f"instance-id: {UID}\nlocal-hostname: web-1\n".encode()
    with_net = plan_seed(UID, "web-1", b"#cloud-config\n", b"version: 2\n")
    assert with_net.file("network-config") == b"version: 2\n"
    assert plan_seed(UID, "web-1", None, None).file("user-data") == b""  # NoCloud needs the file


def test_name_follows_the_content_and_is_owned_by_the_vm() -> None:
    a = plan_seed(UID, "web", b"#cloud-config\nhostname: a\n", None)
    assert a == plan_seed(UID, "web", b"#cloud-config\nhostname: a\n", None)  # deterministic
    b = plan_seed(UID, "web", b"#cloud-config\nhostname: b\n", None)
    c = plan_seed(UID, "web", b"#cloud-config\nhostname: a\n", b"version: 2\n")
    d = plan_seed(UID, "web2", b"#cloud-config\nhostname: a\n", None)  # meta-data changes too
    assert len({a.volume, b.volume, c.volume, d.volume}) == 4
    for seed in (a, b, c, d):
        assert owns_volume(UID, seed.volume)  # deleted with the VM (teardown by uid prefix)
        assert is_seed_volume(UID, seed.volume) and not is_seed_volume(OTHER, seed.volume)
        _check_name(seed.volume)  # accepted by the upload path


def test_digest_does_not_expose_the_user_data() -> None:
    secret = b"password: hunter2\n"
    seed = plan_seed(UID, "web", secret, None)
    assert hashlib.sha256(secret).hexdigest()[:16] not in seed.volume  # salted with the uid
    assert plan_seed(OTHER, "web", secret, None).digest != seed.digest


@pytest.mark.parametrize("disk", ["root", "cidata", "cidata-0123456789abcdef", "x" * 40])
def test_no_disk_volume_is_ever_a_seed(disk: str) -> None:
    assert not is_seed_volume(UID, volume_name(UID, disk))
    assert SEED_DISK != disk  # the seed's cdrom alias is not a valid spec disk name (uppercase)


def test_iso_is_a_nocloud_seed() -> None:
    user = b"#cloud-config\nruncmd: [echo hi]\n"
    seed = plan_seed(UID, "web", user, b"version: 2\nethernets: {}\n")
    image = build_seed_iso(seed.files)
    assert image[32769:32774] == b"CD001" and image[32808:32840].rstrip() == b"cidata"
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        assert iso.has_rock_ridge() and iso.has_joliet()
        for name, data in seed.files:
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: f"/{name}"})
                assert out.getvalue() == data, (name, kind)
    finally:
        iso.close()
