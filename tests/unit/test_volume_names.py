"""Volume names for imported images: [a-z0-9-] only, bounded, unique per ISOImage and content."""

from __future__ import annotations

import pytest

from libvirt_operator.adapters.libvirt.volumes import MAX_NAME, VOLUME_NAME_RE, _check_name, volume_name
from libvirt_operator.core.errors import AppError

SHA = "sha256:" + "ab12" * 16


def test_shape() -> None:
    name = volume_name("default", "debian-12", SHA)
    assert name.startswith("iso-default-debian-12-") and name.endswith("-ab12ab12ab12ab12")
    assert VOLUME_NAME_RE.match(name)


@pytest.mark.parametrize("namespace,name", [
    ("ns", "../../etc/passwd"), ("ns", "a/b"), ("..", ".."), ("ns", "name.with.dots"),
    ("NS", "UPPER"), ("ns", "x" * 253), ("n" * 63, "y" * 253), ("ns", "ünïcode"), ("ns", "-lead-"),
])
def test_only_safe_characters(namespace: str, name: str) -> None:
    vol = volume_name(namespace, name, SHA)
    assert VOLUME_NAME_RE.match(vol), vol
    assert len(vol) <= MAX_NAME
    assert "/" not in vol and "." not in vol


def test_distinct_objects_get_distinct_names() -> None:
    names = {volume_name("a-b", "c", SHA), volume_name("a", "b-c", SHA), volume_name("a", "b.c", SHA),
             volume_name("ns", "x" * 200 + "1", SHA), volume_name("ns", "x" * 200 + "2", SHA)}
    assert len(names) == 5


def test_content_is_part_of_the_name() -> None:
    assert volume_name("ns", "n", SHA) != volume_name("ns", "n", "sha256:" + "cd34" * 16)
    assert volume_name("ns", "n", "sha512:" + "ef" * 64).endswith("-" + "ef" * 8)


def test_deterministic() -> None:
    assert volume_name("ns", "n", SHA) == volume_name("ns", "n", SHA)


def test_rejects_short_checksums() -> None:
    with pytest.raises(ValueError):
        volume_name("ns", "n", "sha256:ab")


@pytest.mark.parametrize("bad", ["../x", "a/b", "x.iso", "", "-x", "A", "a" * (MAX_NAME + 1)])
def test_adapter_refuses_unsafe_names(bad: str) -> None:
    with pytest.raises(AppError):
        _check_name(bad)


def test_iso_volumes_are_recognised_as_their_own_images_only() -> None:
    from libvirt_operator.adapters.libvirt.volumes import is_volume_of
    mine = volume_name("ns", "debian", SHA)
    assert is_volume_of("ns", "debian", mine)
    assert is_volume_of("ns", "debian", volume_name("ns", "debian", "sha512:" + "ef" * 64))  # other content
    assert is_volume_of("ns", "debian", volume_name("ns", "debian", "sha256:abcdef12"))     # short digest
    long_name = "x" * 200
    assert is_volume_of("ns", long_name, volume_name("ns", long_name, SHA))
    for other in (volume_name("ns", "debian-12", SHA), volume_name("ns-debian", "x", SHA),
                  volume_name("other", "debian", SHA), volume_name("ns", "x" * 199 + "y", SHA),
                  "debian.iso", f"lvop-{VM_UID}-root", mine + "0", mine.replace("iso-", "isx-"),
                  mine[:-16] + "ABCDEF12ABCDEF12", mine[:-16] + "ab12ab12-ab12ab1"):
        assert not is_volume_of("ns", "debian", other), other


# --- VirtualMachine domain and disk volume names -------------------------------------------------

from libvirt_operator.core.domain import (  # noqa: E402
    MAX_DOMAIN_NAME, domain_name, legacy_volume_name, owned_volume_prefix, owns_volume, volume_name as disk_volume,
)

VM_UID = "6f1c3c3e-8d6c-4a7e-9a55-1b2f0e3d4c5b"
OTHER_UID = "0b6f4f2e-1f6b-4c35-8f0e-7d3c2a1b0c9d"


def test_disk_volumes_carry_the_owner_uid_and_never_collide() -> None:
    # Issue 9: VM `a` disk `b-root` and VM `a-b` disk `root` shared `ns_a-b-root` under the old scheme.
    assert legacy_volume_name(domain_name("ns", "a", VM_UID), "b-root") == \
        legacy_volume_name(domain_name("ns", "a-b", OTHER_UID), "root")
    a, ab = disk_volume(VM_UID, "b-root"), disk_volume(OTHER_UID, "root")
    assert a == f"lvop-{VM_UID}-b-root" and ab == f"lvop-{OTHER_UID}-root" and a != ab
    # Same uid, disks whose names extend each other: the uid has a fixed length, so no ambiguity.
    assert disk_volume(VM_UID, "root") != disk_volume(VM_UID, "root-2")
    assert owns_volume(VM_UID, a) and not owns_volume(OTHER_UID, a) and not owns_volume(VM_UID, ab)
    assert not owns_volume(VM_UID, owned_volume_prefix(VM_UID))  # a disk name is required
    assert not owns_volume(VM_UID, "ns_a-b-root") and not owns_volume(VM_UID, f"x-lvop-{VM_UID}-root")
    assert len(disk_volume(VM_UID, "d" * 63)) <= 255 and "/" not in disk_volume(VM_UID, "d" * 63)
    with pytest.raises(ValueError):
        owned_volume_prefix("")


def test_shortened_domain_names_cannot_equal_a_plain_one() -> None:
    # Issue 15: a second VM named exactly like the first's shortened domain name took it over.
    first = domain_name("ns", "x" * 200, VM_UID)
    assert len(first) <= MAX_DOMAIN_NAME and "__" in first
    namespace, _, rest = first.partition("_")
    assert domain_name(namespace, rest, OTHER_UID) != first  # the would-be thief gets another name
    # Plain names have exactly one `_`, shortened ones `__`: the two sets are disjoint.
    for ns, name in (("ns", "web"), ("n" * 63, "v"), ("ns", "a" * 59), ("a" * 49, "b" * 20), ("n" * 63, "y" * 253)):
        plain = domain_name(ns, name, VM_UID)
        assert len(plain) <= MAX_DOMAIN_NAME
        assert (plain.count("_") == 1) != ("__" in plain), plain
    # Long names differing only past the cut, or only by uid, stay distinct.
    assert domain_name("ns", "x" * 100 + "1", VM_UID) != domain_name("ns", "x" * 100 + "2", OTHER_UID)
    assert domain_name("ns", "x" * 200, VM_UID) != domain_name("ns", "x" * 200, OTHER_UID)
    assert domain_name("n" * 63, "y" * 253, VM_UID) != domain_name("n" * 63, "z" * 253, OTHER_UID)
